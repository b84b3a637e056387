"""Benchmark zero-adam against DDP, torch ZeroRedundancyOptimizer, DeepSpeed ZeRO-1/2 and FSDP2.

    python bench/run.py                       # (make bench) writes docs/benchmarks.md and .png
    python bench/run.py --reps 5 --methods ddp zero-adam-2

Every method trains the same Llama-style model (16.0M params, fp32) on the same data and seed on
N ranks (CPU + gloo here, CUDA + NCCL where there are GPUs). Jobs are interleaved: each repetition
runs every method once, in a rotated order, so a noisy neighbour hits all methods alike. Reported:
medians over repetitions of each job's median step time, the per-repetition ratio to DDP, the
optimizer state bytes per rank, peak RSS, bytes sent to collectives, and the loss after the last
step (which must agree). Then the fused-step bandwidth (bench/kernel_bw.py).
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

METHODS = ["ddp", "zero-adam-1", "zero-adam-2", "torch-zero", "deepspeed-1", "deepspeed-2", "fsdp2"]


def run_job(method: str, out: Path, a: argparse.Namespace) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if a.device == "cuda":
        env.pop("DS_ACCELERATOR")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           str(HERE / "worker.py"), "--method", method, "--out", str(out), "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        print(f"  {method} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args()
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, list[dict]] = {m: [] for m in a.methods}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            order = a.methods[rep % len(a.methods):] + a.methods[:rep % len(a.methods)]
            for m in order:
                r = run_job(m, Path(tmp) / f"{m}-{rep}.json", a)
                if r is not None:
                    r["rep"] = rep
                    results[m].append(r)
                    print(f"rep {rep} {m:>14}: {r['step_s']:.3f} s/step, loss {r['final_loss']:.5f}",
                          flush=True)
    kernel = subprocess.run([sys.executable, str(HERE / "kernel_bw.py"), "--threads", "1",
                             "--device", a.device], capture_output=True, text=True, check=True)
    summary = summarize(results)
    summary["kernel"] = json.loads(kernel.stdout)
    summary["setup"] = {"nproc": a.nproc, "device": a.device, "reps": a.reps, "steps": a.steps,
                        "warmup": a.warmup, "minutes": (time.time() - started) / 60,
                        "command": "python bench/run.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps({"summary": summary, "raw": results}, indent=1))
    report.write(out, summary)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def summarize(results: dict[str, list[dict]]) -> dict:
    ddp = {r["rep"]: r["step_s"] for r in results.get("ddp", [])}
    rows = {}
    for m, runs in results.items():
        if not runs:
            continue
        ratios = [r["step_s"] / ddp[r["rep"]] for r in runs if r["rep"] in ddp]
        comm = {k: statistics.median(r["comm_bytes_per_step"].get(k, 0) for r in runs)
                for k in sorted({k for r in runs for k in r["comm_bytes_per_step"]})}
        rows[m] = {
            "step_s": statistics.median(r["step_s"] for r in runs),
            "step_s_range": [min(r["step_s"] for r in runs), max(r["step_s"] for r in runs)],
            "ratio_to_ddp": statistics.median(ratios) if ratios else None,
            "state_bytes": runs[0]["state_bytes"], "peak_rss": statistics.median(r["peak_rss"] for r in runs),
            "comm": {k: v for k, v in comm.items() if v}, "final_loss": runs[0]["final_loss"],
            "params": runs[0]["params"], "world_size": runs[0]["world_size"], "n": len(runs),
        }
    return {"methods": rows}


if __name__ == "__main__":
    main()
