"""Pool several ``bench/run.py`` runs into one estimate per configuration.

    python bench/pool.py docs/benchmarks.json /tmp/r1/out.json /tmp/r2/out.json

One run's median of per-step ratios is known to a few percent on a shared machine (its 95%
interval often holds 1.0x), so a 2-4% lead can read as a tie or a miss in any single run. Pooling
the per-step pairs of several runs (each pair timed in the same interleaved round, so a slow phase
of the machine cancels) narrows the interval: this is how README's pooled figures are computed.
Only configurations and methods present in a run contribute from it.
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

from run import median_ci, per_round  # noqa: E402

from report import bracket  # noqa: E402


def pool(summaries: list[dict], method: str = "zero-adam-2", base: str = "ddp") -> dict[str, dict]:
    """Per configuration: the pooled per-step ratios ``method``/``base`` and differences (s), with
    their medians and ``median_ci`` intervals, and how many runs and pairs went in."""
    pairs: dict[str, tuple[list[float], list[float], int]] = {}
    for s in summaries:
        for key, cfg in s.get("configs", {}).items():
            rounds = {m: r.get("step_times", []) for m, r in cfg.get("methods", {}).items()}
            ratios = per_round(rounds, method, base, operator.truediv)
            if ratios is None:
                continue
            r, e, runs = pairs.get(key, ([], [], 0))
            pairs[key] = (r + ratios, e + per_round(rounds, method, base, operator.sub), runs + 1)
    return {key: {"runs": runs, "pairs": len(r), "ratio": statistics.median(r), "ratio_ci": median_ci(r),
                  "minus_s": statistics.median(e), "minus_ci": median_ci(e)}
            for key, (r, e, runs) in pairs.items()}


def _ci(ci: tuple[float, float] | None, scale: float, fmt: str) -> str:
    return "-" if ci is None else bracket(ci, scale, fmt)


def table(pooled: dict[str, dict], method: str, base: str) -> list[str]:
    """A markdown table of ``pool``'s result."""
    lines = [f"| configuration | runs | pairs | {method} vs {base} | 95% interval "
             f"| {method} minus {base}, ms | 95% interval |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, p in pooled.items():
        lines.append(f"| {key} | {p['runs']} | {p['pairs']} | {p['ratio']:.3f}x "
                     f"| {_ci(p['ratio_ci'], 1, '.3f')} | {p['minus_s'] * 1e3:+.0f} "
                     f"| {_ci(p['minus_ci'], 1e3, '+.0f')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="out.json files written by bench/run.py")
    ap.add_argument("--method", default="zero-adam-2")
    ap.add_argument("--base", default="ddp")
    args = ap.parse_args(argv)
    summaries = []
    for path in args.runs:
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"{path}: {e}; pass the .json that bench/run.py writes next to its .md")
    pooled = pool(summaries, args.method, args.base)
    if not pooled:
        ap.error(f"no run has step times for both {args.method!r} and {args.base!r}; "
                 "name methods as bench/run.py's tables do (e.g. --method zero-adam-2 --base ddp)")
    print("\n".join(table(pooled, args.method, args.base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
