"""End to end: launch/train.py under torchrun on 2 CPU processes, and as one plain process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["train.steps=6", "train.eval_every=3", "train.log_every=2", "train.eval_batches=1",
         "train.global_batch=8", "train.micro_batch=2", "data.max_bytes=300000", "logging.progress=false"]


def run(out: Path, nproc: int | None) -> list[dict]:
    args = [str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *QUICK,
            f"logging.out_dir={out}"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
           if nproc else [sys.executable]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {"a": run(base / "a", 2), "b": run(base / "b", 2), "single": run(base / "single", None),
            "dir": base}


def test_metrics_are_written_and_finite(runs):
    rows = runs["a"]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mem_bytes"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert (runs["dir"] / "a" / "loss.png").stat().st_size > 1000


def test_same_seed_same_losses(runs):
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(runs["a"]) == strip(runs["b"])


def test_one_process_matches_two(runs):
    """The global batch does not depend on the world size, so the curves agree to rounding."""
    two = [r["val_loss"] for r in runs["a"] if "val_loss" in r]
    one = [r["val_loss"] for r in runs["single"] if "val_loss" in r]
    assert one == pytest.approx(two, rel=1e-4)
    mem2 = [r["mem_bytes"] for r in runs["a"] if "mem_bytes" in r][0]
    mem1 = [r["mem_bytes"] for r in runs["single"] if "mem_bytes" in r][0]
    assert mem2 < mem1, "sharding must shrink this rank's optimizer bytes"
