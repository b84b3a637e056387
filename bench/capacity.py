"""Capacity: the largest model each method trains within one memory budget on this machine,
predicted first, then confirmed by real runs (bisection on the model size).

    python bench/capacity.py                          # 2 ranks, 8 GiB for the whole job
    python bench/capacity.py --budget-gib 6 --methods ddp zero-2

Shape family: the launcher's Llama with depth and width scaled together, size k = k layers of
width 16k (k heads of 16), FFN 3 x width, byte vocabulary (256), sequence 128, micro-batch 1.
A run is construction + 3 training steps on every rank (CPU, gloo).

Measured: each rank's peak resident set (VmHWM, from process start to after the last step) with
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so freed tensors leave the resident set; a run fits
if the ranks' peaks sum to at most the budget (the budget is watched, not enforced: nothing is
killed, so the smallest size that does not fit is measured too).

Predicted: the floor (a rank's peak with the size-2 model of the same method, measured once) plus,
per rank, the model states at their peak and the activations of one micro-batch
(``launch/activations.py``). Model states: zero-adam from ``zero_adam.memory.estimate`` on the
same plan the optimizer builds (at least the FP32 model built before it); the others from their
documented layouts (``BASELINES``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

from launch.activations import activation_bytes  # noqa: E402
from launch.config import ModelConfig  # noqa: E402
from launch.model import build_model, count_params  # noqa: E402

GIB = 2 ** 30
SEQ, MICRO, STEPS = 128, 1, 3
ZERO = {  # name: ZeroAdamW options (library defaults otherwise)
    "zero-1": {"stage": 1},
    "zero-2": {"stage": 2},
    "zero-2-bf16": {"stage": 2, "param_dtype": torch.bfloat16, "master": "remainder",
                    "grad_dtype": torch.bfloat16},
}
METHODS = ["ddp", *ZERO, "deepspeed-2", "fsdp2"]
LABELS = {"ddp": "DDP + fused AdamW", "zero-1": "zero-adam stage 1", "zero-2": "zero-adam stage 2",
          "zero-2-bf16": "zero-adam stage 2, bf16 + remainder", "deepspeed-2": "DeepSpeed ZeRO-2",
          "fsdp2": "FSDP2"}


def shape(k: int) -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=16 * k, n_layers=k, n_heads=k, n_kv_heads=k, ffn_dim=48 * k,
                       max_seq_len=SEQ)


@functools.cache
def n_params(k: int) -> int:
    with torch.device("meta"):
        return count_params(build_model(shape(k)))


# -- prediction ------------------------------------------------------------------------------------
def _layer_params(k: int) -> int:
    d = 16 * k
    return 4 * d * d + 3 * d * 48 * k + 2 * d


BASELINES: dict[str, Callable[[int, int, int], int]] = {  # (k, N, activation bytes) -> peak bytes
    # DDP (gradient_as_bucket_view off, torch's default): weights, .grad, the reducer's bucket
    # copy of the gradients and AdamW's two moments, 4 + 4 + 4 + 8 bytes per parameter, at the
    # step; in backward the gradients grow while the activations are freed, so they do not add.
    "ddp": lambda k, n, acts: 20 * n_params(k),
    # DeepSpeed ZeRO-2 on FP32 weights: the weights flattened into one buffer (built while the
    # originals still exist: 8 bytes/param at construction), then this rank's FP32 master copy,
    # moments and averaged-gradient partition (16/N), two 25M-element reduce buckets, activations.
    "deepspeed-2": lambda k, n, acts: max(8 * n_params(k),
                                          4 * n_params(k) + 16 * n_params(k) // n + 200_000_000 + acts),
    # FSDP2: the unsharded model exists until fully_shard (4 bytes/param); then weights, gradients
    # and moments sharded (16/N) with, in backward, one layer's unsharded weights and gradients
    # and the activations; at the step, foreach AdamW's sqrt(v) temporary (4/N).
    "fsdp2": lambda k, n, acts: max(4 * n_params(k), 16 * n_params(k) // n + 8 * _layer_params(k) + acts,
                                    20 * n_params(k) // n),
}


def zero_states(name: str, k: int, world: int) -> int:
    """zero-adam's peak model-state bytes per rank: the planner's estimate of the plan ZeroAdamW
    builds, and at least the FP32 model that exists before it rebinds the parameters."""
    from zero_adam.memory import estimate, plan_params
    opts = dict(ZERO[name])
    stage, dtype = opts.pop("stage"), opts.get("param_dtype")
    with torch.device("meta"):
        meta = build_model(shape(k))
    plan = plan_params(meta.parameters(), param_dtype=dtype, world_size=world)  # as methods.zero_adam
    est = estimate(plan, world, stage=stage, grad_dtype=opts.get("grad_dtype"),
                   master=opts.get("master", "fp32"), backend="gloo")
    return max(est.device.total, 4 * n_params(k))


def predict(name: str, k: int, world: int) -> int:
    """Bytes of one rank beyond the floor at its peak."""
    dtype = ZERO.get(name, {}).get("param_dtype", torch.float32)
    acts = activation_bytes(shape(k), micro_batch=MICRO, seq_len=SEQ, dtype=dtype).total
    if name in ZERO:  # every state is allocated for the whole step, so the activations add
        return zero_states(name, k, world) + acts
    return BASELINES[name](k, world, acts)


def predicted_limit(name: str, world: int, budget: int, floor: int) -> int:
    """The largest k whose predicted job peak (floor + prediction, summed over ranks) fits
    (predictions grow with k)."""
    k = 1
    while world * (floor + predict(name, k + 1, world)) <= budget:
        k += 1
    return k


# -- confirmation ----------------------------------------------------------------------------------
def bisect_limit(start: int, fits: Callable[[int], bool], lo: int = 1, hi: int = 10_000) -> tuple[int, int]:
    """(largest k that fits, smallest that does not), with ``fits`` monotone; ``lo`` is known to
    fit and ``hi`` not to. Steps out from ``start`` (the prediction) by doubling strides, then halves."""
    stride = 1
    k = min(max(start, lo + 1), hi - 1)
    while lo + 1 < hi:
        if fits(k):
            lo = k
            k = min(k + stride, hi - 1) if hi - lo > stride else (lo + hi) // 2
        else:
            hi = k
            k = max(k - stride, lo + 1) if hi - lo > stride else (lo + hi) // 2
        stride *= 2
    return lo, hi


@dataclass
class Run:
    k: int
    params: int
    peaks: list[int]   # per rank, bytes

    @property
    def total(self) -> int:
        return sum(self.peaks)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(name: str, k: int, out: str) -> None:
    """One rank: build the size-k model and the method, train 3 steps, report the peak."""
    import torch.distributed as dist

    from launch import runtime

    import methods
    torch.set_num_threads(1)
    rt = runtime.init()
    gen = torch.Generator().manual_seed(rt.rank)
    x = torch.randint(0, 256, (MICRO, SEQ + 1), generator=gen)
    torch.manual_seed(0)
    model = build_model(shape(k))
    if name in ZERO:
        method = methods.zero_adam(model, **ZERO[name])
    else:
        method = methods.build(name, model, rt.device, MICRO)
    for _ in range(STEPS):
        method.step(x[:, :-1], x[:, 1:])
    rows = [None] * rt.world_size
    dist.all_gather_object(rows, peak_rss())
    if rt.rank == 0:
        Path(out).write_text(json.dumps(rows))
    del method, model
    runtime.shutdown()


def run(name: str, k: int, world: int, tmp: Path) -> Run:
    out = tmp / f"{name}-{k}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           __file__, "--worker", f"{name}:{k}", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0 and not out.exists():  # written after the last step: teardown is not the run
        raise SystemExit(f"{name} at size {k} failed:\n{done.stderr[-3000:]}")
    return Run(k, n_params(k), json.loads(out.read_text()))


# -- the report ------------------------------------------------------------------------------------
def measure(name: str, world: int, budget: int, tmp: Path, log: Callable[[str], None]) -> dict:
    floor = max(run(name, 2, world, tmp).peaks)
    pred_k = predicted_limit(name, world, budget, floor)
    runs: dict[int, Run] = {}

    def fits(k: int) -> bool:
        runs[k] = run(name, k, world, tmp)
        log(f"  {name} k={k}: {runs[k].params / 1e6:.0f}M params, peak {runs[k].total / GIB:.2f} GiB "
            f"(predicted {world * (floor + predict(name, k, world)) / GIB:.2f})")
        return runs[k].total <= budget

    lo, hi = bisect_limit(pred_k, fits)
    return {"method": name, "floor": floor, "predicted_k": pred_k, "predicted_params": n_params(pred_k),
            "ran": vars(runs[lo]) if lo in runs else None, "failed": vars(runs[hi]) if hi in runs else None,
            "runs": len(runs)}


def _cell(run: dict | None) -> str:
    if not run:
        return "-"
    return (f"k={run['k']}: {run['params'] / 1e6:.0f}M, {sum(run['peaks']) / GIB:.2f} GiB "
            f"({' + '.join(f'{p / GIB:.2f}' for p in run['peaks'])})")


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's goals, judged from this run's confirmed limits."""
    ran = {r["method"]: r["ran"]["params"] for r in rows if r["ran"]}
    out = []
    for name, goal in (("zero-2", 1.6), ("zero-2-bf16", 1.9)):
        if name in ran and "ddp" in ran:
            x = ran[name] / ran["ddp"]
            out.append(f"- {LABELS[name]}: **{x:.2f}x** the parameters of DDP + AdamW (goal >= {goal}x: "
                       f"{'met' if x >= goal else 'NOT met'})")
    worst = max(rows, key=lambda r: abs(1 - (r["ran"]["params"] if r["ran"] else 0) / r["predicted_params"]))
    off = abs(1 - (worst["ran"]["params"] if worst["ran"] else 0) / worst["predicted_params"])
    out.append(f"- confirmed limits against the predictions: worst {off:.0%} off ({LABELS[worst['method']]}; "
               f"goal within 10%: {'met' if off <= 0.10 else 'NOT met'})")
    return out


def write_report(rows: list[dict], budget: int, world: int, minutes: float, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    ddp = next((r["ran"]["params"] for r in rows if r["method"] == "ddp" and r["ran"]), None)
    lines = [
        "# Capacity: the largest model each method trains in one memory budget", "",
        f"Written by `python bench/capacity.py --budget-gib {budget / GIB:g}` ({minutes:.0f} min on this "
        f"machine). {world} CPU ranks (gloo), budget **{budget / GIB:g} GiB for the whole job** (sum of "
        "the ranks' peak resident sets, `MALLOC_MMAP_THRESHOLD_`=128 KiB: watched, not enforced); model: "
        f"launcher Llama of size k (k layers, width 16k, k heads of 16, FFN 3 x width, vocabulary 256), "
        f"seq {SEQ}, micro-batch {MICRO}, construction + {STEPS} steps. The limit of each method is "
        "predicted first, then confirmed by bisection on k starting at the prediction.", "",
        *verdicts(rows), "",
        "| method | predicted limit | largest that ran (peak) | smallest that did not (peak) | "
        "confirmed / predicted | x DDP |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ran, failed = r["ran"], r["failed"]
        ratio = f"{ran['params'] / r['predicted_params']:.2f}" if ran else "-"
        vs = f"{ran['params'] / ddp:.2f}x" if ran and ddp else "-"
        lines.append(f"| {LABELS[r['method']]} | k={r['predicted_k']}: {r['predicted_params'] / 1e6:.0f}M | "
                     f"{_cell(ran)} | {_cell(failed)} | {ratio} | {vs} |")
    lines += ["", "Peaks are the job's total (the ranks' peaks in parentheses). Floor per rank (the method "
              "with the size-2 model, included in every prediction): "
              + ", ".join(f"{r['method']} {r['floor'] / GIB:.2f} GiB" for r in rows) + ".", "",
              f"![parameters trained per method]({out.with_suffix('.png').name})", "", *METHOD_NOTES]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"budget": budget, "world": world, "minutes": minutes, "rows": rows}, indent=1))
    chart(rows, out.with_suffix(".png"))


METHOD_NOTES = [
    "## What each prediction counts (bytes per rank beyond the floor)",
    "- zero-adam: `zero_adam.memory.estimate` of the plan ZeroAdamW builds (weights, gradient buffer or "
    "shard, masters, moments, in-flight buckets; at least the FP32 model built before it), plus the "
    "activations of one micro-batch from `launch/activations.py`: every state lives through the whole "
    "step, so they add.",
    "- DDP + fused AdamW (FP32): 20 bytes/param (weights, `.grad`, the reducer's bucket copy, two "
    "moments) at the step; in backward the gradients grow as activations are freed, so they do not add.",
    "- DeepSpeed ZeRO-2 (FP32, `overlap_comm`, 25M-element buckets): max(8 bytes/param while it "
    "flattens the weights, 4 + 16/N bytes/param + two reduce buckets + activations).",
    "- FSDP2 (`fully_shard` per block, foreach AdamW): max(4 bytes/param before sharding, 16/N + one "
    "block's unsharded weights and gradients + activations, 20/N at the step: foreach AdamW's sqrt(v) "
    "temporary).",
    "",
    "zero-adam stage 2 with bf16 weights and `master=\"remainder\"` keeps 2 bytes of weight, 2/N of "
    "remainder, 8/N of moments and 2/N of bf16 gradient shard per parameter: bit-identical to FP32 "
    "masters (zero_adam.master) at 8 bytes/param on 2 ranks instead of DDP's 20.",
]


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [LABELS[r["method"]] for r in rows]
    pred = [r["predicted_params"] / 1e6 for r in rows]
    conf = [(r["ran"]["params"] if r["ran"] else 0) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], pred, height=0.4, label="predicted", color="#bbb")
    ax.barh([i - 0.2 for i in y], conf, height=0.4, label="confirmed (largest that ran)", color="#2a6")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("parameters (millions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--out", default=str(HERE.parent / "docs" / "capacity.md"))
    p.add_argument("--render", help="re-write the report from a capacity.json, without running")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        return write_report(saved["rows"], saved["budget"], saved["world"], saved["minutes"], Path(a.out))
    if a.worker:
        name, k = a.worker.split(":")
        return worker(name, int(k), a.out)
    import time
    started, budget = time.perf_counter(), int(a.budget_gib * GIB)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # before the runs, not after
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in a.methods:
            rows.append(measure(name, a.world_size, budget, Path(tmp), lambda t: print(t, flush=True)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "floor"}), flush=True)
            saved = {"budget": budget, "world": a.world_size, "minutes": (time.perf_counter() - started) / 60,
                     "rows": rows}  # kept if a later method fails: --render writes the report from it
            Path(a.out).with_suffix(".json").write_text(json.dumps(saved, indent=1))
    write_report(rows, budget, a.world_size, (time.perf_counter() - started) / 60, Path(a.out))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
