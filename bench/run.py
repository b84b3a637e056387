"""Benchmark zero-adam against DDP, torch ZeroRedundancyOptimizer, DeepSpeed ZeRO-1/2 and FSDP2.

    python bench/run.py                       # (make bench) writes docs/benchmarks.md and .png
    python bench/run.py --reps 5 --methods ddp zero-adam-2

Every method trains the same Llama-style model (16.0M params, fp32) on the same data and seed on
N ranks (CPU + gloo here, CUDA + NCCL where there are GPUs). Two kinds of job:

* one job per method (its own processes): optimizer state bytes, peak RSS, bytes sent to
  collectives and the loss after the last step (which must agree across methods);
* ``--reps`` timing jobs in which every method runs on its own model copy in the same processes,
  one step each in turn (rotating the order), so the machine's slow phases hit all alike. Step
  time is the median over all rounds; the ratio to DDP is the median of per-round ratios.

Then the fused-step bandwidth (bench/kernel_bw.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import report  # noqa: E402

METHODS = ["ddp", "zero-adam-1", "zero-adam-2", "zero-adam-2:no-overlap", "zero-adam-2:rs-ag", "torch-zero",
           "deepspeed-1", "deepspeed-2", "fsdp2"]


def run_job(method: str | list[str], out: Path, a: argparse.Namespace) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if a.device == "cuda":
        env.pop("DS_ACCELERATOR")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           str(HERE / "worker.py"), "--out", str(out), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    cmd += ["--interleave", *method] if isinstance(method, list) else ["--method", method]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        print(f"  {method} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed rounds per timing job")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args()
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, dict] = {}
    rounds: dict[str, list[float]] = {m: [] for m in a.methods}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.methods:
            r = run_job(m, Path(tmp) / f"{m}.json", a)
            if r is not None:
                results[m] = r
                print(f"{m:>24}: loss {r['final_loss']:.5f}, state {r['state_bytes']:,} B, "
                      f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
        for rep in range(a.reps):
            r = run_job(a.methods, Path(tmp) / f"timing-{rep}.json", a)
            if r is not None:
                for m, ts in r["step_times"].items():
                    rounds[m] += ts
                print(f"timing rep {rep}: " + ", ".join(f"{m} {statistics.median(ts):.3f}"
                                                        for m, ts in r["step_times"].items()), flush=True)
    kernel = subprocess.run([sys.executable, str(HERE / "kernel_bw.py"), "--threads", "1",
                             "--device", a.device], capture_output=True, text=True, check=True)
    summary = summarize(results, rounds)
    summary["kernel"] = json.loads(kernel.stdout)
    summary["setup"] = {"nproc": a.nproc, "device": a.device, "reps": a.reps, "steps": a.steps,
                        "warmup": a.warmup, "minutes": (time.time() - started) / 60,
                        "date": time.strftime("%Y-%m-%d"),
                        "command": "python bench/run.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps({"summary": summary, "jobs": results, "rounds": rounds},
                                                     indent=1))
    report.write(out, summary)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def round_ratio(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over interleaved rounds of time(a) / time(b): both ran in the same round, so a slow
    phase of the shared machine scales both and cancels out of the ratio."""
    if not rounds.get(a) or not rounds.get(b):
        return None
    return statistics.median(t / u for t, u in zip(rounds[a], rounds[b]))


def summarize(results: dict[str, dict], rounds: dict[str, list[float]]) -> dict:
    rows = {}
    for m, r in results.items():
        ts = rounds.get(m) or r["step_times"]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows[m] = {
            "step_s": statistics.median(ts), "step_s_iqr": [q[0], q[2]], "rounds": len(ts),
            "ratio_to_ddp": round_ratio(rounds, m, "ddp"),
            "state_bytes": r["state_bytes"], "peak_rss": r["peak_rss"],
            "comm": {k: v for k, v in r["comm_bytes_per_step"].items() if v},
            "final_loss": r["final_loss"], "params": r["params"], "world_size": r["world_size"],
        }
    pairs = {"zero-adam-2/ddp": ("zero-adam-2", "ddp"), "deepspeed-2/ddp": ("deepspeed-2", "ddp"),
             "zero-adam-2/deepspeed-2": ("zero-adam-2", "deepspeed-2")}
    return {"methods": rows, "ratios": {k: round_ratio(rounds, *ab) for k, ab in pairs.items()}}


if __name__ == "__main__":
    main()
