"""Pure partition-plan tests: no processes, no tensors."""

from __future__ import annotations

import pytest
import torch

from zero_adam.plan import ParamSpec, build_plan

SHAPES = [(17, 257), (257,), (1,), (33, 257), (33,), (5, 7, 3), (1000,), (64, 64)]


def specs(shapes=SHAPES, dtype=torch.float32, groups=None):
    return [ParamSpec(key=f"p{i}", group=(groups[i] if groups else 0), shape=s, dtype=dtype)
            for i, s in enumerate(shapes)]


@pytest.mark.parametrize("bucket_numel", [1, 100, 1000, 5000, 10**6])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 7, 8, 16, 64])
def test_shards_cover_every_element_once(bucket_numel, world_size):
    plan = build_plan(specs(), bucket_numel=bucket_numel, align=64)
    covered = {i: [] for i in range(len(plan.params))}
    for b in plan.buckets:
        padded = plan.padded_numel(b, world_size)
        shard = plan.shard_numel(b, world_size)
        assert padded == shard * world_size, "equal shards"
        assert shard % plan.align == 0
        assert 0 <= plan.padding(b, world_size) < world_size * plan.align
        # per rank: at most one alignment unit of padding
        ranges = [plan.shard_range(b, r, world_size) for r in range(world_size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == padded
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world_size - 1)), "contiguous"
        for r in range(world_size):
            lo, hi = ranges[r]
            pad_here = max(0, hi - max(lo, b.numel))
            assert pad_here <= hi - lo
            for piece in plan.pieces(b, r, world_size):
                covered[piece.param].append((piece.param_lo, piece.param_hi))
                assert 0 <= piece.shard_lo < hi - lo
    for i, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == plan.params[i].numel, "coverage"
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "no gap, no overlap"


def test_padding_is_at_most_one_unit_per_rank():
    plan = build_plan(specs(), bucket_numel=10**6, align=64)
    (b,) = plan.buckets
    for ws in range(1, 65):
        pad = plan.padding(b, ws)
        assert pad < ws * 64
        # the padding sits at the end: every rank but the last few is full of parameters
        assert plan.padded_numel(b, ws) - pad == b.numel


def test_bucket_boundaries_do_not_depend_on_world_size():
    plan = build_plan(specs(), bucket_numel=2000)
    again = build_plan(specs(), bucket_numel=2000)
    assert plan == again and plan.fingerprint() == again.fingerprint()
    # world size appears only in the division, never in the plan itself
    assert all(not hasattr(b, "world_size") for b in plan.buckets)


def test_buckets_split_by_group_and_dtype_and_respect_cap():
    shapes = [(10,), (20,), (30,), (40,)]
    s = specs(shapes, groups=[0, 1, 0, 1])
    s[2] = ParamSpec(key="p2", group=0, shape=(30,), dtype=torch.bfloat16)
    plan = build_plan(s, bucket_numel=45)
    for b in plan.buckets:
        assert len({(plan.params[x.param].group, plan.params[x.param].dtype) for x in b.slots}) == 1
        assert b.numel <= 45 or len(b.slots) == 1
    assert sorted(x.param for b in plan.buckets for x in b.slots) == [0, 1, 2, 3]


def test_large_param_is_cut_into_chunk_buckets_and_order_follows_backward():
    plan = build_plan(specs([(10,), (500,), (10,), (10,)]), bucket_numel=100, align=8, world_size=3)
    members = [[s.param for s in b.slots] for b in plan.buckets]
    assert members == [[3, 2]] + [[1]] * 6 + [[0]], "reverse registration order, big param in chunks"
    assert [s.offset for s in plan.buckets[0].slots] == [0, 10]
    chunks = [b.slots[0] for b in plan.buckets[1:7]]
    assert [(c.start, c.numel) for c in chunks] == [(0, 96), (96, 96), (192, 96), (288, 96), (384, 96),
                                                   (480, 20)], "multiples of N x align, in order"
    assert all(plan.padding(b, 3) == 0 for b in plan.buckets[1:6]) and plan.padding(plan.buckets[6], 3) == 4
    split = plan.split_params()
    assert list(split) == [1] and plan.storage_numel(split[1]) == 480 + 24
    covered = sorted((p.param_lo, p.param_hi) for b in plan.buckets[1:7] for r in range(3)
                     for p in plan.pieces(b, r, 3))
    assert covered[0][0] == 0 and covered[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), "every element owned once"
    with pytest.raises(ValueError, match="build it for world_size=2"):
        plan.check_world(2)


def test_fingerprint_changes_with_shape_name_or_dtype():
    base = build_plan(specs(), bucket_numel=1000).fingerprint()
    s = specs()
    s[1] = ParamSpec(key="p1", group=0, shape=(256,), dtype=torch.float32)
    assert build_plan(s, bucket_numel=1000).fingerprint() != base
    assert build_plan(specs(dtype=torch.bfloat16), bucket_numel=1000).fingerprint() != base
    s = specs()
    s[0] = ParamSpec(key="renamed", group=0, shape=(17, 257), dtype=torch.float32)
    assert build_plan(s, bucket_numel=1000).fingerprint() != base


def test_bad_plans_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        build_plan(specs([(3,), (4,)]) + specs([(3,)]), bucket_numel=10)
    with pytest.raises(ValueError, match="no elements"):
        build_plan(specs([(0, 3)]), bucket_numel=10)
    with pytest.raises(ValueError, match="at least one"):
        build_plan(specs(), bucket_numel=0)
    plan = build_plan(specs(), bucket_numel=10)
    with pytest.raises(ValueError, match="outside"):
        plan.shard_range(plan.buckets[0], 4, 4)
