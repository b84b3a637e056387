"""The benchmark harness's own logic: ratios, traffic directions, the target verdicts, one real
interleaved job, and the GPU check's code path on CPU.

The benchmark itself is too slow for the suite (and performance is never asserted in tests); what is
tested is that the numbers it prints are computed from the run, that its harness measures what it
says (same loss for every method, bytes by direction), and that ``bench/gpu_check.py``, which only
runs where a GPU is lent, does not fail on its first real use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

import pool  # noqa: E402
import run  # noqa: E402

import report  # noqa: E402

MB = 10 ** 6


def _method(times: list[float], state_bytes: int, loss: float, by_phase: dict) -> dict:
    return {"step_times": times, "state_bytes": state_bytes, "peak_rss": 2 ** 30, "final_loss": loss,
            "params": MB, "by_phase_per_step": by_phase, "collectives": {}}


def test_round_ratio_is_the_median_of_per_round_ratios() -> None:
    rounds = {"a": [2.0, 1.0, 9.0], "b": [1.0, 1.0, 3.0]}
    assert run.round_ratio(rounds, "a", "b") == 2.0
    assert run.round_ratio(rounds, "a", "missing") is None
    assert run.round_excess(rounds, "a", "b") == 1.0


def test_median_interval_is_the_sign_test_order_statistics() -> None:
    """95% interval of a median from n values: the k-th smallest and largest, k the largest count
    whose binomial(n, 1/2) tail stays within 2.5% (k = 9 for 28 values, 1 for 6: 2 * 1/64 = 3.1%)."""
    assert run.median_ci([float(v) for v in range(28)][::-1]) == (8.0, 19.0)
    assert run.median_ci([5.0, 1.0, 4.0, 2.0, 6.0, 3.0]) == (1.0, 6.0)
    assert run.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None    # 2 * 1/32 > 5%: no 95% interval
    rounds = {"a": [1.1, 0.9] * 5, "b": [1.0] * 10}
    assert run.round_ratio_ci(rounds, "a", "b") == pytest.approx((0.9, 1.1))
    assert run.round_excess_ci(rounds, "a", "b") == pytest.approx((-0.1, 0.1))
    assert run.round_ratio_ci(rounds, "a", "missing") is None


def test_pool_joins_the_per_step_pairs_of_several_runs(tmp_path: Path, capsys) -> None:
    """Two runs of 6 pairs each pool into 12 (a 95% interval that neither run has alone); a run
    without the configuration or the method adds nothing; a wrong file or name is a clear error."""
    def summary(z: list[float], d: list[float], key: str = "llama x8") -> dict:
        return {"configs": {key: {"methods": {"zero-adam-2": {"step_times": z}, "ddp": {"step_times": d}}}}}
    a = summary([0.9, 1.0, 1.1, 0.95, 1.05, 0.8], [1.0] * 6)
    b = summary([1.2, 0.7, 0.85, 0.9, 1.3, 0.6], [1.0] * 6)
    other = summary([1.0] * 6, [1.0] * 6, key="gpt x4")
    out = pool.pool([a, b, other, {"configs": {"llama x8": {"methods": {"ddp": {"step_times": [1.0]}}}}}])
    p = out["llama x8"]
    assert (p["runs"], p["pairs"]) == (2, 12) and out["gpt x4"]["pairs"] == 6
    assert p["ratio"] == pytest.approx(0.925) and p["minus_s"] == pytest.approx(-0.075)
    assert p["ratio_ci"] == pytest.approx((0.8, 1.1)) and p["minus_ci"] == pytest.approx((-0.2, 0.1))
    files = []
    for i, s in enumerate([a, b]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(s))
    assert pool.main([str(f) for f in files]) == 0
    assert "| llama x8 | 2 | 12 | 0.925x | [0.800, 1.100] | -75 | [-200, +100] |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pool.main([str(files[0]), "--base", "nope"])
    assert "no run has step times for both 'zero-adam-2' and 'nope'" in capsys.readouterr().err
    (tmp_path / "out.md").write_text("| table |")
    with pytest.raises(SystemExit):
        pool.main([str(tmp_path / "out.md")])
    assert "pass the .json that bench/run.py writes" in capsys.readouterr().err


def test_targets_show_the_interval_and_call_a_straddled_limit_a_tie() -> None:
    row = {"ratio_to_ddp": 0.98, "ratio_to_ddp_ci": [0.95, 1.02], "over_floor_s": 0.2,
           "minus_ddp_s": -0.03, "minus_ddp_ci": [-0.06, -0.01], "final_loss": 2.5, "collectives": {}}
    ddp = {"ratio_to_ddp": 1.0, "over_floor_s": 0.23, "final_loss": 2.5}
    lines = report.targets({"configs": {"llama x8": {"methods": {"zero-adam-2": row, "ddp": ddp}}}})
    text = "\n".join(lines)
    assert "| llama x8 | **met**, 0.980x [0.950, 1.020] tie | **met**, 200 vs 230; paired per round " \
           "-30 [-60, -10] |" in text
    assert "cannot tell zero-adam from DDP" in text
    assert report._fmt_ratio(1.0534, [0.951, 1.183]) == "1.053x [0.95, 1.18]"
    assert report._fmt_ratio(1.0534) == "1.053x" and report._fmt_ratio(None, [0.9, 1.1]) == "-"


def test_traffic_is_split_by_direction() -> None:
    """Gradients travel in backward or as a reduce-scatter; parameters in forward/step or as an
    all-gather (FSDP2's re-gather in backward too); a few bytes are scalars."""
    zero = run.directions({"send in backward": 2 * MB, "send in step": 2 * MB, "all_reduce in step": 48})
    assert zero == {"gradients": {"send": 2 * MB}, "parameters": {"send": 2 * MB},
                    "scalars": {"all_reduce": 48}}
    fsdp = run.directions({"all_gather in forward": 2 * MB, "all_gather in backward": MB,
                           "reduce_scatter in backward": 2 * MB})
    assert fsdp["gradients"] == {"reduce_scatter": 2 * MB} and fsdp["parameters"] == {"all_gather": 3 * MB}
    ds = run.directions({"all_reduce in backward": 4 * MB, "all_gather in step": 2 * MB})
    assert ds["gradients"] == {"all_reduce": 4 * MB} and ds["parameters"] == {"all_gather": 2 * MB}
    assert run.directions({"all_reduce in step": 4 * MB})["parameters"] == {"all_reduce": 4 * MB}


def test_report_judges_targets_from_the_run(tmp_path: Path) -> None:
    ar = {"all_reduce in backward": 4 * MB}
    job = {"model": "gpt", "micro_batch": 4, "world_size": 2, "methods": {
        "floor": _method([0.8, 0.9, 0.8], 8 * MB, 2.4, {}),
        "ddp": _method([1.0, 1.2, 1.1], 8 * MB, 2.5, ar),
        "zero-adam-2": _method([0.9, 1.08, 1.1], 4 * MB, 2.5,
                               {"send in backward": 2 * MB, "send in step": 2 * MB}),
        "deepspeed-2": _method([1.5, 1.8, 1.54], 6 * MB, 2.50001, {**ar, "all_gather in step": 2 * MB}),
    }}
    c = run.summarize(job)
    z = c["methods"]["zero-adam-2"]
    assert z["ratio_to_ddp"] == pytest.approx(0.9) and z["over_floor_s"] == pytest.approx(0.18)
    assert c["methods"]["ddp"]["over_floor_s"] == pytest.approx(0.3)
    summary = {"configs": {"gpt x4": c}, "field": c, "peak_rss": {"ddp": 2 ** 30},
               "kernel": {"numel": 16, "device": "cpu", "threads": 1, "fused_flat_s": 1e-3,
                          "fused_params_per_s": 1e9, "fused_GBps": 20.0, "stream_GBps": 16.0,
                          "fused_vs_stream": 1.25, "foreach_over_fused": 4.0, "fused_16_pieces_s": 1e-3},
               "setup": {"nproc": 2, "device": "cpu", "rounds": 3, "block": 3, "warmup": 1, "minutes": 1.0,
                         "field": "gpt x4", "field_rounds": 3, "date": "2026-01-01",
                         "command": "python bench/run.py"}}
    out = tmp_path / "benchmarks.md"
    report.write(out, summary)
    text = out.read_text()
    assert "| gpt x4 | **met**, 0.900x | **met**, 180 vs 300; paired per round -100 |" in text
    assert "| zero-adam-2 | 1.080 [" in text and "| 2.00 (send) | 2.00 (send) | 2.50000 |" in text
    assert "| ddp | 1.100 [" in text and "| 4.00 (all_reduce) | - |" in text
    assert "## All methods, gpt x4" in text and "(gpt x4, 3 rounds)" in text
    assert "1.0e-05 (3 methods)" in text            # the floor trains alone: not in the agreement
    assert "| ddp | 7.6 MiB | 8.00 | 1024 MiB |" in text
    assert out.with_suffix(".png").stat().st_size > 1000


def test_worker_runs_every_kind_of_method_on_the_same_data(tmp_path: Path) -> None:
    """One real interleaved job, 2 gloo ranks, the GPT (nn.MultiheadAttention) model: every method
    that averages gradients ends at the same loss (the floor does not average), and at the
    library's defaults zero-adam sends exactly DDP's bytes per step: half as gradients by
    exchange in backward, half as parameters by exchange after the step."""
    out = tmp_path / "t.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "bench" / "worker.py"), "--out", str(out), "--model", "gpt", "--micro-batch", "1",
         "--rounds", "1", "--block", "2", "--warmup", "1", "--interleave", "floor", "ddp", "zero-adam-2",
         "zero-adam-2:no-overlap", "zero-adam-2:ar-ar"],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    c = run.summarize(json.loads(out.read_text()))
    rows = c["methods"]
    n = rows["ddp"]["params"]
    assert n == 16_870_400 and all(r["samples"] == 1 for r in rows.values())
    losses = {m: r["final_loss"] for m, r in rows.items()}
    assert max(abs(v - losses["ddp"]) for m, v in losses.items() if m != "floor") < 1e-4, losses
    assert abs(losses["floor"] - losses["ddp"]) > 1e-4, "the floor must train on its own rank's data only"
    z = rows["zero-adam-2"]
    assert z["collectives"] == {"gradients": "exchange", "parameters": "exchange", "overlap_gather": True,
                                "buckets": 3}
    assert z["sent"]["gradients"] == {"send": pytest.approx(2 * n, rel=1e-3)}
    assert z["sent"]["parameters"] == {"send": pytest.approx(2 * n, rel=1e-3)}
    assert rows["ddp"]["sent"]["gradients"] == {"all_reduce": pytest.approx(4 * n, rel=1e-3)}
    assert rows["zero-adam-2:ar-ar"]["sent"]["parameters"] == {"all_reduce": pytest.approx(4 * n, rel=1e-3)}
    assert rows["floor"]["sent"] == {"gradients": {}, "parameters": {}, "scalars": {}}
    assert rows["zero-adam-2:no-overlap"]["collectives"]["overlap_gather"] is False


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
    """measure() + write_report() on fake runs whose peak is the prediction times ``excess``: the
    confirmed limit, its ratio to the prediction and to DDP come from the runs (exact fake peaks
    confirm the predicted limit; peaks 15% over it confirm a smaller one, and the report says so)."""
    import capacity
    floor = 300 * 2 ** 20
    budget = 2 * 2 ** 30
    for excess in (1.0, 1.15):
        def fake_run(name, k, world, tmp, excess=excess):
            peak = floor + int(excess * capacity.predict(name, k, world))
            return capacity.Run(k, capacity.n_params(k), [peak] * world)
        monkeypatch.setattr(capacity, "run", fake_run)
        rows = [capacity.measure(m, 2, budget, tmp_path, lambda t: None) for m in ("ddp", "zero-2")]
        for r in rows:
            assert sum(r["ran"]["peaks"]) <= budget < sum(r["failed"]["peaks"])
            assert r["failed"]["k"] == r["ran"]["k"] + 1
            assert (r["ran"]["k"] == r["predicted_k"]) if excess == 1.0 else r["ran"]["k"] < r["predicted_k"]
        out = tmp_path / f"x{excess}" / "docs" / "capacity.md"   # a new folder
        capacity.write_report(rows, budget, 2, 1.0, out)
        text = out.read_text()
        ratio = rows[1]["ran"]["params"] / rows[0]["ran"]["params"]
        assert f"{ratio:.2f}x" in text and out.with_suffix(".png").stat().st_size > 0
        assert "goal >= 1.6x" in text
        assert ("worst 0% off" in text) == (excess == 1.0)
