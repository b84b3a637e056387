"""Flat, contiguous per-bucket buffers on one rank.

Model parameters become views into a bucket's parameter buffer, so the all-gather writes straight
into the model with no copy. The rank's shard ``[lo, hi)`` of that buffer is what its optimizer
updates; FP32 master and moments exist only for that shard. Gradients go into a bucket-shaped
buffer (kept in stage 1, allocated per reduction in stage 2) and end in an FP32 gradient shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dtensor import local, rebind
from .master import cast_param, make_store
from .plan import Bucket, Plan

LOW_PRECISION = (torch.float16, torch.bfloat16)


def master_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """16-bit params keep an FP32 master; wider params are their own master (no copy)."""
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def bucket_reduce_dtype(param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> torch.dtype:
    """float64 parameters are reduced (and accumulated) in float64: a narrower reduction would throw
    away the precision that training in float64 asks for."""
    return torch.float64 if param_dtype == torch.float64 else reduce_dtype


class BufferPool:
    """Reuses gradient buffers (stage 2) instead of returning them to the allocator: a fresh
    multi-MB allocation costs a page fault per 4 KiB on first touch, every step. A request takes
    the smallest free buffer that holds it (as a view); when none does, the largest smaller free
    buffer is dropped first, so the pool never holds more buffers than were in use at once."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        same = [i for i, t in enumerate(self._free) if t.dtype == dtype and t.device == device]
        fits = [i for i in same if self._free[i].numel() >= numel]
        if fits:
            best = min(fits, key=lambda i: self._free[i].numel())
            return self._free.pop(best)[:numel]
        if same:
            self._free.pop(max(same, key=lambda i: self._free[i].numel()))
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, t: torch.Tensor) -> None:
        self._free.append(t if t._base is None else t._base)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._free)


class FlatBucket:
    """One bucket's tensors on this rank. Holds storage only; ``hooks.GradSync`` drives it."""

    def __init__(
        self, plan: Plan, bucket: Bucket, params: Sequence[torch.Tensor], *, rank: int,
        world_size: int, device: torch.device, reduce_dtype: torch.dtype, keep_full_grad: bool,
        amsgrad: bool, pool: BufferPool | None = None, grad_dtype: torch.dtype | None = None,
        master: str = "fp32", offload: str | None = None, storage: torch.Tensor | None = None,
    ) -> None:
        self.bucket = bucket
        self.chunk = storage is not None   # one chunk of a parameter cut across buckets
        self.params = list(params)
        self.keys = [plan.params[s.param].key for s in bucket.slots]
        self.lo, self.hi = plan.shard_range(bucket, rank, world_size)
        reduce_dtype = bucket_reduce_dtype(bucket.dtype, reduce_dtype)
        padded = plan.padded_numel(bucket, world_size)
        shard = self.hi - self.lo
        mdtype = master_dtype(bucket.dtype)
        self.offloaded = offload == "cpu"
        self.state_device = torch.device("cpu") if self.offloaded else device
        pin = self.state_device.type == "cpu" and device.type == "cuda"
        if storage is None:
            self.param_buffer = torch.zeros(padded, dtype=bucket.dtype, device=device)
        else:   # a window of the parameter's own buffer (the optimizer rebinds it after all chunks)
            start = bucket.slots[0].start
            self.param_buffer = storage[start:start + padded]
        self.param_shard = self.param_buffer[self.lo:self.hi]
        own = mdtype == bucket.dtype and offload is None  # wide params are their own master
        initial = None if own else self._initial(plan, rank, world_size)
        self._bind_params()
        self.store = make_store(self.param_shard, initial, mode=master, offloaded=self.offloaded)

        def state(dtype=mdtype):
            return torch.zeros(shard, dtype=dtype, device=self.state_device, pin_memory=pin)
        self.exp_avg, self.exp_avg_sq = state(), state()
        self.max_exp_avg_sq = state() if amsgrad else None
        self.step = torch.zeros((), dtype=torch.float32, device=self.state_device)
        self.lag = [0] * len(bucket.slots)  # updates each slot sat out while frozen (zero_adam.update)
        self._padded, self._reduce_dtype, self._device = padded, reduce_dtype, device
        self._keep_full = keep_full_grad
        self._pool = pool or BufferPool()
        self.full_grad: torch.Tensor | None = None
        if keep_full_grad:
            self.full_grad = torch.zeros(padded, dtype=reduce_dtype, device=device)
        gdtype = grad_dtype or mdtype
        self._can_alias = self.full_grad is not None and reduce_dtype == gdtype
        self._aliased = self._can_alias
        if self._aliased:
            self.grad_shard = self.full_grad[self.lo:self.hi]
        else:
            self.grad_shard = torch.zeros(shard, dtype=gdtype, device=device)
        self.host_grad = state() if self.offloaded else None
        self.plain = self.store.tensor is not None and self.host_grad is None and gdtype == mdtype

    def _initial(self, plan: Plan, rank: int, world_size: int) -> torch.Tensor:
        """This shard's starting master values, from the parameters' original (pre-cast) values."""
        out = torch.zeros(self.hi - self.lo, dtype=master_dtype(self.bucket.dtype),
                          device=self.param_buffer.device)
        for piece in plan.pieces(self.bucket, rank, world_size):
            src = local(self.params[self._slot_of(piece.param)]).detach().reshape(-1)
            n = piece.param_hi - piece.param_lo
            out[piece.shard_lo:piece.shard_lo + n].copy_(src[piece.param_lo:piece.param_hi])
        return out

    # -- the master ----------------------------------------------------------------------------
    _grad_copied = None

    def wait_grad(self) -> None:
        """Offloaded: block until this bucket's gradient has reached host memory."""
        if self._grad_copied is not None:
            self._grad_copied.synchronize()
            self._grad_copied = None

    @property
    def master(self) -> torch.Tensor | None:
        """The persistent master tensor (None for a remainder master: use ``read_master``)."""
        return self.store.tensor

    def read_master(self) -> torch.Tensor:
        return self.store.read()

    def write_master(self, t: torch.Tensor) -> None:
        self.store.write(t)

    def prepare_grad(self) -> torch.Tensor:
        """The gradient shard as the update reads it: in the master's dtype, where the master is
        (an asynchronous copy into pinned host memory when offloaded)."""
        if self.host_grad is not None:
            self.host_grad.copy_(self.grad_shard, non_blocking=self.host_grad.is_pinned())
            if self.host_grad.is_pinned():
                self._grad_copied = torch.cuda.Event()
                self._grad_copied.record()
            return self.host_grad
        mdtype = master_dtype(self.bucket.dtype)
        return self.grad_shard if self.grad_shard.dtype == mdtype else self.grad_shard.to(mdtype)

    def _slot_of(self, param_index: int) -> int:
        for i, s in enumerate(self.bucket.slots):
            if s.param == param_index:
                return i
        raise KeyError(param_index)

    def _bind_params(self) -> None:
        for slot, p in zip(self.bucket.slots, self.params):
            view = self.param_buffer[slot.offset:slot.offset + slot.numel]
            src = local(p).detach().reshape(-1)[slot.start:slot.start + slot.numel]
            view.copy_(cast_param(src, view.dtype))
            if not self.chunk:
                rebind(p, view)

    # -- gradients ------------------------------------------------------------------------------
    @property
    def grad_shard_aliases_full(self) -> bool:
        """Stage 1 with an FP32 buffer: the reduced shard lives inside the full gradient buffer."""
        return self._aliased

    def split_alias(self) -> None:
        """Stage 1, a second window in one step (several backward passes without ``no_sync``):
        move the reduced shard out of the gradient buffer, which is about to take new gradients.
        Costs one shard-sized tensor until ``restore_alias`` at the end of the step."""
        if self._aliased:
            self.grad_shard = self.grad_shard.clone()
            self._aliased = False

    def restore_alias(self) -> None:
        if self._can_alias and not self._aliased:
            self.grad_shard = self.full_grad[self.lo:self.hi]
            self._aliased = True

    def full_grad_buffer(self) -> torch.Tensor:
        """The bucket-shaped gradient buffer, allocated on first use (stage 2)."""
        if self.full_grad is None:
            self.full_grad = self._pool.take(self._padded, self._reduce_dtype, self._device)
            self.full_grad[self.bucket.numel:].zero_()
        return self.full_grad

    def put_grad(self, slot_index: int, grad: torch.Tensor, first: bool) -> None:
        """Copy (first contribution in this local window) or add a parameter's gradient."""
        slot = self.bucket.slots[slot_index]
        view = self.full_grad_buffer()[slot.offset:slot.offset + slot.numel]
        part = grad.reshape(-1)[slot.start:slot.start + slot.numel]
        if first:
            view.copy_(part)
        else:
            view.add_(part)

    def zero_slots(self, slot_indices: Sequence[int]) -> None:
        """Params that got no gradient in this local window contribute zeros."""
        full = self.full_grad_buffer()
        for i in slot_indices:
            s = self.bucket.slots[i]
            full[s.offset:s.offset + s.numel].zero_()

    def takes_reduced_directly(self, full: torch.Tensor) -> bool:
        """Can a reduction write its mean straight into ``grad_shard`` (stage 2, same dtype)?"""
        return not self.grad_shard_aliases_full and self.grad_shard.dtype == full.dtype \
            and self.grad_shard.device == full.device

    def take_reduced(self, first: bool) -> None:
        """Move the reduced shard out of the full buffer into the FP32 gradient shard."""
        assert self.full_grad is not None
        if self.grad_shard_aliases_full:
            return
        reduced = self.full_grad[self.lo:self.hi]
        if first:
            self.grad_shard.copy_(reduced)
        else:
            self.grad_shard.add_(reduced)

    def release_full_grad(self) -> None:
        """Stage 2: hand the bucket-shaped gradient back once its shard has been taken."""
        if self.full_grad is not None and not self._keep_full:
            self._pool.give(self.full_grad)
            self.full_grad = None

    # -- parameters -----------------------------------------------------------------------------
    def publish_master(self) -> None:
        """Write the updated master shard into this rank's slice of the param buffer."""
        self.store.publish()

    def check_bound(self) -> None:
        """Fail loudly if a param was moved or replaced after the optimizer bound it."""
        for slot, p in zip(self.bucket.slots, self.params):
            view = self.param_buffer[slot.offset:slot.offset + slot.numel]
            expected = view.data_ptr() - slot.start * view.element_size()
            if local(p).data_ptr() != expected or local(p).dtype != view.dtype:
                raise RuntimeError(
                    "a parameter was moved, cast or replaced after ZeroAdamW was created (for "
                    "example by model.to(), model.half() or assigning param.data); its values now "
                    "live outside the optimizer's buffers. Create ZeroAdamW after the model has its "
                    "final device and dtype.")

    def nbytes(self) -> dict[str, int]:
        """Bytes this bucket holds now, by role (``buffers``: stage 2's transient full gradient)."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()
        aliased = self.grad_shard_aliases_full
        persistent_full = self._keep_full
        return {
            "params": size(self.param_buffer),
            "grads": size(self.grad_shard) * (not aliased) + size(self.full_grad) * persistent_full,
            "buffers": 0 if persistent_full else size(self.full_grad),
            "master": self.store.nbytes(),
            "exp_avg": size(self.exp_avg),
            "exp_avg_sq": size(self.exp_avg_sq) + size(self.max_exp_avg_sq),
        }

    def host_nbytes(self) -> dict[str, int]:
        """What lives in host memory when the optimizer state is offloaded (else nothing)."""
        if not self.offloaded:
            return dict.fromkeys(("params", "grads", "buffers", "master", "exp_avg", "exp_avg_sq"), 0)
        dev = self.nbytes()
        return {"params": 0, "grads": self.host_grad.numel() * self.host_grad.element_size(), "buffers": 0,
                "master": dev["master"], "exp_avg": dev["exp_avg"], "exp_avg_sq": dev["exp_avg_sq"]}

    def device_nbytes(self) -> dict[str, int]:
        out = self.nbytes()
        if self.offloaded:
            out.update(master=0, exp_avg=0, exp_avg_sq=0)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Moments and step (the master is read and written through ``read/write_master``)."""
        out = {"step": self.step, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.max_exp_avg_sq is not None:
            out["max_exp_avg_sq"] = self.max_exp_avg_sq
        return out
