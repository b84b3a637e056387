"""The memory planner: exact against the runtime's own tensors, the ZeRO paper, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zero_adam import ZeroAdamW
from zero_adam.memory import estimate, plan_params

from _models import batch, loss_fn, make_model, named_groups

ROOT = Path(__file__).resolve().parent.parent
PLAN = [sys.executable, str(ROOT / "launch/plan.py")]

VARIANTS = [
    dict(stage=1), dict(stage=2), dict(stage=1, param_dtype=torch.bfloat16),
    dict(stage=2, param_dtype=torch.bfloat16), dict(stage=1, reduce_dtype=torch.bfloat16),
    dict(stage=2, grad_dtype=torch.bfloat16), dict(stage=1, reduce_dtype=torch.bfloat16,
                                                   grad_dtype=torch.bfloat16, param_dtype=torch.bfloat16),
    dict(stage=2, amsgrad=True),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=[str(sorted(v.items())) for v in VARIANTS])
def test_runtime_tensors_equal_the_plan_to_the_byte(kw):
    model = make_model()
    opt = ZeroAdamW(named_groups(model), bucket_mb=0.004, **kw)
    plan = plan_params(named_groups(make_model()), param_dtype=kw.get("param_dtype"), bucket_mb=0.004,
                       reduce_dtype=kw.get("reduce_dtype", torch.float32))
    assert plan.fingerprint() == opt.plan.fingerprint(), "the planner must build the runtime's plan"
    e = estimate(plan, 1, stage=kw["stage"], reduce_dtype=kw.get("reduce_dtype", torch.float32),
                 grad_dtype=kw.get("grad_dtype"), amsgrad=kw.get("amsgrad", False)).device
    from _models import batch, loss_fn
    for s in range(2):
        loss_fn(model, *batch(s, 8)).backward()
        opt.step()
    got = opt.memory_report()
    for field in ("params", "grads", "master", "exp_avg", "exp_avg_sq"):
        assert got[field] == getattr(e, field), (field, got, e)
    assert got["buffers"] <= e.buffers


def plan_cli(*args, ok=True):
    run = subprocess.run(PLAN + list(args), capture_output=True, text=True, timeout=120, cwd=ROOT)
    if ok:
        assert run.returncode == 0, run.stderr
    return run


def test_zero_paper_figure_1():
    """Psi = 7.5B, N = 64, fp16 params and grads, K = 12: 120 / 31.4 / 16.6 GB."""
    common = ["--params", "7.5e9", "--world-size", "64", "--param-dtype", "float16", "--reduce-dtype",
              "float16", "--grad-dtype", "float16", "--json"]
    one = json.loads(plan_cli(*common, "--stage", "1").stdout)
    two = json.loads(plan_cli(*common, "--stage", "2").stdout)
    assert round(one["unsharded_model_states_bytes"] / 1e9, 1) == 120.0
    assert round(one["model_states_bytes"] / 1e9, 1) == 31.4
    assert round(two["model_states_bytes"] / 1e9, 1) == 16.6
    assert one["params"] == 7_500_000_000
    assert set(two["per_rank_bytes"]) == {"params", "grads", "master", "exp_avg", "exp_avg_sq", "buffers",
                                          "total"}


def test_llama3_70b_needs_tensor_parallelism_or_offload():
    dp = json.loads(plan_cli("--config", "configs/llama3_70b.yaml", "--world-size", "64", "--tp", "1",
                             "--gpu-mem", "80", "--json").stdout)
    assert dp["params"] == 70_553_706_496
    assert dp["per_rank_bytes"]["params"] == 2 * 70_553_706_496, "ZeRO-1/2 keep the full bf16 params"
    assert dp["fits"] is False and dp["smallest_fit"]["gpus"] <= 64
    tp = json.loads(plan_cli("--config", "configs/llama3_70b.yaml", "--world-size", "16", "--tp", "8",
                             "--gpu-mem", "80", "--json").stdout)
    assert tp["fits"] is True and tp["per_rank_bytes"]["total"] < 30 * 2**30
    text = plan_cli("--config", "configs/llama3_70b.yaml", "--world-size", "64", "--tp", "1",
                    "--gpu-mem", "80").stdout
    assert "does NOT fit in 80 GiB" in text and "smallest that fits:" in text


def test_shipped_llama3_70b_config_fits_80_gib_with_activations():
    """The config's own parallel.tp and activation checkpointing, at the world size its header names."""
    plan = json.loads(plan_cli("--config", "configs/llama3_70b.yaml", "--world-size", "16", "--gpu-mem", "80",
                               "--json").stdout)
    acts = plan["activation_bytes"]
    assert plan["tp"] == 8 and plan["fits"] is True
    assert plan["peak_bytes"] == plan["per_rank_bytes"]["total"] + acts["total"] < 80 * 2**30
    assert acts["blocks"] == 80 * 8192 * 8192 * 2, "full checkpointing keeps each block's bf16 input"
    header = (ROOT / "configs/llama3_70b.yaml").read_text()
    assert f"peak {plan['peak_bytes'] / 2**30:.2f} GiB" in header
    no_ac = json.loads(plan_cli("--config", "configs/llama3_70b.yaml", "--world-size", "16",
                                "--gpu-mem", "80", "--activation-checkpointing", "none", "--json").stdout)
    assert no_ac["fits"] is False and no_ac["activation_bytes"]["total"] > 100 * 2**30


def test_activation_estimate_matches_a_measured_2_rank_peak():
    """One configuration of bench/activation_check.py (DP 1 x TP 2, fp32, no checkpointing): the
    planner's peak (model states + buffers + activations) against the measured peak RSS growth."""
    run = subprocess.run([sys.executable, "bench/activation_check.py", "--runs", "fp32-tp2", "bf16-every2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    ratios = [float(line.rsplit("|", 2)[1]) for line in run.stdout.splitlines()
              if line.startswith(("| fp32-tp2", "| bf16-every2"))]
    assert len(ratios) == 2 and all(0.9 <= r <= 1.1 for r in ratios), run.stdout


def test_offload_moves_optimizer_state_to_the_host():
    base = json.loads(plan_cli("--config", "configs/llama3_8b.yaml", "--world-size", "8", "--json").stdout)
    off = json.loads(plan_cli("--config", "configs/llama3_8b.yaml", "--world-size", "8", "--offload", "cpu",
                              "--json").stdout)
    saved = base["per_rank_bytes"]["total"] - off["per_rank_bytes"]["total"]
    moved = sum(off["host_bytes"][k] for k in ("master", "exp_avg", "exp_avg_sq"))
    assert saved == moved > 0


@pytest.mark.parametrize("args,expected", [
    (["--world-size", "8"], "one of the arguments --config --params is required"),
    (["--params", "7e9", "--world-size", "0"], "--world-size must be a positive integer"),
    (["--params", "-3", "--world-size", "8"], "--params must be a positive parameter count"),
    (["--params", "7e9", "--world-size", "8", "--stage", "3"], "invalid choice: 3"),
    (["--params", "7e9", "--world-size", "8", "--tp", "2"], "--tp needs --config"),
    (["--config", "configs/llama3_8b.yaml", "--world-size", "8", "--tp", "3"], "not divisible by 3"),
    (["--config", "nowhere.yaml", "--world-size", "8"], "no such config file"),
    (["--params", "7e9", "--world-size", "x"], "invalid int value"),
])
def test_bad_planner_arguments_exit_2_without_traceback(args, expected):
    run = plan_cli(*args, ok=False)
    assert run.returncode == 2 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_large_parameters_are_cut_so_stage2_buffers_stay_bucket_sized():
    """An embedding and a head 80x a bucket: chunks of their own buckets, AdamW's result, and the
    stage-2 gradient buffers bounded by the bucket size, not by the largest parameter."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5000, 16), torch.nn.Linear(16, 5000))
    ref = copy.deepcopy(model)
    opt = ZeroAdamW(model.named_parameters(), lr=1e-2, bucket_mb=0.004)   # 1048 elements per bucket
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    assert max(b.numel for b in opt.plan.buckets) <= 1048 and len(opt.plan.split_params()) == 3
    for step in range(3):
        x = torch.randint(0, 5000, (8, 7), generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (ref, ref_opt)):
            torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
            o.step()
            o.zero_grad()
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())) < 1e-6
    plan = plan_params(model.named_parameters(), bucket_mb=0.004)
    bound = estimate(plan, 1).device.buffers
    assert opt.memory_report()["buffers"] <= bound <= 4 * 1048 * 4
    opt.close()


def test_llama3_70b_stage2_buffers_under_1_gib_at_n64_tp1():
    """Its 1.05B-element embedding and head used to get one bucket each: 9.58 GiB of buffers."""
    plan = json.loads(plan_cli("--config", "configs/llama3_70b.yaml", "--world-size", "64", "--tp", "1",
                               "--json").stdout)
    assert plan["per_rank_bytes"]["buffers"] <= 2**30


def test_step_casts_one_16bit_gradient_shard_at_a_time():
    """bf16 + remainder masters + bf16 gradient shards: the update reads each shard in FP32, one
    bucket at a time, as the planner assumes. Casting every bucket's shard first held 4/N bytes per
    parameter extra at the step (bench/capacity.py measured 2 bytes/param at N=2)."""
    from zero_adam import flat
    model = make_model()
    opt = ZeroAdamW(model.parameters(), lr=1e-2, param_dtype=torch.bfloat16, master="remainder",
                    grad_dtype=torch.bfloat16, bucket_mb=0.01)
    rest = [fb for fb in opt.buckets if not fb.plain]
    assert len(rest) >= 3
    live, most = [], [0]
    prepare, write = flat.FlatBucket.prepare_grad, flat.FlatBucket.write_master

    def counting_prepare(self):
        live.append(self)
        most[0] = max(most[0], len(live))
        return prepare(self)

    def counting_write(self, m):
        live.remove(self)
        return write(self, m)
    x, y = batch(0, 8)
    loss_fn(model, x.bfloat16(), y.bfloat16()).backward()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flat.FlatBucket, "prepare_grad", counting_prepare)
        mp.setattr(flat.FlatBucket, "write_master", counting_write)
        opt.step()
    assert most[0] == 1 and not live
    opt.close()
