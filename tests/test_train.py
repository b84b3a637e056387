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


def launch(out: Path, nproc: int | None, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    args = [str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *QUICK,
            f"logging.out_dir={out}", f"checkpoint.dir={out}/ckpt", "checkpoint.every=3", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
           if nproc else [sys.executable]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if ok:
        assert done.returncode == 0, f"{cmd}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    assert "Traceback" not in done.stderr
    return done


def run(out: Path, nproc: int | None, *extra: str) -> list[dict]:
    launch(out, nproc, *extra)
    return metrics(out)


def _no_constants(name: str):
    raise AssertionError(f"metrics.jsonl must be strict JSON, found {name}")


def metrics(out: Path) -> list[dict]:
    """Parsed strictly: NaN/Infinity are not JSON and must never reach the file."""
    return [json.loads(line, parse_constant=_no_constants)
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_numbers_are_written_as_null():
    from launch.logs import to_json
    row = json.loads(to_json({"step": 3, "grad_norm": math.nan, "loss": math.inf, "lr": 1e-3}),
                     parse_constant=_no_constants)
    assert row == {"step": 3, "grad_norm": None, "loss": None, "lr": 1e-3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {"a": run(base / "a", 2), "b": run(base / "b", 2), "single": run(base / "single", None),
           "dir": base}
    run(base / "split", 2, "train.stop_at=3")
    out["split"] = run(base / "split", 2)
    return out


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


def strip(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_resumed_run_continues_the_exact_loss_curve(runs):
    """Stopped after step 3 and resumed from its checkpoint: the same metrics as one straight run."""
    assert strip(runs["split"]) == strip(runs["a"])
    saved = sorted(p.name for p in (runs["dir"] / "a" / "ckpt").iterdir())
    assert saved == ["step_00000003", "step_00000006"]


def test_resume_auto_skips_a_damaged_checkpoint(runs, tmp_path):
    import shutil
    shutil.copytree(runs["dir"] / "a", tmp_path / "a")
    data = sorted((tmp_path / "a/ckpt/step_00000006").glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:-100])
    done = launch(tmp_path / "a", None, "train.steps=9")
    assert "skipping incomplete or damaged checkpoint" in done.stdout and "step_00000006" in done.stdout
    assert "resumed from" in done.stdout and "step_00000003 at step 3" in done.stdout
    steps = [r["step"] for r in metrics(tmp_path / "a") if "loss" in r]
    assert steps == [2, 4, 6, 8, 9]


def test_fresh_run_refuses_to_overwrite_checkpoints(runs, tmp_path):
    import shutil
    shutil.copytree(runs["dir"] / "a", tmp_path / "a")
    done = launch(tmp_path / "a", None, "checkpoint.resume=none", ok=False)
    assert done.returncode == 2
    assert "checkpoint.resume=none but" in done.stderr and "step_00000006" in done.stderr
    assert sorted(p.name for p in (tmp_path / "a/ckpt").iterdir()) == ["step_00000003", "step_00000006"]


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def test_killed_rank_then_resume_auto_continues_the_same_curve(tmp_path):
    """SIGKILL one worker mid-run: torchrun ends the job; the relaunch resumes and matches."""
    args = ["train.steps=36", "train.log_every=6", "train.eval_every=12", "checkpoint.every=6"]
    straight = run(tmp_path / "straight", 2, *args)
    out = tmp_path / "killed"
    kill_after_checkpoint(out, 2, 6, *args)
    resumed = launch(out, 2, *args)
    assert "resumed from" in resumed.stdout
    assert strip(metrics(out)) == strip(straight)


def kill_after_checkpoint(out: Path, nproc: int, step: int, *args: str) -> None:
    """Start a torchrun job and SIGKILL one worker as soon as its step-``step`` checkpoint is
    complete; torchrun must then end the job."""
    import signal
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *QUICK,
           f"logging.out_dir={out}", f"checkpoint.dir={out}/ckpt", *args]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    marker = out / "ckpt" / f"step_{step:08d}" / "zero_adam.json"
    deadline = time.monotonic() + 180
    while not marker.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.02)
    workers = children(job.pid)
    assert marker.exists() and job.poll() is None and workers, "the run must be mid-way when killed"
    os.kill(workers[-1], signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0, "torchrun must end the job when a worker dies"


def test_fp16_loss_scaling_recovers_from_overflow(tmp_path):
    done = launch(tmp_path, None, "train.steps=20", "optim.param_dtype=float16", "optim.loss_scale=dynamic",
                  "optim.loss_scaling.init_scale=16777216", "optim.loss_scaling.hysteresis=1")
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert "optimizer step skipped, non-finite gradient" in done.stdout
    assert 0 < rows[-1]["skipped_steps"] < 20 and rows[-1]["loss_scale"] < 16777216
    assert math.isfinite(rows[-1]["grad_norm"]) and rows[-1]["loss"] < rows[0]["loss"] + 0.5


def test_deterministic_runs_are_bit_identical(tmp_path):
    a = run(tmp_path / "a", None, "train.deterministic=true")
    b = run(tmp_path / "b", None, "train.deterministic=true")
    assert strip(a) == strip(b)


def test_bad_resume_path_is_a_clear_error(tmp_path):
    done = launch(tmp_path, None, "checkpoint.resume=/nonexistent/step_9", ok=False)
    assert done.returncode == 2 and "checkpoint.resume=/nonexistent/step_9: no such checkpoint" in done.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    done = launch(tmp_path, None, f"checkpoint.resume={broken}", ok=False)
    assert done.returncode == 2 and "is incomplete" in done.stderr


def test_transformers_model_trains_through_the_launcher(tmp_path):
    pytest.importorskip("transformers")
    args = [str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/hf_llama_tiny.yaml"), *QUICK,
            f"logging.out_dir={tmp_path}", f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.every=3"]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "ckpt" / "step_00000006" / "zero_adam.json").exists()


def without(modules: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """launch/train.py as one process in an interpreter where ``modules`` cannot be imported."""
    code = ("import runpy, sys\n"
            f"for m in {modules!r}: sys.modules[m] = None\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = [str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *QUICK,
            f"logging.out_dir={out}", f"checkpoint.dir={out}/ckpt", "logging.progress=true", *extra]
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_missing_plot_and_progress_packages_are_notes_not_a_crash_after_training(tmp_path):
    """The [train] extras' optional parts: said at the start, the run trains to the end and keeps
    its metrics and checkpoints (it used to crash in the plot after the last step)."""
    done = without(["matplotlib", "tqdm"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and all("pip install 'zero-adam[train]'" in n for n in notes), done.stdout
    assert "done: steps 0-6" in done.stdout and "Traceback" not in done.stderr
    assert len(metrics(tmp_path)) > 0 and not (tmp_path / "loss.png").exists()


def test_missing_required_package_exits_2_before_any_work(tmp_path):
    done = without(["pydantic"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pydantic" in done.stderr and "pip install 'zero-adam[train]'" in done.stderr
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_a_failing_plot_is_reported_and_skipped(tmp_path, monkeypatch, capsys):
    from launch.config import LoggingConfig
    from launch.logs import RunLog
    log = RunLog(LoggingConfig(progress=False), tmp_path, main=True, total_steps=1)
    log.record({"step": 1, "loss": 1.0, "tokens_per_s": 1.0})
    monkeypatch.setattr(RunLog, "_draw", lambda self, name: 1 / 0)
    assert log.plot("x") is None
    assert "loss.png not written (ZeroDivisionError" in capsys.readouterr().out
    log.close()
