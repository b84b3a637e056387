"""Partition plan: parameters -> buckets -> per-rank contiguous shards.

Pure (no processes, no tensors allocated), so the math is unit-tested directly and the memory planner
uses exactly what the runtime uses. Two deliberate properties:

* Bucket boundaries do not depend on the world size, with one exception: a parameter larger than a
  bucket is cut into chunks of its own buckets, each a multiple of N x ``align`` elements (only the
  last one padded), so that the chunks tile one contiguous parameter. Checkpoints are keyed by
  (parameter name, element range), so they load on any number of ranks whatever the cut.
* Each bucket is padded only at its end, so that it splits into N equal, ``align``-multiple shards
  that cross parameter boundaries freely: at most ``align`` padding elements per rank per bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
    """Where parameter ``param`` (an index into ``Plan.params``) lives inside its bucket: elements
    ``[start, start + numel)`` of the flattened parameter (all of it unless the parameter is split)."""

    param: int
    offset: int
    numel: int
    start: int = 0


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
    world_size: int = 1    # the N that split parameters were cut for

    def split_params(self) -> dict[int, list[Bucket]]:
        """Parameters cut across several buckets -> their chunk buckets, in element order."""
        out: dict[int, list[Bucket]] = {}
        for b in self.buckets:
            if b.slots[0].numel != self.params[b.slots[0].param].numel:
                out.setdefault(b.slots[0].param, []).append(b)
        return out

    def storage_numel(self, chunks: Sequence[Bucket]) -> int:
        """Elements of the one buffer a split parameter's chunk buckets tile (last chunk padded)."""
        last = chunks[-1]
        return last.slots[0].start + self.padded_numel(last, self.world_size)

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size and self.split_params():
            raise ValueError(f"this plan cuts parameters larger than a bucket for {self.world_size} "
                             f"ranks; build it for world_size={world_size}")

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
                out.append(Piece(s.param, a - s.offset + s.start, b - s.offset + s.start, a - lo))
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
            keys = ",".join(self.params[s.param].key + (f"[{s.start}:{s.start + s.numel}]" if
                            s.numel != self.params[s.param].numel else "") for s in b.slots)
            lines.append(f"bucket {b.index}: group {b.group}, {b.dtype}, {b.numel} elements [{keys}]")
        return lines


def extend_plan(plan: Plan, params: Sequence[ParamSpec], *, bucket_numel: int) -> Plan:
    """``plan`` plus buckets for ``params`` (a param group added after construction), appended
    after the existing buckets so that nothing already sharded moves."""
    more = build_plan(params, bucket_numel=bucket_numel, align=plan.align, world_size=plan.world_size)
    n_params, n_buckets = len(plan.params), len(plan.buckets)
    shifted = tuple(
        Bucket(b.index + n_buckets, b.group, b.dtype,
               tuple(Slot(s.param + n_params, s.offset, s.numel, s.start) for s in b.slots), b.tp_sharded)
        for b in more.buckets)
    return Plan(plan.params + more.params, plan.buckets + shifted, plan.align, plan.world_size)


def build_plan(
    params: Sequence[ParamSpec], *, bucket_numel: int, align: int = DEFAULT_ALIGN, world_size: int = 1
) -> Plan:
    """Group params into buckets of at most ``bucket_numel`` elements by (param group, dtype, and
    whether they are tensor-parallel shards: the gradient norm treats those differently).

    Backward produces gradients roughly in reverse registration order, so each bucket is filled
    from the end of the parameter list, and buckets are ordered by when their *last* gradient is
    expected: the first bucket listed is the first one that can be reduced during backward. A param
    larger than ``bucket_numel`` is cut into chunks, one bucket each, of a multiple of
    ``world_size x align`` elements: stage 2 then never holds a gradient buffer larger than a
    bucket, whatever the largest parameter (a 70B model's embedding is 1.05B elements).
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket size must be at least one element, got {bucket_numel}")
    if align < 1 or world_size < 1:
        raise ValueError(f"align and world_size must be positive, got {align} and {world_size}")
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"parameter names must be unique; repeated: {dup}")
    for p in params:
        if p.numel == 0:
            raise ValueError(f"parameter {p.key} has no elements (shape {list(p.shape)})")
    unit = world_size * align
    chunk = max(unit, bucket_numel // unit * unit)

    # a draft: (order key, group, dtype, [(param, start, numel)], tp-sharded)
    drafts: list[tuple[int, int, torch.dtype, list[tuple[int, int, int]], bool]] = []
    open_: dict[tuple[int, torch.dtype, bool], list[tuple[int, int, int]]] = {}
    filled: dict[tuple[int, torch.dtype, bool], int] = {}

    def close(kind: tuple[int, torch.dtype, bool]) -> None:
        members, filled[kind] = open_.pop(kind, []), 0
        if members:
            drafts.append((-min(m[0] for m in members), kind[0], kind[1], members, kind[2]))

    for i in reversed(range(len(params))):
        p = params[i]
        kind, n = (p.group, p.dtype, p.tp_sharded), p.numel
        if n > bucket_numel and n > chunk:
            # close every open bucket first: they hold gradients that come before this one, so
            # the chunks can be reduced (in plan order) the moment the gradient arrives
            for k in list(open_):
                close(k)
            for start in range(0, n, chunk):
                drafts.append((-i, p.group, p.dtype, [(i, start, min(chunk, n - start))], p.tp_sharded))
            continue
        if open_.get(kind) and filled[kind] + n > bucket_numel:
            close(kind)
        open_.setdefault(kind, []).append((i, 0, n))
        filled[kind] = filled.get(kind, 0) + n
    for k in list(open_):
        close(k)
    drafts.sort(key=lambda d: (d[0], d[1]))   # stable: a split parameter's chunks stay in order

    buckets = []
    for index, (_, group, dtype, members, sharded) in enumerate(drafts):
        slots, offset = [], 0
        for i, start, n in members:
            slots.append(Slot(i, offset, n, start))
            offset += n
        buckets.append(Bucket(index, group, dtype, tuple(slots), sharded))
    return Plan(tuple(params), tuple(buckets), align, world_size)


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
