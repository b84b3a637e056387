"""``ZeroAdamW``: a ``torch.optim.Optimizer`` that shards AdamW over a data-parallel group.

It only orchestrates: ``plan`` decides where every element lives, ``flat`` holds the buffers,
``hooks`` moves gradients in, ``kernel`` updates the local shard and ``comm`` runs collectives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import kernel, validate
from .comm import Comm
from .flat import BufferPool, FlatBucket
from .hooks import GradSync
from .options import ShardingOptions
from .plan import ParamSpec, Plan, build_plan
from .prefetch import GatherPrefetch
from .scaler import decide, make_scaler

log = logging.getLogger("zero_adam")


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW whose FP32 master weights, moments (and, at stage 2, gradients) are sharded.

    Use it instead of ``torch.optim.AdamW`` *and* instead of DDP: do not wrap the model. After
    ``step()`` every rank holds the parameters ``torch.optim.AdamW`` would compute from the
    gradient averaged over the group. Gradients live in the optimizer's buffers, so ``param.grad``
    is ``None`` after backward. A trainable parameter that gets no gradient in a step is treated
    as having a zero gradient (as with DDP); plain AdamW would skip it instead.
    """

    def __init__(
        self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
        amsgrad: bool = False, *, maximize: bool = False, process_group: Any = None,
        stage: int = 2, bucket_mb: float = 25.0, param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype = torch.float32, max_grad_norm: float | None = None,
        accumulate: str | None = None, reduce_collective: str = "auto",
        gather_collective: str = "auto", sync_params: bool = True, overlap_gather: bool = False,
        max_inflight: int = 2, loss_scale: Any = None, nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None, capturable: bool = False, differentiable: bool = False,
    ) -> None:
        del foreach, fused  # accepted for drop-in compatibility: the fused kernel is always used
        validate.check_unsupported(capturable=capturable, differentiable=differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        validate.check_hyperparams(defaults)
        self.options = ShardingOptions(
            stage=stage, bucket_mb=bucket_mb, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
            max_grad_norm=max_grad_norm, accumulate=accumulate, sync_params=sync_params,
            reduce_collective=reduce_collective, gather_collective=gather_collective,
            overlap_gather=overlap_gather, max_inflight=max_inflight, nonfinite=nonfinite)
        self._scaler = make_scaler(loss_scale)
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        for gi, group in enumerate(self.param_groups):
            validate.check_hyperparams(group, where=f"param group {gi}")
        self.comm = Comm(process_group, reduce_collective=reduce_collective,
                         gather_collective=gather_collective)
        tensors, specs = self._trainable()
        device = validate.check_params(tensors, [s.key for s in specs])
        self.plan: Plan = build_plan(specs, bucket_numel=self.options.bucket_numel)
        validate.check_ranks_agree(self.comm, self._consistency_lines(), device)
        if self.options.sync_params:
            self._broadcast_initial(tensors)
        self._pool = BufferPool()
        with torch.no_grad():
            self.buckets = [
                FlatBucket(self.plan, b, [tensors[s.param] for s in b.slots], rank=self.comm.rank,
                           world_size=self.comm.world_size, device=device,
                           reduce_dtype=self.options.reduce_dtype,
                           keep_full_grad=self.options.stage == 1, pool=self._pool,
                           amsgrad=any(g["amsgrad"] for g in self.param_groups))
                for b in self.plan.buckets]
        self._prefetch = GatherPrefetch(self.buckets, self.comm) if overlap_gather else None
        self._sync = GradSync(
            self.buckets, self.comm, accumulate=self.options.accumulate,
            release_full=self.options.stage == 2,
            max_inflight=self.options.max_inflight if self.options.stage == 2 else None,
            on_grad=self._check_fresh if overlap_gather else None)
        self.last_grad_norm: float = math.nan
        self.last_step_skipped = False
        self.skipped_steps = 0

    # -- construction helpers ------------------------------------------------------------------
    def _trainable(self) -> tuple[list[torch.Tensor], list[ParamSpec]]:
        tensors, specs = [], []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                key = names[i] if names else f"param_groups.{gi}.params.{i}"
                dtype = self.options.param_dtype or p.dtype
                specs.append(ParamSpec(key=key, group=gi, shape=tuple(p.shape), dtype=dtype))
                tensors.append(p)
        return tensors, specs

    def _consistency_lines(self) -> list[str]:
        o = self.options
        lines = [f"options: stage={o.stage} bucket_mb={o.bucket_mb} param_dtype={o.param_dtype} "
                 f"reduce_dtype={o.reduce_dtype} max_grad_norm={o.max_grad_norm} "
                 f"accumulate={o.accumulate}"]
        for gi, g in enumerate(self.param_groups):
            hp = {k: g[k] for k in sorted(self.defaults)}
            lines.append(f"param group {gi}: {hp}")
        return lines + self.plan.describe()

    def _broadcast_initial(self, tensors: list[torch.Tensor]) -> None:
        """Start from rank 0's parameter values on every rank, as DDP does."""
        if self.comm.distributed:
            with torch.no_grad():
                for p in tensors:
                    self.comm.broadcast_(p.data, src=0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_constructing", True):
            raise RuntimeError("ZeroAdamW cannot add a param group after construction: its "
                               "buckets and shards are fixed. Pass every group to the constructor "
                               "(use lr=0 or requires_grad=False for groups that start frozen)")
        super().add_param_group(param_group)

    # -- training ------------------------------------------------------------------------------
    def no_sync(self) -> AbstractContextManager[None]:
        """Backward passes inside accumulate without a per-step reduction (see ``accumulate``)."""
        return self._sync.no_sync()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
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
        self._sync.finish()
        if not self._prepare_grads():
            return loss
        for gi, group in enumerate(self.param_groups):
            self._update(group, [fb for fb in self.buckets if fb.bucket.group == gi])
        self._sync.reset()
        for fb in self.buckets:
            fb.publish_master()
        self._gather()
        return loss

    def _gather(self) -> None:
        """All-gather every bucket: asynchronously, in forward order, if overlap_gather."""
        def one(bi: int):
            fb = self.buckets[bi]
            return self.comm.all_gather(fb.param_buffer, fb.lo, fb.hi, what=f"all-gather of bucket {bi}")
        if self._prefetch is not None:
            self._prefetch.launch(one)
        else:
            for p in [one(bi) for bi in range(len(self.buckets))]:
                p.wait()

    def wait_params(self) -> None:
        """Finish in-flight parameter all-gathers (``overlap_gather``): the model is then current."""
        if self._prefetch is not None:
            self._prefetch.wait_all()

    def _check_fresh(self, bi: int, si: int) -> None:
        self._prefetch.check_grad(bi, self.plan.params[self.buckets[bi].bucket.slots[si].param].key)

    def _prepare_grads(self) -> bool:
        """Global norm, overflow/non-finite policy, unscaling and clipping; False: step skipped."""
        sq = kernel.sum_of_squares([fb.grad_shard for fb in self.buckets])
        scaled_norm = math.sqrt(float(self.comm.all_reduce_sum(sq)))
        if not math.isfinite(scaled_norm) and self._scaler is None and self.options.nonfinite == "raise":
            self._raise_nonfinite()
        d = decide(scaled_norm, scaler=self._scaler, max_grad_norm=self.options.max_grad_norm)
        self.last_grad_norm, self.last_step_skipped = d.norm, d.skip
        if d.skip:
            self.skipped_steps += 1
            log.warning("zero_adam: step skipped (%d so far, %d updates done): non-finite gradient "
                        "(norm %s)%s", self.skipped_steps, int(self.buckets[0].step), d.norm,
                        f"; loss scale now {self._scaler.scale:g}" if self._scaler else "")
            self._sync.reset()
            return False
        if d.multiplier != 1.0:
            torch._foreach_mul_([fb.grad_shard for fb in self.buckets], d.multiplier)
        return True

    def _raise_nonfinite(self) -> None:
        mine = set()
        for fb in self.buckets:
            for pc in self.plan.pieces(fb.bucket, self.comm.rank, self.comm.world_size):
                n = pc.param_hi - pc.param_lo
                if not bool(torch.isfinite(fb.grad_shard[pc.shard_lo:pc.shard_lo + n]).all()):
                    mine.add(self.plan.params[pc.param].key)
        names = sorted(set().union(*self.comm.gather_objects(mine)))
        self._sync.reset()
        raise RuntimeError(f"non-finite gradient at optimizer step {int(self.buckets[0].step) + 1} in "
                           f"{len(names)} parameter(s): {names[:20]} (nonfinite='raise'; use 'skip' to "
                           "skip such steps, or check the loss and the learning rate)")

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale (fp16); backward this instead of ``loss``."""
        return loss if self._scaler is None else loss * self._scaler.scale

    @property
    def loss_scale(self) -> float:
        return 1.0 if self._scaler is None else self._scaler.scale

    def _update(self, group: dict[str, Any], mine: list[FlatBucket]) -> None:
        if not mine:
            return
        beta1, beta2 = group["betas"]
        kernel.adamw_(
            [fb.master for fb in mine], [fb.grad_shard for fb in mine],
            [fb.exp_avg for fb in mine], [fb.exp_avg_sq for fb in mine],
            [fb.step for fb in mine], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
            max_exp_avg_sqs=[fb.max_exp_avg_sq for fb in mine] if group["amsgrad"] else (),
            maximize=group["maximize"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard accumulated gradients. ``step()`` already consumes them; this is for parity."""
        self._sync.reset()

    def memory_report(self) -> dict[str, int]:
        """Bytes of this rank's tensors held by the optimizer, by role, and their ``total``."""
        out: dict[str, int] = {}
        for fb in self.buckets:
            for k, v in fb.nbytes().items():
                out[k] = out.get(k, 0) + v
        out["buffers"] += self._pool.nbytes()
        out["total"] = sum(out.values())
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shards (same world size only; ``zero_adam.checkpoint`` reshards)."""
        self.wait_params()
        out = super().state_dict()
        out["state"] = {fb.bucket.index: fb.state_tensors() for fb in self.buckets}
        out["zero_adam"] = {"world_size": self.comm.world_size, "rank": self.comm.rank,
                            "fingerprint": self.plan.fingerprint(), "stage": self.options.stage,
                            "scaler": self.scaler_state()}
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict.get("zero_adam")
        if meta is None:
            raise ValueError("this state dict was not saved by ZeroAdamW; to start from a "
                             "torch.optim.AdamW state use zero_adam.checkpoint")
        mine = (self.comm.world_size, self.comm.rank, self.plan.fingerprint())
        theirs = (meta["world_size"], meta["rank"], meta["fingerprint"])
        if mine != theirs:
            raise ValueError(f"state dict was saved by rank {theirs[1]} of {theirs[0]} with plan "
                             f"{theirs[2]}; this is rank {mine[1]} of {mine[0]} with plan "
                             f"{mine[2]}. ZeroAdamW.state_dict() only reloads on the same layout; "
                             "use zero_adam.checkpoint.save/load to change the world size")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        for fb in self.buckets:
            for name, t in fb.state_tensors().items():
                t.copy_(state_dict["state"][fb.bucket.index][name])
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        self.load_scaler_state(meta.get("scaler"))
        self.reload_params()

    def scaler_state(self) -> dict[str, Any] | None:
        return None if self._scaler is None else self._scaler.state_dict()

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if self._scaler is not None and state is not None:
            self._scaler.load_state_dict(state)

    @torch.no_grad()
    def reload_params(self) -> None:
        """Make the model's parameters the cast of the (just loaded) master shards, on every rank."""
        self.wait_params()
        self._sync.reset()
        for fb in self.buckets:
            fb.publish_master()
        for p in [self.comm.all_gather(fb.param_buffer, fb.lo, fb.hi) for fb in self.buckets]:
            p.wait()
