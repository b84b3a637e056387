"""Cut parameters at an odd world size against AdamW (cases in tests/cut_cases.py)."""

from __future__ import annotations

import _spawn


def test_cut_parameters_match_adamw_through_reuse_checkpointing_freezing_and_recreation():
    for per_rank in _spawn.run(3, "cut_cases:all_cases", timeout=300):
        assert set(per_rank) == {"s1-reentrantFalse", "s1-reentrantTrue", "s2-reentrantFalse",
                                 "s2-reentrantTrue"}
        assert all(v < 1e-5 for v in per_rank.values()), per_rank
