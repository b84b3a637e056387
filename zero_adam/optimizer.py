"""``ZeroAdamW``: a ``torch.optim.Optimizer`` that shards AdamW over a data-parallel group.

It only orchestrates: ``plan`` decides where every element lives, ``flat`` holds the buffers,
``hooks`` moves gradients in, ``kernel`` updates the local shard and ``comm`` runs collectives.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import dtensor, kernel, leftovers, lifetime, models, update, validate
from .comm import Comm
from .flat import BufferPool, FlatBucket
from .gradnorm import GradientPolicy
from .groups import GroupGrowth
from .hooks import GradSync, remove_hooks
from .options import ShardingOptions
from .plan import Plan, build_plan, trainable_specs
from .prefetch import GatherPrefetch
from .scaler import make_scaler
from .state import ShardedState

log = logging.getLogger("zero_adam")


class ZeroAdamW(GradientPolicy, GroupGrowth, ShardedState, torch.optim.Optimizer):
    """AdamW whose FP32 master weights, moments (and, at stage 2, gradients) are sharded.

    Use it instead of ``torch.optim.AdamW`` *and* instead of DDP: do not wrap the model. After
    ``step()`` every rank holds the parameters ``torch.optim.AdamW`` would compute from the
    gradient averaged over the group. Gradients live in the optimizer's buffers, so ``param.grad``
    is ``None`` after backward. A trainable parameter that gets no gradient in a step is treated
    as having a zero gradient (as with DDP); plain AdamW would skip it instead. ``close()`` (or
    garbage collection) removes the gradient hooks; a parameter belongs to one live ZeroAdamW.
    """

    def __init__(
        self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
        amsgrad: bool = False, *, maximize: bool = False, process_group: Any = None,
        mesh: Any = None, dp_dim: str = "dp",
        stage: int = 2, bucket_mb: float = 25.0, param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype = torch.float32, grad_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        accumulate: str | None = None, reduce_collective: str = "auto",
        gather_collective: str = "auto", sync_params: bool = True, overlap_gather: bool = True,
        max_inflight: int = 2, loss_scale: Any = None, nonfinite: str = "skip", master: str = "fp32",
        offload: str | None = None,
        foreach: bool | None = None,
        fused: bool | None = None, capturable: bool = False, differentiable: bool = False,
    ) -> None:
        del foreach, fused  # accepted for drop-in compatibility: the fused kernel is always used
        self.closed = False
        validate.check_unsupported(capturable=capturable, differentiable=differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        validate.check_hyperparams(defaults)
        args = locals()  # every ShardingOptions field is a keyword argument of the same name
        self.options = ShardingOptions(**{f.name: args[f.name] for f in dataclasses.fields(ShardingOptions)})
        self._scaler = make_scaler(loss_scale)
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        for gi, group in enumerate(self.param_groups):
            validate.check_hyperparams(group, where=f"param group {gi}")
        self.comm = Comm(_dp_group(process_group, mesh, dp_dim), reduce_collective=reduce_collective,
                         gather_collective=gather_collective)
        if self.comm.exchange is not None:   # gloo reductions in flight: as many as full buffers
            self.comm.exchange.max_reducing = self.options.max_inflight
        tensors, specs = trainable_specs(self.param_groups, self.options.param_dtype)
        self.mesh = mesh  # kept for checkpoints of a DP x TP mesh smaller than the world
        tp_group = dtensor.tp_group(tensors)
        self._tp = Comm(tp_group) if tp_group is not None else None
        device = validate.check_params(tensors, [s.key for s in specs])
        if self.options.master == "remainder" and any(s.dtype == torch.float16 for s in specs):
            raise ValueError("master='remainder' needs bf16 (or fp32) parameters; fp16 parameters "
                             "keep a 4-byte FP32 master (master='fp32')")
        self.plan: Plan = build_plan(specs, bucket_numel=self.options.bucket_numel,
                                     world_size=self.comm.world_size)
        validate.check_ranks_agree(self.comm, self._consistency_lines(), device)
        lifetime.claim(tensors, [s.key for s in specs], self)
        leftovers.install()
        self._excluded = self._frozen_in_groups()
        self._prepare_model(tensors, [p for _, p in self._excluded])
        self._pool = BufferPool()
        self._device = device
        self.buckets: list[FlatBucket] = self._make_buckets(self.plan.buckets, tensors)
        overlap_gather = overlap_gather and self.comm.distributed   # one rank gathers nothing
        self._prefetch = GatherPrefetch(self.buckets, self.comm) if overlap_gather else None
        self._sync = GradSync(
            self.buckets, self.comm, accumulate=self.options.accumulate,
            release_full=self.options.stage == 2,
            max_inflight=self.options.max_inflight if self.options.stage == 2 else None,
            on_grad=_fresh_check(self._prefetch, self.buckets) if overlap_gather else None)
        self._owned = [id(p) for p in tensors]
        self._finalizer = lifetime.on_collect(
            self, lambda handles=self._sync.handles: remove_hooks(handles),
            *([self._prefetch.close] if self._prefetch else []),
            lambda owned=self._owned: lifetime.release(owned))
        self.last_grad_norm: float = math.nan
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._warned_no_grad = False
        self._wrap_checked = False

    # -- construction helpers ------------------------------------------------------------------
    def _consistency_lines(self) -> list[str]:
        o = self.options
        lines = [f"options: stage={o.stage} bucket_mb={o.bucket_mb} param_dtype={o.param_dtype} "
                 f"reduce_dtype={o.reduce_dtype} max_grad_norm={o.max_grad_norm} "
                 f"accumulate={o.accumulate}"]
        for gi, g in enumerate(self.param_groups):
            hp = {k: g[k] for k in sorted(self.defaults)}
            lines.append(f"param group {gi}: {hp}")
        return lines + self.plan.describe()

    def _prepare_model(self, tensors: list[torch.Tensor], frozen: list[torch.Tensor]) -> None:
        """What DDP does to the whole model: ``param_dtype`` casts frozen floating parameters too,
        and start-up sync broadcasts rank 0's parameters (trainable and frozen) and buffers."""
        roots = models.owning_roots(tensors)
        others = models.other_params(roots, frozen, tensors)
        if self.options.param_dtype is not None:
            models.cast_(others, self.options.param_dtype)
        self._broadcast_from_rank0([*tensors, *others, *models.buffers(roots)])

    def _broadcast_from_rank0(self, tensors: list[torch.Tensor]) -> None:
        """Start-up sync (``sync_params``): rank 0's values everywhere, as DDP does."""
        if self.options.sync_params and self.comm.distributed:
            with torch.no_grad():
                for t in tensors:
                    self.comm.broadcast_(dtensor.local(t).data, src=0)

    def _make_buckets(self, plan_buckets: Sequence[Any], tensors: Any) -> list[FlatBucket]:
        """Buffers for ``plan_buckets``; ``tensors`` are indexed like ``self.plan.params``. A
        parameter cut into chunks gets one buffer that its chunk buckets' buffers tile."""
        amsgrad = any(g["amsgrad"] for g in self.param_groups)
        ours = set(plan_buckets)
        storage = {i: torch.zeros(self.plan.storage_numel(chunks), dtype=chunks[0].dtype, device=self._device)
                   for i, chunks in self.plan.split_params().items() if chunks[0] in ours}
        with torch.no_grad():
            out = [FlatBucket(self.plan, b, [tensors[s.param] for s in b.slots], rank=self.comm.rank,
                              world_size=self.comm.world_size, device=self._device,
                              reduce_dtype=self.options.reduce_dtype,
                              keep_full_grad=self.options.stage == 1, pool=self._pool,
                              grad_dtype=self.options.grad_dtype, master=self.options.master,
                              offload=self.options.offload, amsgrad=amsgrad,
                              storage=storage.get(b.slots[0].param))
                   for b in plan_buckets]
            for i, buf in storage.items():   # every chunk copied its part: now the param moves
                dtensor.rebind(tensors[i], buf[:self.plan.params[i].numel])
        return out

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the gradient hooks and release the parameters (a new optimizer may then own
        them). The model keeps its current weights; this optimizer cannot step any more."""
        if not self.closed:
            self.closed = True
            self._finalizer()

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"{what} on a closed ZeroAdamW: close() removed its gradient hooks. "
                               "Create a new ZeroAdamW for the model")

    # -- training ------------------------------------------------------------------------------
    def no_sync(self) -> AbstractContextManager[None]:
        """Backward passes inside accumulate without a per-step reduction (see ``accumulate``)."""
        self._check_open("no_sync()")
        return self._sync.no_sync()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_open("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sync.in_no_sync:
            raise RuntimeError("opt.step() was called inside opt.no_sync(): no_sync marks the "
                               "micro-steps that are not the last one; call step() after leaving it")
        if self._prefetch is not None:
            self._prefetch.wait_all()
            self._prefetch.finish_recording(self._sync.touched)
        for fb in self.buckets:
            fb.check_bound()
        if not self._wrap_checked:  # nothing is updated yet: a late DDP wrap loses nothing
            validate.check_not_wrapped([p for fb in self.buckets for p in fb.params], later=True)
            self._wrap_checked = True
        self._sync.finish()
        if not self._prepare_grads(self._clipped):
            return loss
        if self._prefetch is not None and self._prefetch.order is not None \
                and all(fb.plain for fb in self.buckets):
            # bucket by bucket in forward order, each gather launched as soon as its bucket is
            # updated (offloaded or 16-bit state keeps its cross-bucket download overlap instead)
            self._prefetch.launch(self._gather_one, prepare=self._update_one)
        else:
            for gi, group in enumerate(self.param_groups):
                self._update(group, [fb for fb in self.buckets if fb.bucket.group == gi])
            self._gather()
        self._sync.reset()
        return loss

    def _update_one(self, bi: int) -> None:
        """Update one bucket: with overlap_gather, the first bucket the forward needs is on the
        wire while the others are still being updated."""
        fb = self.buckets[bi]
        self._update(self.param_groups[fb.bucket.group], [fb])

    def _gather_one(self, bi: int):
        fb = self.buckets[bi]
        return self.comm.all_gather(fb.param_buffer, fb.lo, fb.hi, what=f"all-gather of bucket {bi}")

    def _gather(self) -> None:
        """All-gather every updated bucket: asynchronously, in forward order, if overlap_gather."""
        if self._prefetch is not None:
            self._prefetch.launch(self._gather_one)
        else:
            for p in [self._gather_one(bi) for bi in range(len(self.buckets))]:
                p.wait()

    def wait_params(self) -> None:
        """Finish in-flight parameter all-gathers (``overlap_gather``): the model is then current."""
        if self._prefetch is not None:
            self._prefetch.wait_all()

    def _update(self, group: dict[str, Any], mine: list[FlatBucket]) -> None:
        """One fused call over the group's plain buckets; the others (remainder master, 16-bit
        gradient shards, offloaded state) one bucket at a time, so at most one FP32 shard is
        materialised and an offloaded bucket's upload overlaps the next one's update."""
        plain = [fb for fb in mine if fb.plain]
        if plain:
            self._update_buckets(group, plain, [fb.master for fb in plain], [fb.grad_shard for fb in plain])
            for fb in plain:
                fb.publish_master()
        rest = [fb for fb in mine if not fb.plain]
        early = {id(fb): fb.prepare_grad() for fb in rest if fb.host_grad is not None}  # downloads
        for fb in rest:  # in flight; a 16-bit shard is cast to FP32 only when its bucket's turn comes
            g = early[id(fb)] if id(fb) in early else fb.prepare_grad()
            fb.wait_grad()
            m = fb.read_master()
            self._update_buckets(group, [fb], [m], [g])
            fb.write_master(m)
        if any(fb.host_grad is not None and fb.host_grad.is_pinned() for fb in rest):
            torch.cuda.current_stream().synchronize()  # host buffers are reused next step

    def _update_buckets(self, group: dict[str, Any], mine: list[FlatBucket], masters: list,
                        grads: list) -> None:
        """The fused AdamW call over the runs of ``mine`` (``zero_adam.update``: frozen
        parameters are left out, each run at its own step count)."""
        amsgrad = group["amsgrad"]
        cols: list[list[torch.Tensor]] = [[], [], [], [], [], []]
        own = []
        for fb, m, g in zip(mine, masters, grads):
            state = (m, g, fb.exp_avg, fb.exp_avg_sq, fb.max_exp_avg_sq if amsgrad else None)
            runs = update.runs(self.plan, fb, self.comm.rank, self.comm.world_size)
            own.append(runs is None)
            for lo, hi, step in ([(None, None, fb.step)] if runs is None else
                                 [(r.lo, r.hi, update.run_step(fb, r)) for r in runs]):
                for col, t in zip(cols, state):
                    if t is not None:
                        col.append(t if lo is None else t[lo:hi])
                cols[5].append(step)
        beta1, beta2 = (float(b) for b in group["betas"])
        kernel.adamw_(
            cols[0], cols[1], cols[2], cols[3], cols[5], lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=amsgrad,
            max_exp_avg_sqs=cols[4], maximize=group["maximize"])
        for fb, stepped in zip(mine, own):
            update.after_update(fb, stepped)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard accumulated gradients. ``step()`` already consumes them; this is for parity."""
        self._sync.reset()
        self._clipped = None

    def memory_report(self, where: str = "device") -> dict[str, int]:
        """Bytes of this rank's tensors held by the optimizer, by role, and their ``total``, on the
        device (``where="host"``: offloaded optimizer state); ``zero_adam.memory`` predicts them."""
        out: dict[str, int] = {}
        for fb in self.buckets:
            for k, v in (fb.device_nbytes() if where == "device" else fb.host_nbytes()).items():
                out[k] = out.get(k, 0) + v
        if where == "device":
            out["buffers"] += self._pool.nbytes() + (self.comm.exchange.nbytes() if self.comm.exchange else 0)
        out["total"] = sum(out.values())
        return out


def _fresh_check(prefetch: GatherPrefetch, buckets: list[FlatBucket]) -> Callable[[int, int], None]:
    """The overlap guard's last line: a gradient for a parameter whose gather is still pending.
    Holds no reference to the optimizer (its hooks must not keep it alive)."""
    def check(bi: int, si: int) -> None:
        prefetch.check_grad(bi, buckets[bi].keys[si])
    return check


def _dp_group(process_group: Any, mesh: Any, dp_dim: str) -> Any:
    """The data-parallel group: given directly, or the ``dp_dim`` dimension of a ``DeviceMesh``."""
    if mesh is None:
        return process_group
    if process_group is not None:
        raise ValueError("pass either process_group or mesh (with dp_dim), not both")
    names = mesh.mesh_dim_names or ()
    if dp_dim not in names:
        raise ValueError(f"dp_dim={dp_dim!r} is not a dimension of the mesh (it has {list(names)}); "
                         "name the data-parallel dimension")
    return mesh.get_group(dp_dim)
