"""Per-rank memory of ZeroAdamW, predicted from the partition plan alone (pure; no processes).

The numbers come from the same ``Plan`` the runtime builds, including padding, so the tensors a
``ZeroAdamW`` allocates add up to exactly these bytes (``ZeroAdamW.memory_report()``; a test
holds them equal). What is counted, per rank:

* ``params``: the full (padded) parameter buckets, in the parameters' dtype (ZeRO-1/2 keep them).
* ``grads``: stage 1, the full gradient buffer in ``reduce_dtype`` (plus a separate shard when the
  shard's dtype differs); stage 2, the gradient shard in ``grad_dtype``.
* ``master``: the FP32 master shard of 16-bit params (2 bytes with ``master="remainder"``; 0 for
  FP32 params, which are their own master).
* ``exp_avg``, ``exp_avg_sq``: the moment shards (``moments_dtype``; ``amsgrad`` adds a third).
* ``buffers``: stage 2's bucket-sized gradient buffers in flight during backward (at most
  ``max_inflight`` reducing plus one filling per param group and dtype) and the FP32 cast of one
  gradient shard when ``grad_dtype`` is 16-bit; on gloo, the exchange's receive buffers
  (``max_inflight`` of them, each (N-1)/N of a bucket). An upper bound; everything else is exact.

Activations, the autograd graph and allocator slack are the model's and the framework's and are
not included. With ``offload="cpu"`` master and moments are host memory, reported separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .flat import bucket_reduce_dtype, master_dtype
from .plan import Plan

FIELDS = ("params", "grads", "master", "exp_avg", "exp_avg_sq", "buffers")


@dataclass(frozen=True)
class Bytes:
    params: int = 0
    grads: int = 0
    master: int = 0
    exp_avg: int = 0
    exp_avg_sq: int = 0
    buffers: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f) for f in FIELDS)

    @property
    def model_states(self) -> int:
        """What the ZeRO paper counts: parameters, gradients and optimizer states."""
        return self.total - self.buffers

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Estimate:
    device: Bytes      # on the accelerator (or in RAM on a CPU-only run)
    host: Bytes        # offloaded optimizer state
    world_size: int
    n_params: int      # parameters in this rank's plan (per TP rank with tensor parallelism)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(plan: Plan, world_size: int, *, stage: int = 2, reduce_dtype: torch.dtype = torch.float32,
             grad_dtype: torch.dtype | None = None, master: str = "fp32",
             moments_dtype: torch.dtype = torch.float32, amsgrad: bool = False, max_inflight: int = 2,
             offload: str | None = None, accumulate: str | None = None, backend: str = "nccl") -> Estimate:
    """Bytes per rank for ``plan`` divided over ``world_size`` data-parallel ranks (a plan that cuts
    large parameters must have been built for that world size). ``backend="gloo"`` adds the
    receive buffers of gloo's exchange reductions (``zero_adam.exchange``)."""
    plan.check_world(world_size)
    dev = dict.fromkeys(FIELDS, 0)
    host = dict.fromkeys(FIELDS, 0)
    state = host if offload == "cpu" else dev
    full_sizes: dict[tuple[int, torch.dtype], list[int]] = {}
    recv_sizes: list[int] = []
    max_shard_cast = 0
    for b in plan.buckets:
        padded, shard = plan.padded_numel(b, world_size), plan.shard_numel(b, world_size)
        mdtype = master_dtype(b.dtype)
        gdtype = grad_dtype or mdtype
        rdtype = bucket_reduce_dtype(b.dtype, reduce_dtype)
        dev["params"] += padded * _size(b.dtype)
        recv_sizes.append((world_size - 1) * shard * _size(rdtype))
        if mdtype != b.dtype:
            state["master"] += shard * (2 if master == "remainder" else _size(mdtype))
        if offload == "cpu" and mdtype == b.dtype:
            state["master"] += shard * _size(mdtype)  # an offloaded FP32 param needs a host master
        if offload == "cpu":
            host["grads"] += shard * _size(mdtype)   # the gradient shard, downloaded for the update
        mom = _size(moments_dtype if mdtype == torch.float32 else mdtype)
        state["exp_avg"] += shard * mom
        state["exp_avg_sq"] += shard * mom * (2 if amsgrad else 1)
        if stage == 1:
            dev["grads"] += padded * _size(rdtype)
            if gdtype != rdtype:
                dev["grads"] += shard * _size(gdtype)
        else:
            dev["grads"] += shard * _size(gdtype)
            full_sizes.setdefault((b.group, b.dtype), []).append(padded * _size(rdtype))
        if (gdtype != mdtype and offload is None) or (master == "remainder" and mdtype != b.dtype):
            max_shard_cast = max(max_shard_cast, shard * _size(mdtype))  # an FP32 temporary
    if stage == 2:
        everything = sorted((s for sizes in full_sizes.values() for s in sizes), reverse=True)
        # 'local' accumulation keeps every bucket's full gradient through no_sync micro-steps
        live = min(len(everything), max_inflight + len(full_sizes))
        if accumulate == "local":
            live = len(everything)
        dev["buffers"] += sum(everything[:live])
    dev["buffers"] += max_shard_cast
    if backend == "gloo" and world_size > 1:
        dev["buffers"] += sum(sorted(recv_sizes, reverse=True)[:max_inflight])
    n = sum(p.numel for p in plan.params)
    return Estimate(Bytes(**dev), Bytes(**host), world_size, n)


def plan_params(params, *, param_dtype: torch.dtype | None = None, bucket_mb: float = 25.0,
                reduce_dtype: torch.dtype = torch.float32, tp_rule=None, world_size: int = 1) -> Plan:
    """The plan ``ZeroAdamW(params, ...)`` would build on ``world_size`` data-parallel ranks (works
    on ``meta`` tensors: no memory).

    ``params`` is anything ``torch.optim`` takes: parameters, ``named_parameters()`` or groups;
    ``tp_rule`` sizes a tensor-parallel run from full-size parameters (see ``trainable_specs``).
    """
    from .options import ShardingOptions
    from .plan import build_plan, trainable_specs
    groups = torch.optim.Optimizer(params, {}).param_groups
    _, specs = trainable_specs(groups, param_dtype, tp_rule)
    opts = ShardingOptions(bucket_mb=bucket_mb, reduce_dtype=reduce_dtype, param_dtype=param_dtype)
    return build_plan(specs, bucket_numel=opts.bucket_numel, world_size=world_size)


def bare_plan(n_params: float, *, dtype: torch.dtype, bucket_numel: int) -> Plan:
    """A plan for a bare parameter count: params the size of one bucket (for the ZeRO paper check)."""
    from .plan import ParamSpec, build_plan
    n = int(n_params)
    full, rest = divmod(n, bucket_numel)
    shapes = [(bucket_numel,)] * full + ([(rest,)] if rest else [])
    specs = [ParamSpec(key=f"p{i}", group=0, shape=s, dtype=dtype) for i, s in enumerate(shapes)]
    return build_plan(specs, bucket_numel=bucket_numel)
