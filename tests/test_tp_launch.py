"""The 70B path, end to end on 4 gloo processes: DP x TP from YAML, checkpoint, kill, resume on
another DP size, consolidate, strict-load the full weights into the TP=1 model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_train import QUICK, ROOT, kill_after_checkpoint, launch, metrics, run

from launch.config import load_config
from launch.data import batch, load_corpus
from launch.model import build_model

ARGS = ["train.steps=8", "train.log_every=2", "train.eval_every=4", "checkpoint.every=2"]


def curve(rows: list[dict]) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in rows for k in ("loss", "val_loss", "grad_norm") if k in r]


def close(a: list, b: list, tol: float) -> bool:
    return [x[:2] for x in a] == [x[:2] for x in b] and all(abs(x[2] - y[2]) <= tol for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tp")
    return {"dir": base, "tp1": run(base / "tp1", 2, *ARGS),
            "tp2": run(base / "tp2", 4, *ARGS, "parallel.tp=2")}


def test_tp2_loss_curve_matches_tp1(tp_runs):
    """Same data-parallel size (2), TP=2 on 4 processes vs TP=1 on 2: fp32, <= 1e-4 per logged value."""
    a, b = curve(tp_runs["tp1"]), curve(tp_runs["tp2"])
    assert len(a) == 11 and close(a, b, 1e-4), (a, b)


def test_kill_resume_on_1x2_then_2x2_consolidate_and_load_at_tp1(tmp_path):
    """2x2 is killed after its step-4 checkpoint, resumes as 1x2 to step 6, then as 2x2 to step 8:
    the curve of one straight 2x2 run (to 1e-4: the DP size changes the reduction order)."""
    long = ["train.steps=16", "train.log_every=2", "train.eval_every=4", "checkpoint.every=2",
            "parallel.tp=2"]
    straight = run(tmp_path / "straight", 4, *long, "train.stop_at=8")
    out = tmp_path / "job"
    kill_after_checkpoint(out, 4, 4, *long)
    for later in (out / "ckpt").glob("step_*"):   # resume from step 4 whatever else got written
        if later.name > "step_00000004":
            shutil.rmtree(later)
    one = launch(out, 2, *long, "train.stop_at=6")       # 1 x 2
    assert "step_00000004 at step 4" in one.stdout and "1 data-parallel x 2 tensor-parallel" in one.stdout
    two = launch(out, 4, *long, "train.stop_at=8")       # 2 x 2 again
    assert "step_00000006 at step 6" in two.stdout
    assert close(curve(metrics(out)), curve(straight), 1e-4), (metrics(out), straight)

    ckpt = out / "ckpt" / "step_00000008"
    full = tmp_path / "full.safetensors"
    done = subprocess.run([sys.executable, "-m", "zero_adam.consolidate", str(ckpt), str(full)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file
    cfg = load_config(ROOT / "configs/tiny.yaml", QUICK)
    model = build_model(cfg.model)
    model.load_state_dict(load_file(full), strict=True)    # the TP=1 model, every name, full shapes
    t = cfg.train
    corpus = load_corpus(cfg.data, t.seq_len, cfg.model.vocab_size)
    x, y = batch(corpus.val, seed=t.seed + 1_000_003, step=0, global_batch=t.global_batch, lo=0,
                 hi=t.global_batch, seq_len=t.seq_len)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    logged = [r["val_loss"] for r in metrics(out) if r.get("step") == 8 and "val_loss" in r]
    assert logged and loss == pytest.approx(logged[0], abs=1e-5)

    refused = launch(tmp_path / "tp1", None, "train.steps=16", f"checkpoint.resume={ckpt}", ok=False)
    assert refused.returncode == 2
    assert "saved with tensor parallelism 2" in refused.stderr and "Resume at TP=2" in refused.stderr


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=3", "parallel.tp=3: model.n_heads=4 is not divisible by 3"),
    ("parallel.tp=0", "parallel.tp=0: input should be greater than or equal to 1"),
    ("train.activation_checkpointing=every:0", "expected none, full (every block) or every:K"),
])
def test_bad_parallel_settings_exit_2_before_training(override, message):
    done = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config",
                           str(ROOT / "configs/tiny.yaml"), override, "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_tp_must_divide_the_world(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *QUICK,
           f"logging.out_dir={tmp_path}", "parallel.tp=4", "model.n_kv_heads=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr   # torchrun reports the workers' 2
    assert "parallel.tp=4: must divide the number of processes (2)" in done.stderr


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    none = run(tmp_path / "none", None)
    for mode in ("full", "every:3"):
        got = run(tmp_path / mode.replace(":", ""), None, f"train.activation_checkpointing={mode}")
        assert curve(got) == curve(none)


def test_bf16_params_run_the_forward_in_bf16():
    from launch.optim import build_optimizer
    cfg = load_config(ROOT / "configs/tiny.yaml", ["optim.param_dtype=bfloat16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 1)
    model.layers[0].attn_norm.weight.requires_grad_(False)        # frozen ones are cast too
    opt = build_optimizer(model, cfg.optim)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randint(0, 256, (2, 32))
    seen = []
    model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    F.cross_entropy(model(x).float().flatten(0, 1), x.flatten()).backward()
    opt.step()
    assert seen == [torch.bfloat16]
    opt.close()
