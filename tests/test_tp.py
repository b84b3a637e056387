"""Tensor parallelism x ZeRO data parallelism: TP=2 x DP=2 against a single-process reference."""

from __future__ import annotations

import pytest

import _spawn


@pytest.fixture(scope="module")
def results():
    return _spawn.run(4, "tp_cases:both", timeout=300)


@pytest.mark.parametrize("stage", [1, 2])
def test_tp_dp_matches_single_process_adamw(results, stage):
    for r in results:
        c = r[f"stage{stage}"]
        assert c["param"] < 1e-5 and c["norm_rel"] < 1e-5 and c["loss"] < 1e-5, c
        assert c["sharded_buckets"] > 0
        # full_tensor() / to_local() right after step() wait for that parameter's overlapped gather
        assert c["dtensor_reads"] >= 4 and c["dtensor_reads_unwaited"] == 0, c


@pytest.mark.parametrize("stage", [1, 2])
def test_planner_sizes_the_tp_run_exactly(results, stage):
    for r in results:
        c = r[f"stage{stage}"]
        assert c["plan_matches"], "the planner's name-based TP shapes must equal the DTensor local shapes"
        assert c["bytes_match"]


def test_bf16_params_make_bf16_dtensors_and_train(results):
    for r in results:
        c = r["bf16"]
        assert c["dtypes"] == c["local_dtypes"] == ["torch.bfloat16"], c
        assert c["full_dtype"] == "torch.bfloat16", c
        assert c["losses"][-1] < c["losses"][0], c
