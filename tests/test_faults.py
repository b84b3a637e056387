"""Robustness: fp16 overflow, non-finite gradients, divergent ranks, dead and hung ranks."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import _spawn


@pytest.fixture(scope="module")
def faults():
    return _spawn.run(2, "fault_cases:all_cases", timeout=300)


def test_fp16_overflow_is_skipped_everywhere_and_the_scale_backs_off(faults):
    for r in faults:
        f = r["fp16"]
        assert "error" not in f, f.get("trace")
        steps = f["steps"]
        skipped = [s for s in steps if s["skipped"]]
        assert skipped and steps[0]["skipped"], "a 2**24 scale must overflow fp16 at once"
        assert all(s["unchanged"] for s in skipped), "a skipped step touched state"
        assert all(s["scale_after"] == s["scale_before"] / 2 for s in skipped)
        done = [s for s in steps if not s["skipped"]]
        assert done and all(not s["unchanged"] for s in done), "training must then proceed"
        assert f["step_count"] == len(done) and f["skipped"] == len(skipped)
        assert f["same"], "ranks hold the same fp16 parameters"
    assert faults[0]["fp16"]["steps"] == faults[1]["fp16"]["steps"], "every rank took the same decisions"


def test_nonfinite_gradient_is_skipped_on_every_rank(faults):
    for r in faults:
        f = r["skip"]
        assert "error" not in f, f.get("trace")
        assert [s["skipped"] for s in f["steps"]] == [False, False, True, False, True, False]
        assert all(s["unchanged"] == s["skipped"] for s in f["steps"])
        assert f["skipped"] == 2 and f["step_count"] == 4


def test_nonfinite_raise_names_the_parameter(faults):
    for r in faults:
        err = r["raise"].get("error", "")
        assert err.startswith("RuntimeError") and "non-finite gradient at optimizer step 3" in err
        assert "['out.bias']" in err, err


@pytest.mark.parametrize("what,expected", [("lr", "'lr': 0.002"), ("groups", "param group")])
def test_divergent_settings_fail_on_all_ranks(faults, what, expected):
    for r in faults:
        err = r[what].get("error", "")
        assert err.startswith("ValueError") and "rank 1 has" in err and expected in err, err


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_dead_or_hung_rank_fails_clearly_within_60s(tmp_path, mode):
    ctx = _spawn.start(2, str(tmp_path), "fault_cases:dead_rank", mode, str(tmp_path), pg_timeout=10)
    result = tmp_path / "dead-0.json"
    deadline = time.monotonic() + 120
    try:
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    assert result.exists(), "rank 0 hung instead of failing"
    r = json.loads(result.read_text())
    assert r["error"].startswith("CollectiveError"), r
    assert "failed on rank 0 of 2 (gloo)" in r["error"]
    assert "restart from the last complete checkpoint" in r["error"]
    print(f"{mode}: rank 0 failed after {r['seconds']:.1f} s: {r['error']}")
    assert any(w in r["error"] for w in ("gradient reduction of bucket", "all-gather of bucket",
                                          "gradient-norm all-reduce")), r["error"]
    assert r["seconds"] < 60
