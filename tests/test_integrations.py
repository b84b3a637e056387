"""Accelerate + transformers, and migration from DeepSpeed (optional extras: skipped without them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _spawn

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def example(tmp: Path, *args: str, nproc: int = 2) -> dict:
    out = tmp / f"losses-{len(list(tmp.glob('losses-*')))}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "launch/hf_example.py"), "--out", str(out), "--state-dir", str(tmp / "state"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    assert done.returncode == 0, "\n".join(errors[-20:]) + done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return {"ddp": example(tmp, "--mode", "ddp"), "zero": example(tmp, "--mode", "zero", "--save-at", "6"),
            "resumed": example(tmp, "--mode", "zero", "--resume-at", "6")}


def test_accelerate_zero_adam_matches_ddp_adamw(runs):
    """12 steps x 2 micro-steps with clipping and an LR schedule: the same losses to fp32 rounding."""
    z, d = runs["zero"]["losses"], runs["ddp"]["losses"]
    assert len(z) == len(d) == 24
    assert max(abs(a - b) for a, b in zip(z, d)) < 1e-4, list(zip(z, d))
    assert z[-1] < z[0]


def test_accelerate_accumulation_both_stages_on_one_and_two_processes(tmp_path, runs):
    """Accelerate enters no_sync only when distributed: on one process every micro-step's backward
    reaches the optimizer outside it. Both stages must still accumulate exactly like AdamW (two
    processes, stage 2: the `runs` fixture; the schedule makes 4 steps a prefix of 12)."""
    one = example(tmp_path, "--mode", "ddp", "--steps", "4", nproc=1)["losses"]
    cases = [(1, "1", one), (1, "2", one), (2, "1", runs["ddp"]["losses"][:8])]
    for nproc, stage, ref in cases:
        got = example(tmp_path, "--mode", "zero", "--stage", stage, "--steps", "4", nproc=nproc)["losses"]
        assert len(got) == len(ref) == 8
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (nproc, stage, list(zip(got, ref)))


def test_accelerate_bf16_autocast_applies_to_zero_adam_models(tmp_path):
    """mixed_precision="bf16" autocasts the forward of a model prepared through
    zero_adam.integrations.accelerate.prepare exactly as accelerator.prepare does for DDP + AdamW
    (Trainer's bf16=True goes the same way): the bf16 losses agree, and differ from FP32's."""
    args = ("--steps", "3", "--accum", "1")
    bf16 = {m: example(tmp_path, "--mode", m, "--mixed-precision", "bf16", *args, nproc=1)["losses"]
            for m in ("ddp", "zero")}
    fp32 = example(tmp_path, "--mode", "zero", *args, nproc=1)["losses"]
    assert max(abs(a - b) for a, b in zip(bf16["zero"], bf16["ddp"])) < 1e-4, bf16
    assert max(abs(a - b) for a, b in zip(bf16["zero"], fp32)) > 1e-4, "bf16 autocast did not engage"


def test_accelerate_save_and_load_state_round_trip(runs):
    assert runs["resumed"]["start"] == 6
    assert runs["resumed"]["losses"] == runs["zero"]["losses"][12:], "resumed run must continue exactly"


def test_deepspeed_zero2_checkpoint_migrates_with_moments(tmp_path):
    pytest.importorskip("deepspeed")
    r = _spawn.run(2, "ds_cases:make_and_migrate", str(tmp_path), env={"DS_ACCELERATOR": "cpu"},
                   timeout=300)[0]
    assert r["ds_world"] == 2 and r["step"] == 3.0 and r["lr"] == 1e-2
    assert r["weights_at_save"] == 0.0
    # continuing on one rank from the migrated weights and moments follows DeepSpeed's own run
    assert r["continued_vs_deepspeed"] < 1e-5, r
