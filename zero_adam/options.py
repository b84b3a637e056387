"""Sharding policy: a frozen, keyword-only dataclass validated once, at construction.

Every field maps one-to-one onto a ``ZeroAdamW`` keyword argument (and onto the ``optim`` section of
the launch config), so an error names exactly what the user typed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACCUMULATE_MODES = ("local", "shard")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, kw_only=True)
class ShardingOptions:
    """How parameters, gradients and optimizer state are sharded and communicated.

    * ``stage``: 1 shards master weights and moments; 2 also shards gradients.
    * ``bucket_mb``: size of one gradient-reduction bucket, in MiB of ``reduce_dtype``.
    * ``param_dtype``: cast the model's parameters to this dtype (e.g. ``torch.bfloat16``); the FP32
      master is initialised from the original values. ``None`` keeps each parameter's dtype.
    * ``reduce_dtype``: dtype of gradient buffers and of the reduction.
    * ``grad_dtype``: dtype of the gradient shard the step reads (and stage 2 accumulates in);
      ``None``: the master's (FP32). A 16-bit shard halves stage 2's gradient memory (the ZeRO
      paper's setting) and is cast to FP32 one bucket at a time for the update.
    * ``max_grad_norm``: clip the global gradient norm to this value (``None``: no clipping).
    * ``accumulate``: where ``no_sync()`` micro-steps accumulate. ``"local"``: a full gradient
      buffer in ``reduce_dtype``, one reduction per step (stage 1 always; stage 2 then holds that
      buffer during accumulation). ``"shard"``: every backward is reduced and added into the FP32
      gradient shard (stage 2 default; no full-size buffer survives a backward). ``None`` picks.
    * ``reduce_collective`` / ``gather_collective``: how gradients are reduced and parameters
      gathered. ``"auto"``: reduce-scatter and all-gather on NCCL, point-to-point exchanges on gloo
      (``zero_adam.exchange``, faster there than gloo's collectives); ``"all_reduce"`` and the
      named collectives can be forced.
    * ``sync_params``: start from rank 0's parameters, as DDP does.
    * ``overlap_gather`` (default on): return from ``step()`` with the parameter all-gathers still
      in flight and wait for each bucket just before the forward first uses it, so the gather hides
      behind the next forward as DDP's all-reduce hides behind backward (``zero_adam.prefetch``).
      Any other read through a torch call waits for that parameter's gather first: an EMA,
      ``model.state_dict()``, ``F.linear(x, child.weight)``, ``param.data``. Not seen: a read from
      another thread, or a ``torch.distributed`` call on the parameter tensor itself; call
      ``opt.wait_params()`` before those, or pass ``False`` (``step()`` then returns with the
      model current, at the cost of the gather's time). Profiled steps on gloo do not overlap
      (``Comm._launched``).
    * ``nonfinite``: what a step does when the gradient holds an inf or NaN (without a loss
      scaler): ``"skip"`` it on every rank, touching no state, or ``"raise"`` an error naming the
      parameters. With fp16 loss scaling, overflowing steps are always skipped.
    * ``master``: ``"fp32"`` (4 bytes/element for 16-bit params) or ``"remainder"`` (bf16 params
      only: the bf16 weight plus an int16 remainder are the FP32 master exactly, 2 bytes/element,
      bit-identical training; zero_adam.master).
    * ``offload``: ``"cpu"`` keeps master weights and moments in (pinned) host memory and runs the
      update there, bucket by bucket, overlapping transfers with the next bucket's update.
    * ``max_inflight``: stage 2 keeps at most this many bucket-sized gradient buffers in flight
      during backward (older reductions are finished first), bounding gradient memory; on gloo
      also the exchanges in flight, each with a receive buffer ((N-1)/N of a bucket).
    """

    stage: int = 2
    bucket_mb: float = 25.0
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype | None = None
    max_grad_norm: float | None = None
    accumulate: str | None = None
    reduce_collective: str = "auto"
    gather_collective: str = "auto"
    sync_params: bool = True
    overlap_gather: bool = True
    max_inflight: int = 2
    nonfinite: str = "skip"
    master: str = "fp32"
    offload: str | None = None

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid ZeroAdamW options:\n  - " + "\n  - ".join(problems))
        if self.accumulate is None:
            object.__setattr__(self, "accumulate", "local" if self.stage == 1 else "shard")

    @property
    def bucket_numel(self) -> int:
        """Elements per bucket: ``bucket_mb`` MiB of ``reduce_dtype``, at least one."""
        itemsize = torch.empty((), dtype=self.reduce_dtype).element_size()
        return max(1, int(self.bucket_mb * 2**20) // itemsize)


def _problems(o: ShardingOptions) -> list[str]:
    out = []
    if isinstance(o.stage, bool) or o.stage not in (1, 2):
        out.append(f"stage={o.stage!r}: must be 1 (shard master weights and moments) or 2 "
                   "(also shard gradients)")
    if isinstance(o.bucket_mb, bool) or not isinstance(o.bucket_mb, (int, float)) \
            or not math.isfinite(o.bucket_mb) or o.bucket_mb <= 0:
        out.append(f"bucket_mb={o.bucket_mb!r}: must be a positive number of MiB, e.g. 25")
    if o.param_dtype is not None and o.param_dtype not in FLOAT_DTYPES:
        out.append(f"param_dtype={o.param_dtype!r}: must be None or a floating torch.dtype "
                   "such as torch.bfloat16")
    if o.reduce_dtype not in FLOAT_DTYPES:
        out.append(f"reduce_dtype={o.reduce_dtype!r}: must be a floating torch.dtype such as "
                   "torch.float32")
    if o.grad_dtype is not None and o.grad_dtype not in FLOAT_DTYPES:
        out.append(f"grad_dtype={o.grad_dtype!r}: must be None or a floating torch.dtype")
    if o.max_grad_norm is not None and (
            isinstance(o.max_grad_norm, bool) or not isinstance(o.max_grad_norm, (int, float))
            or not math.isfinite(o.max_grad_norm) or o.max_grad_norm <= 0):
        out.append(f"max_grad_norm={o.max_grad_norm!r}: must be None (no clipping) or a "
                   "positive number, e.g. 1.0")
    if o.accumulate is not None and o.accumulate not in ACCUMULATE_MODES:
        out.append(f"accumulate={o.accumulate!r}: must be None, 'local' or 'shard'")
    if o.accumulate == "shard" and o.stage == 1:
        out.append("accumulate='shard' needs stage=2: stage 1 keeps a full gradient buffer and "
                   "reduces it once per step; use accumulate='local' or stage=2")
    if isinstance(o.max_inflight, bool) or not isinstance(o.max_inflight, int) or o.max_inflight < 1:
        out.append(f"max_inflight={o.max_inflight!r}: must be a positive integer, e.g. 2")
    if o.master not in ("fp32", "remainder"):
        out.append(f"master={o.master!r}: must be 'fp32' or 'remainder'")
    if o.offload not in (None, "cpu"):
        out.append(f"offload={o.offload!r}: must be None or 'cpu'")
    if o.master == "remainder" and o.offload == "cpu":
        out.append("master='remainder' with offload='cpu': an offloaded master lives in host memory "
                   "already; choose one of them")
    if o.nonfinite not in ("skip", "raise"):
        out.append(f"nonfinite={o.nonfinite!r}: must be 'skip' or 'raise'")
    if not isinstance(o.overlap_gather, bool):
        out.append(f"overlap_gather={o.overlap_gather!r}: must be True or False")
    if not isinstance(o.sync_params, bool):
        out.append(f"sync_params={o.sync_params!r}: must be True or False")
    return out
