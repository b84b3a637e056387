"""Print the resharding table: checkpoints saved on N ranks loaded on M (tests/ckpt_cases.py).

    python bench/reshard_report.py

For each case: whether the restored masters, moments and step equal the saved ones bit for bit,
and the largest parameter difference after 3 more steps against the run that never stopped
(on N ranks; a different M only changes the order of the gradient average).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import _spawn  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = _spawn.run(4, "ckpt_cases:run_all", tmp, timeout=900)
    cases: dict[str, list[dict]] = {}
    for r in per_rank:
        for k, v in r.items():
            cases.setdefault(k, []).append(v)
    print("| saved on N, loaded on M, stages, params | restored state bit-identical | "
          "max param diff vs uninterrupted, 3 steps later |")
    print("| --- | --- | --- |")
    for k, vs in cases.items():
        print(f"| {k} | {all(v['same_state'] for v in vs)} | {max(v['final_diff'] for v in vs):.2e} |")


if __name__ == "__main__":
    main()
