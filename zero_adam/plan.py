"""Partition plan: parameters -> buckets -> per-rank contiguous shards.

Pure (no processes, no tensors allocated), so the math is unit-tested directly and the memory planner
uses exactly what the runtime uses. Two deliberate properties:

* Bucket boundaries never depend on the world size. Only the final division of each (padded) bucket
  into N equal shards does. The same model always yields the same buckets, which is what makes a
  checkpoint keyed by (parameter name, element range) loadable on any number of ranks.
* Each bucket is padded only at its end, so that it splits into N equal, ``align``-multiple shards
  that cross parameter boundaries freely: at most ``align`` padding elements per rank per bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_ALIGN = 64
"""Shard granularity in elements: 128 B of bf16, 256 B of fp32 (whole cache lines and NCCL-friendly)."""


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """What the plan needs to know about one trainable parameter (its local shape for DTensors)."""

    key: str
    group: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    tp_sharded: bool = False   # a tensor-parallel shard: disjoint across TP ranks

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Slot:
    """Where parameter ``param`` (an index into ``Plan.params``) lives inside its bucket."""

    param: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    index: int
    group: int
    dtype: torch.dtype
    slots: tuple[Slot, ...]
    tp_sharded: bool = False

    @property
    def numel(self) -> int:
        """Elements holding parameters (without padding)."""
        last = self.slots[-1]
        return last.offset + last.numel


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that falls into one rank's shard.

    ``param_lo:param_hi`` indexes the flattened parameter; ``shard_lo`` is where it starts in the shard.
    """

    param: int
    param_lo: int
    param_hi: int
    shard_lo: int


@dataclass(frozen=True)
class Plan:
    params: tuple[ParamSpec, ...]
    buckets: tuple[Bucket, ...]
    align: int

    def padded_numel(self, bucket: Bucket, world_size: int) -> int:
        unit = world_size * self.align
        return -(-bucket.numel // unit) * unit

    def shard_numel(self, bucket: Bucket, world_size: int) -> int:
        return self.padded_numel(bucket, world_size) // world_size

    def shard_range(self, bucket: Bucket, rank: int, world_size: int) -> tuple[int, int]:
        """Element range ``[lo, hi)`` of the bucket that ``rank`` owns."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        n = self.shard_numel(bucket, world_size)
        return rank * n, (rank + 1) * n

    def pieces(self, bucket: Bucket, rank: int, world_size: int) -> list[Piece]:
        """The parameter pieces inside ``rank``'s shard of ``bucket``, in bucket order."""
        lo, hi = self.shard_range(bucket, rank, world_size)
        out = []
        for s in bucket.slots:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                out.append(Piece(s.param, a - s.offset, b - s.offset, a - lo))
        return out

    def padding(self, bucket: Bucket, world_size: int) -> int:
        return self.padded_numel(bucket, world_size) - bucket.numel

    def fingerprint(self) -> str:
        """A digest of everything that must agree across ranks (names, shapes, dtypes, buckets)."""
        return hashlib.sha256("\n".join(self.describe()).encode()).hexdigest()[:16]

    def describe(self) -> list[str]:
        """One human-readable line per parameter and per bucket (used to explain a mismatch)."""
        lines = [f"align={self.align}"]
        for p in self.params:
            lines.append(f"param {p.key}: group {p.group}, shape {list(p.shape)}, {p.dtype}"
                         + (", TP-sharded" if p.tp_sharded else ""))
        for b in self.buckets:
            keys = ",".join(self.params[s.param].key for s in b.slots)
            lines.append(f"bucket {b.index}: group {b.group}, {b.dtype}, {b.numel} elements [{keys}]")
        return lines


def extend_plan(plan: Plan, params: Sequence[ParamSpec], *, bucket_numel: int) -> Plan:
    """``plan`` plus buckets for ``params`` (a param group added after construction), appended
    after the existing buckets so that nothing already sharded moves."""
    more = build_plan(params, bucket_numel=bucket_numel, align=plan.align)
    n_params, n_buckets = len(plan.params), len(plan.buckets)
    shifted = tuple(
        Bucket(b.index + n_buckets, b.group, b.dtype,
               tuple(Slot(s.param + n_params, s.offset, s.numel) for s in b.slots), b.tp_sharded)
        for b in more.buckets)
    return Plan(plan.params + more.params, plan.buckets + shifted, plan.align)


def build_plan(
    params: Sequence[ParamSpec], *, bucket_numel: int, align: int = DEFAULT_ALIGN
) -> Plan:
    """Group params into buckets of at most ``bucket_numel`` elements by (param group, dtype, and
    whether they are tensor-parallel shards: the gradient norm treats those differently).

    Backward produces gradients roughly in reverse registration order, so each bucket is filled
    from the end of the parameter list, and buckets are ordered by when their *last* gradient is
    expected: the first bucket listed is the first one that can be reduced during backward. A param
    larger than ``bucket_numel`` gets a bucket of its own (it is never split across buckets).
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket size must be at least one element, got {bucket_numel}")
    if align < 1:
        raise ValueError(f"align must be positive, got {align}")
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"parameter names must be unique; repeated: {dup}")
    for p in params:
        if p.numel == 0:
            raise ValueError(f"parameter {p.key} has no elements (shape {list(p.shape)})")

    drafts: list[tuple[int, int, torch.dtype, list[int], bool]] = []
    for (group, dtype, sharded), members in _by_group_and_dtype(params).items():
        current: list[int] = []
        size = 0
        for i in reversed(members):
            n = params[i].numel
            if current and size + n > bucket_numel:
                drafts.append((-min(current), group, dtype, current, sharded))
                current, size = [], 0
            current.append(i)
            size += n
        if current:
            drafts.append((-min(current), group, dtype, current, sharded))
    drafts.sort(key=lambda d: (d[0], d[1]))

    buckets = []
    for index, (_, group, dtype, members, sharded) in enumerate(drafts):
        slots, offset = [], 0
        for i in members:
            slots.append(Slot(i, offset, params[i].numel))
            offset += params[i].numel
        buckets.append(Bucket(index, group, dtype, tuple(slots), sharded))
    return Plan(tuple(params), tuple(buckets), align)


def trainable_specs(param_groups: Sequence[dict], param_dtype: torch.dtype | None = None,
                    tp_rule=None, first_group: int = 0) -> tuple[list[torch.Tensor], list[ParamSpec]]:
    """The trainable tensors of torch-style param groups and their specs, in plan order.

    Keys are the groups' ``param_names`` when given (``named_parameters()``), else positions.
    DTensor parameters contribute their local shape. ``tp_rule(key, shape) -> (local_shape,
    sharded)`` describes tensor parallelism for plain tensors (the planner sizing a TP run).
    Zero-element parameters have nothing to shard or update and are left out (as DeepSpeed does).
    ``first_group`` numbers the groups from there (``add_param_group``).
    """
    from .dtensor import local, tp_sharded
    tensors, specs = [], []
    for gi, group in enumerate(param_groups, start=first_group):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if not p.requires_grad or local(p).numel() == 0:
                continue
            key = names[i] if names else f"param_groups.{gi}.params.{i}"
            shape, sharded = tuple(local(p).shape), tp_sharded(p)
            if tp_rule is not None:
                shape, sharded = tp_rule(key, shape)
            specs.append(ParamSpec(key=key, group=gi, shape=tuple(shape), dtype=param_dtype or p.dtype,
                                   tp_sharded=sharded))
            tensors.append(p)
    return tensors, specs


def _by_group_and_dtype(params: Iterable[ParamSpec]) -> dict[tuple[int, torch.dtype, bool], list[int]]:
    out: dict[tuple[int, torch.dtype, bool], list[int]] = {}
    for i, p in enumerate(params):
        out.setdefault((p.group, p.dtype, p.tp_sharded), []).append(i)
    return out
