"""Print the parity table of ZeroAdamW against torch.optim.AdamW (the cases of tests/dist_cases.py).

    python bench/parity_report.py

Runs every parity case on world sizes 1-4 (one 4-process gloo world) and prints, per case, the
largest difference over 10 steps and all ranks: parameters, FP32 masters, and the relative
difference of the global gradient norm.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import _spawn  # noqa: E402


def main() -> None:
    merged: dict[str, list[dict]] = {}
    for res in _spawn.run(4, "dist_cases:parity_all", timeout=900):
        for key, r in res.items():
            merged.setdefault(key, []).append(r)
    print("| case | world | max param diff | max master diff | max grad-norm rel diff |")
    print("| --- | --- | --- | --- | --- |")
    for key in sorted(merged, key=lambda k: (k.rsplit("-ws", 1)[0], k)):
        rows = merged[key]
        name, ws = key.rsplit("-ws", 1)
        worst = {k: max(r[k] for r in rows) for k in ("param", "master", "norm_rel")}
        print(f"| {name} | {ws} | {worst['param']:.2e} | {worst['master']:.2e} | {worst['norm_rel']:.2e} |")


if __name__ == "__main__":
    main()
