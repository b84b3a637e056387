"""The benchmark harness's own logic: ratios, the target verdicts, and the GPU check's code path on CPU.

The benchmark itself is too slow for the suite (and performance is never asserted in tests); what is
tested is that the numbers it prints are computed from the run, and that ``bench/gpu_check.py``, which
only runs where a GPU is lent, does not fail on its first real use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

import run  # noqa: E402

import report  # noqa: E402


def _job(state_bytes: int, loss: float) -> dict:
    return {"step_times": [1.0], "state_bytes": state_bytes, "peak_rss": 2 ** 30, "final_loss": loss,
            "comm_bytes_per_step": {"all_reduce": 8 * 10 ** 6, "broadcast": 0}, "params": 10 ** 6,
            "world_size": 2}


def test_round_ratio_is_the_median_of_per_round_ratios() -> None:
    rounds = {"a": [2.0, 1.0, 9.0], "b": [1.0, 1.0, 3.0]}
    assert run.round_ratio(rounds, "a", "b") == 2.0
    assert run.round_ratio(rounds, "a", "missing") is None


def test_report_judges_targets_from_the_run(tmp_path: Path) -> None:
    jobs = {"ddp": _job(8 * 10 ** 6, 2.5), "zero-adam-2": _job(4 * 10 ** 6, 2.5),
            "deepspeed-2": _job(6 * 10 ** 6, 2.50001)}
    rounds = {"ddp": [1.0, 1.2, 1.1], "zero-adam-2": [0.9, 1.08, 1.1], "deepspeed-2": [1.5, 1.8, 1.54]}
    summary = run.summarize(jobs, rounds)
    assert summary["methods"]["zero-adam-2"]["ratio_to_ddp"] == pytest.approx(0.9)
    summary["kernel"] = {"numel": 16, "device": "cpu", "threads": 1, "fused_flat_s": 1e-3,
                         "fused_params_per_s": 1e9, "fused_GBps": 20.0, "stream_GBps": 16.0,
                         "fused_vs_stream": 1.25, "foreach_over_fused": 4.0, "fused_16_pieces_s": 1e-3}
    summary["setup"] = {"nproc": 2, "device": "cpu", "reps": 1, "steps": 3, "warmup": 1, "minutes": 1.0,
                        "date": "2026-01-01", "command": "python bench/run.py"}
    out = tmp_path / "benchmarks.md"
    report.write(out, summary)
    text = out.read_text()
    assert "| zero-adam-2 | 1.080 [" in text and "| 0.90x |" in text
    assert "<= 1.0x DDP + fused AdamW: **met**, 0.90x" in text
    assert "<= 0.5x DeepSpeed ZeRO-2: **missed**, 0.60x" in text
    assert "8/N bytes/param: **met**, 4.00 bytes/param at N=2" in text
    assert "agree across all 3 methods to 1.0e-05" in text
    assert out.with_suffix(".png").stat().st_size > 1000


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    """The same script as on a CUDA machine, at tiny sizes on CPU + gloo (world size 1, then 2 spawned)."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    diffs = r["exactness_max_param_diff"]
    assert set(diffs) == {"stage1-float32", "stage1-bfloat16", "stage2-float32", "stage2-bfloat16"}
    assert diffs["stage1-float32"] < 1e-5 and diffs["stage2-float32"] < 1e-5
    assert diffs["stage1-bfloat16"] <= 2 ** -7 and diffs["stage2-bfloat16"] <= 2 ** -7
    assert r["step_time_ws1"]["world_size"] == 1 and r["step_time_wsN"]["world_size"] == 2
    assert r["bandwidth"]["fused_GBps"] > 0 and r["bandwidth"]["copy_GBps"] > 0
    assert "## GPU check: cpu" in done.stdout and "Max |param - torch.optim.AdamW(fused)|" in done.stdout


def test_capacity_bisection_finds_the_edge_from_any_start() -> None:
    """bench/capacity.py's search: (largest size that fits, smallest that does not), starting at
    the prediction, with few runs when the prediction is close."""
    import capacity
    for edge in (1, 2, 7, 40):
        for start in (1, 5, edge, edge + 1, 60):
            calls: list[int] = []
            got = capacity.bisect_limit(start, lambda k, c=calls, e=edge: c.append(k) or k <= e, hi=100)
            assert got == (edge, edge + 1), (edge, start, got)
            assert len(calls) == len(set(calls)) <= 14, calls
    calls = []
    assert capacity.bisect_limit(40, lambda k: calls.append(k) or k <= 40) == (40, 41) and len(calls) == 2


def test_capacity_report_from_runs(tmp_path: Path, monkeypatch) -> None:
    """measure() + write_report() on fake runs whose peak is the prediction plus 3%: the confirmed
    limit, its ratio to the prediction and to DDP come from the runs."""
    import capacity
    floor = 300 * 2 ** 20

    def fake_run(name, k, world, tmp):
        peak = floor + int(1.03 * capacity.predict(name, k, world))
        return capacity.Run(k, capacity.n_params(k), [peak] * world)
    monkeypatch.setattr(capacity, "run", fake_run)
    budget = 2 * 2 ** 30
    rows = [capacity.measure(m, 2, budget, tmp_path, lambda t: None) for m in ("ddp", "zero-2")]
    for r in rows:
        assert sum(r["ran"]["peaks"]) <= budget < sum(r["failed"]["peaks"])
        assert r["failed"]["k"] == r["ran"]["k"] + 1 and r["ran"]["k"] <= r["predicted_k"]
    capacity.write_report(rows, budget, 2, 1.0, tmp_path / "docs" / "capacity.md")  # a new folder
    text = (tmp_path / "docs" / "capacity.md").read_text()
    ratio = rows[1]["ran"]["params"] / rows[0]["ran"]["params"]
    assert f"{ratio:.2f}x" in text and (tmp_path / "docs" / "capacity.png").stat().st_size > 0
    assert "goal >= 1.6x" in text and "worst 0% off" in text  # fake peaks track the prediction
