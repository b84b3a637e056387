"""Benchmark zero-adam against DDP, torch ZeroRedundancyOptimizer, DeepSpeed ZeRO-1/2, FSDP2 and
the no-communication floor.

    python bench/run.py                       # (make bench) writes docs/benchmarks.md, .json, .png
    python bench/run.py --models gpt --micro-batches 4 --methods floor ddp zero-adam-2

Every method trains the same model on the same data and seed on N ranks (CPU + gloo here, CUDA +
NCCL where there are GPUs), in every configuration of ``--models`` (bench/shapes.py: a Llama and a
GPT built from ``nn.MultiheadAttention``, both ~16M FP32 parameters) x ``--micro-batches``.

* Verdict jobs, one per configuration: the floor, DDP + fused AdamW and zero-adam stage 2 at the
  library's defaults (``--verdict-methods``), ``--rounds`` rounds. In each round every method runs
  ``--block`` consecutive steps in turn (order rotating; the first step of a block untimed, so
  each timed step starts in the method's steady state, and the block's in-flight communication
  finished untimed before another method runs): the shared machine's slow phases hit all alike.
  Per method: median step time, the medians of per-round ratios to DDP and to the floor (with a
  95% interval against DDP, ``median_ci``), and the
  median per-round time above the floor (what communication and bookkeeping cost), bytes sent
  per step by collective and phase (forward, backward, step), optimizer-state bytes and the loss
  after the last step (every method but the floor averages gradients, so all must agree).
* The field job: every method of ``--methods`` (DeepSpeed ZeRO-1/2, FSDP2, torch's ZeRO,
  zero-adam variants) the same way, in one configuration (``--field``), ``--field-rounds`` rounds.
* ``--memory``: one job per method of the field for its peak resident set.
* Then the fused-step bandwidth (bench/kernel_bw.py).
"""

from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--verdict-methods", nargs="+", default=["floor", "ddp", "zero-adam-2"])
    p.add_argument("--models", nargs="+", default=["llama", "gpt"], choices=["llama", "gpt"])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[4, 8])
    p.add_argument("--rounds", type=int, default=28,
                   help="timed rounds per verdict job (at 14, every configuration's interval held 1.0x)")
    p.add_argument("--methods", nargs="*", default=METHODS, help="the field (none: no field job)")
    p.add_argument("--field", default="llama x8", help="configuration of the field job: '<model> x<batch>'")
    p.add_argument("--field-rounds", type=int, default=4)
    p.add_argument("--block", type=int, default=3, help="consecutive steps per method per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--memory", action="store_true", help="also one peak-RSS job per field method")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--render", metavar="JSON", help="only rewrite the report from a saved benchmarks.json")
    a = p.parse_args()
    if a.render:
        report.write(Path(a.out), json.loads(Path(a.render).read_text()))
        return
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    for names in (a.verdict_methods, a.methods):
        if names and "ddp" not in names:
            p.error("--verdict-methods and --methods must include ddp: every ratio is taken against it")
    field_model, _, field_mb = a.field.partition(" x")
    started = time.time()
    configs, field, memory = {}, None, {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(f"{m} x{mb}", m, mb, a.verdict_methods, a.rounds)
                for m in a.models for mb in a.micro_batches]
        if a.methods:
            jobs.append(("field", field_model, int(field_mb), a.methods, a.field_rounds))
        for key, model, mb, names, rounds in jobs:
            r = run_job(names, model, mb, Path(tmp) / "timing.json", a, rounds, a.block, a.warmup)
            if r is None:
                continue
            row = summarize(r)
            if key == "field":
                field = row
            else:
                configs[key] = row
            print(f"{key if key != 'field' else 'field ' + a.field}: " + ", ".join(
                f"{m} {v['ratio_to_ddp']:.3f}x" for m, v in row["methods"].items()), flush=True)
        for m in a.methods if a.memory else []:
            r = run_job([m], field_model, int(field_mb), Path(tmp) / "memory.json", a, 1, 2, 0)
            if r is not None:
                memory[m] = r["methods"][m]["peak_rss"]
    kernel = subprocess.run([sys.executable, str(HERE / "kernel_bw.py"), "--threads", "1",
                             "--device", a.device], capture_output=True, text=True, check=True)
    summary = {"configs": configs, "field": field, "peak_rss": memory, "kernel": json.loads(kernel.stdout),
               "setup": {"nproc": a.nproc, "device": a.device, "rounds": a.rounds, "block": a.block,
                         "field_rounds": a.field_rounds, "field": a.field, "warmup": a.warmup,
                         "minutes": (time.time() - started) / 60, "date": time.strftime("%Y-%m-%d %H:%M"),
                         "command": " ".join(["python bench/run.py", *sys.argv[1:]])}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    report.write(out, summary)
    print(f"wrote {out}, {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def per_round(rounds: dict[str, list[float]], a: str, b: str, fn) -> list[float] | None:
    """``fn(time(a), time(b))`` for each pair of steps timed in the same interleaved round: a slow
    phase of the shared machine hits both and cancels out of a ratio or a difference."""
    if not rounds.get(a) or not rounds.get(b):
        return None
    return [fn(t, u) for t, u in zip(rounds[a], rounds[b])]


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval for the median of ``values`` (the sign test's: the
    k-th smallest and k-th largest value, k from the binomial(n, 1/2) tail), or None when there
    are too few values for that level (fewer than 6 at 95%). The timed steps of one round are
    not independent, so read it as the spread of the run rather than an exact probability."""
    xs, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n and tail + math.comb(n, k) / 2 ** n <= (1 - level) / 2:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    return None if k == 0 else (xs[k - 1], xs[n - k])


def _ratio(t: float, u: float) -> float:
    return t / u


def _excess(t: float, u: float) -> float:
    return t - u


def round_ratio(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over interleaved rounds of time(a) / time(b)."""
    v = per_round(rounds, a, b, _ratio)
    return None if v is None else statistics.median(v)


def round_excess(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over rounds of time(a) - time(b), in seconds (``a``'s cost above ``b``)."""
    v = per_round(rounds, a, b, _excess)
    return None if v is None else statistics.median(v)


def round_ratio_ci(rounds: dict[str, list[float]], a: str, b: str) -> tuple[float, float] | None:
    """``median_ci`` of the per-round ratios that ``round_ratio`` takes the median of."""
    v = per_round(rounds, a, b, _ratio)
    return None if v is None else median_ci(v)


def round_excess_ci(rounds: dict[str, list[float]], a: str, b: str) -> tuple[float, float] | None:
    """``median_ci`` of the per-round differences that ``round_excess`` takes the median of."""
    v = per_round(rounds, a, b, _excess)
    return None if v is None else median_ci(v)


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
            "ratio_to_ddp": round_ratio(rounds, m, "ddp"), "minus_ddp_s": round_excess(rounds, m, "ddp"),
            "ratio_to_ddp_ci": round_ratio_ci(rounds, m, "ddp"),
            "minus_ddp_ci": round_excess_ci(rounds, m, "ddp"),
            "ratio_to_floor": round_ratio(rounds, m, "floor") if has_floor else None,
            "over_floor_s": round_excess(rounds, m, "floor") if has_floor else None,
            "state_bytes": r["state_bytes"], "final_loss": r["final_loss"], "params": r["params"],
            "sent": directions(r["by_phase_per_step"]), "collectives": r.get("collectives", {}),
            "step_times": ts,
        }
    return {"model": job["model"], "micro_batch": job["micro_batch"], "world_size": job["world_size"],
            "methods": rows}


if __name__ == "__main__":
    main()
