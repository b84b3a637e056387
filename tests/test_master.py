"""The exact 2-byte master (bf16 + int16 remainder) and CPU offload of the optimizer state."""

from __future__ import annotations

import pytest
import torch

from zero_adam import ZeroAdamW, checkpoint
from zero_adam.kernel import join_bf16, split_bf16
from zero_adam.memory import estimate, plan_params

from _models import batch, loss_fn, make_model, named_groups


def test_split_join_is_exact_for_every_kind_of_float():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.logspace(-44, 38, 200_000)
    high = torch.randint(0, 0x7F00, (5000,), generator=g, dtype=torch.int32)
    ties = (high << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, float("inf")])
    x = torch.cat([x, ties, -ties, special])
    hi, rem = split_bf16(x)
    assert hi.dtype == torch.bfloat16 and rem.dtype == torch.int16
    assert torch.equal(join_bf16(hi, rem).view(torch.int32), x.view(torch.int32))
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(hi[~tie].view(torch.int16), x[~tie].bfloat16().view(torch.int16)), \
        "equal to round-to-nearest-even except on exact ties"
    assert bool((hi[tie].float().abs() > x[tie].abs()).all()), "ties round away from zero"


def train(steps=8, **kw):
    torch.manual_seed(0)
    model = make_model()
    opt = ZeroAdamW(named_groups(model), lr=1e-2, bucket_mb=0.004, param_dtype=torch.bfloat16,
                    max_grad_norm=0.5, **kw)
    for s in range(steps):
        loss_fn(model, *batch(s, 8)).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("stage", [1, 2])
def test_remainder_master_trains_bit_identically_to_fp32_master(stage):
    a, oa = train(stage=stage)
    b, ob = train(stage=stage, master="remainder")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for fa, fb in zip(oa.buckets, ob.buckets):
        assert torch.equal(fa.read_master(), fb.read_master())
        assert torch.equal(fa.exp_avg, fb.exp_avg) and torch.equal(fa.exp_avg_sq, fb.exp_avg_sq)
    ra, rb = oa.memory_report(), ob.memory_report()
    assert rb["master"] * 2 == ra["master"], "2 bytes instead of 4 per element"


@pytest.mark.parametrize("kw", [dict(stage=2), dict(stage=1, param_dtype=None)])
def test_offload_is_bit_identical_and_moves_state_to_the_host(kw):
    param_dtype = kw.pop("param_dtype", torch.bfloat16)

    def run(**extra):
        torch.manual_seed(0)
        model = make_model()
        opt = ZeroAdamW(named_groups(model), lr=1e-2, bucket_mb=0.004, param_dtype=param_dtype, **kw, **extra)
        for s in range(6):
            loss_fn(model, *batch(s, 8)).backward()
            opt.step()
        return model, opt
    a, oa = run()
    b, ob = run(offload="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    dev, host = ob.memory_report(), ob.memory_report("host")
    assert dev["master"] == dev["exp_avg"] == dev["exp_avg_sq"] == 0
    assert host["exp_avg"] == oa.memory_report()["exp_avg"] > 0


@pytest.mark.parametrize("kw", [dict(master="remainder", stage=2), dict(offload="cpu", stage=2),
                                dict(offload="cpu", stage=1, param_dtype=None)])
def test_planner_matches_remainder_and_offload(kw):
    param_dtype = kw.pop("param_dtype", torch.bfloat16)
    torch.manual_seed(0)
    model = make_model()
    opt = ZeroAdamW(named_groups(model), bucket_mb=0.004, param_dtype=param_dtype, **kw)
    loss_fn(model, *batch(0, 8)).backward()
    opt.step()
    plan = plan_params(named_groups(make_model()), param_dtype=param_dtype, bucket_mb=0.004)
    e = estimate(plan, 1, stage=kw["stage"], master=kw.get("master", "fp32"), offload=kw.get("offload"))
    for where, want in (("device", e.device), ("host", e.host)):
        got = opt.memory_report(where)
        for field in ("params", "grads", "master", "exp_avg", "exp_avg_sq"):
            assert got[field] == getattr(want, field), (where, field, got, want)


@pytest.mark.parametrize("save,load", [("remainder", "fp32"), ("fp32", "remainder")])
def test_checkpoints_move_between_master_modes(tmp_path, save, load):
    model, opt = train(master=save)
    path = checkpoint.save(tmp_path / "ck", model, opt)
    other = make_model(seed=3)
    opt2 = ZeroAdamW(named_groups(other), lr=1e-2, bucket_mb=0.004, param_dtype=torch.bfloat16, master=load)
    checkpoint.load(path, other, opt2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    for fa, fb in zip(opt.buckets, opt2.buckets):
        assert torch.equal(fa.read_master(), fb.read_master())


def test_remainder_refuses_fp16():
    with pytest.raises(ValueError, match="master='remainder' needs bf16"):
        ZeroAdamW(make_model().parameters(), param_dtype=torch.float16, master="remainder")
    with pytest.raises(ValueError, match="choose one of them"):
        ZeroAdamW(make_model().parameters(), master="remainder", offload="cpu")
