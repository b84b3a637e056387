"""Benchmark zero-adam against DDP, torch ZeroRedundancyOptimizer, DeepSpeed ZeRO-1/2, FSDP2 and
the no-communication floor.

    python bench/run.py                       # (make bench) writes docs/benchmarks.md, .json, .png
    python bench/run.py --models gpt --micro-batches 4 --methods floor ddp zero-adam-2

Every method trains the same model on the same data and seed on N ranks (CPU + gloo here, CUDA +
NCCL where there are GPUs), in every configuration of ``--models`` (bench/shapes.py: a Llama and a
GPT built from ``nn.MultiheadAttention``, both ~16M FP32 parameters) x ``--micro-batches``.

* Timing: one job per configuration in which every method runs on its own model copy in the same
  processes, ``--block`` consecutive steps per method per round (the first one untimed, so each
  timed step starts in the method's steady state), rotating the order every round; the shared
  machine's slow phases hit all methods alike. Per method: median step time, the median of
  per-round ratios to DDP and to the floor, and the median per-round time above the floor (what
  the method's communication and bookkeeping cost). The same job records each method's bytes sent
  per step by collective and by phase (forward, backward, step), its optimizer-state bytes and the
  loss after its last step (every method but the floor averages gradients, so all must agree).
* Memory: one job per method (first configuration) for its peak resident set.
* Then the fused-step bandwidth (bench/kernel_bw.py).
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

METHODS = ["floor", "ddp", "zero-adam-1", "zero-adam-2", "zero-adam-2:no-overlap", "zero-adam-2:ar-ar",
           "torch-zero", "deepspeed-1", "deepspeed-2", "fsdp2"]


def run_job(names: list[str], model: str, micro_batch: int, out: Path, a: argparse.Namespace,
            rounds: int, block: int, warmup: int) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if a.device == "cuda":
        env.pop("DS_ACCELERATOR")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           str(HERE / "worker.py"), "--out", str(out), "--model", model, "--micro-batch", str(micro_batch),
           "--rounds", str(rounds), "--block", str(block), "--warmup", str(warmup), "--interleave", *names]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        print(f"  {model} x{micro_batch} {names} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--models", nargs="+", default=["llama", "gpt"], choices=["llama", "gpt"])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[4, 8])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per configuration")
    p.add_argument("--block", type=int, default=3, help="consecutive steps per method per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak-RSS jobs")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args()
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if "ddp" not in a.methods:
        p.error("--methods must include ddp: every ratio is taken against it")
    started = time.time()
    configs, memory = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            for mb in a.micro_batches:
                key = f"{model} x{mb}"
                r = run_job(a.methods, model, mb, Path(tmp) / "timing.json", a, a.rounds, a.block, a.warmup)
                if r is not None:
                    configs[key] = summarize(r)
                    print(key + ": " + ", ".join(f"{m} {row['ratio_to_ddp']:.3f}x"
                                                 for m, row in configs[key]["methods"].items()), flush=True)
        if not a.no_memory:
            for m in a.methods:
                r = run_job([m], a.models[0], a.micro_batches[-1], Path(tmp) / "memory.json", a, 1, 2, 0)
                if r is not None:
                    memory[m] = r["methods"][m]["peak_rss"]
    kernel = subprocess.run([sys.executable, str(HERE / "kernel_bw.py"), "--threads", "1",
                             "--device", a.device], capture_output=True, text=True, check=True)
    summary = {"configs": configs, "peak_rss": memory, "kernel": json.loads(kernel.stdout),
               "setup": {"nproc": a.nproc, "device": a.device, "rounds": a.rounds, "block": a.block,
                         "warmup": a.warmup, "minutes": (time.time() - started) / 60,
                         "memory_config": f"{a.models[0]} x{a.micro_batches[-1]}",
                         "date": time.strftime("%Y-%m-%d %H:%M"),
                         "command": "python bench/run.py " + " ".join(sys.argv[1:])}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    report.write(out, summary)
    print(f"wrote {out}, {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def round_ratio(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over interleaved rounds of time(a) / time(b): both ran in the same round, so a slow
    phase of the shared machine scales both and cancels out of the ratio."""
    if not rounds.get(a) or not rounds.get(b):
        return None
    return statistics.median(t / u for t, u in zip(rounds[a], rounds[b]))


def round_excess(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over rounds of time(a) - time(b), in seconds (``a``'s cost above ``b``)."""
    if not rounds.get(a) or not rounds.get(b):
        return None
    return statistics.median(t - u for t, u in zip(rounds[a], rounds[b]))


SCALARS = 1024   # bytes per step below which traffic is scalars (norms, overflow flags), not a direction


def directions(by_phase: dict[str, float]) -> dict[str, dict[str, float]]:
    """Split bytes sent per step into the gradient and the parameter direction, by collective.

    Gradients travel in backward (or as a reduce-scatter anywhere); parameters in forward or at
    the step, or as an all-gather anywhere (FSDP2 re-gathers in backward). Below ``SCALARS``
    bytes a collective carries scalars (norms, overflow flags)."""
    out: dict[str, dict[str, float]] = {"gradients": {}, "parameters": {}, "scalars": {}}
    for key, nbytes in by_phase.items():
        kind, _, phase = key.partition(" in ")
        if nbytes < SCALARS:
            way = "scalars"
        elif kind == "reduce_scatter" or (phase == "backward" and kind not in ("all_gather", "broadcast")):
            way = "gradients"
        else:
            way = "parameters"
        out[way][kind] = out[way].get(kind, 0) + nbytes
    return out


def summarize(job: dict) -> dict:
    """One configuration's timing job -> per-method rows (see the module docstring)."""
    rounds = {m: r["step_times"] for m, r in job["methods"].items()}
    has_floor = "floor" in rounds
    rows = {}
    for m, r in job["methods"].items():
        ts = r["step_times"]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows[m] = {
            "step_s": statistics.median(ts), "step_s_iqr": [q[0], q[2]], "samples": len(ts),
            "ratio_to_ddp": round_ratio(rounds, m, "ddp"),
            "ratio_to_floor": round_ratio(rounds, m, "floor") if has_floor else None,
            "over_floor_s": round_excess(rounds, m, "floor") if has_floor else None,
            "state_bytes": r["state_bytes"], "final_loss": r["final_loss"], "params": r["params"],
            "sent": directions(r["by_phase_per_step"]), "collectives": r.get("collectives", {}),
        }
    return {"model": job["model"], "micro_batch": job["micro_batch"], "world_size": job["world_size"],
            "methods": rows}


if __name__ == "__main__":
    main()
