"""One benchmark job, launched by torchrun on N ranks (see bench/run.py).

    torchrun --standalone --nproc-per-node=2 bench/worker.py --method zero-adam-2 --out r.json
    torchrun --standalone --nproc-per-node=2 bench/worker.py --interleave floor ddp zero-adam-2 --out t.json

``--model llama|gpt`` (bench/shapes.py) and ``--micro-batch`` choose the workload.
With ``--method``: trains one method alone in its processes for warmup + timed steps and writes
this rank's peak RSS (the only figure that needs a process of its own) with the step times.
With ``--interleave``: builds every listed method on its own copy of the model (same seed) in this
process and runs one step of each in turn, round after round on the same data, so the shared
machine's slow phases hit every method alike. Per method it writes the step times, the bytes
handed to collectives per step (wire bytes per kind, and per kind and phase), the loss of the
last step averaged over ranks, and the optimizer-state bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import shapes  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import runtime  # noqa: E402
from launch.config import DataConfig  # noqa: E402
from launch.data import batch, load_corpus  # noqa: E402
from launch.model import count_params  # noqa: E402

import comm_count  # noqa: E402
import methods  # noqa: E402


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method")
    p.add_argument("--interleave", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama", choices=["llama", "gpt"])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (--interleave) or timed steps")
    p.add_argument("--block", type=int, default=3,
                   help="consecutive steps of one method per round; the first is not timed")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--micro-batch", type=int, default=8)
    a = p.parse_args()
    rt = runtime.init()
    comm_count.install()
    if any(m.startswith("deepspeed") for m in (a.interleave or [a.method])):
        import deepspeed
        deepspeed.init_distributed(dist_backend=rt.backend)
    result = run(a.interleave or [a.method], a, rt)
    if rt.is_main:
        Path(a.out).write_text(json.dumps(result, indent=1))
    runtime.shutdown()


def run(names: list[str], a: argparse.Namespace, rt: runtime.Runtime) -> dict:
    """Each round runs ``block`` consecutive steps of every method in turn (order rotating): the
    first step of a block only brings the method to its steady state (an overlapped all-gather is
    in flight from the step before), the others are timed from the start of their forward to the
    return of ``step()``, exactly as a training loop sees them; the block ends with the method's
    in-flight communication finished, untimed, so none of it runs inside another method's time."""
    runs, seen = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = shapes.build(a.model).to(rt.device)
        runs[name] = methods.build(name, model, rt.device, a.micro_batch)
        seen[name] = count_params(model)
    corpus = load_corpus(DataConfig(max_bytes=2_000_000), shapes.SEQ, shapes.VOCAB)
    glob = a.micro_batch * rt.world_size
    times: dict[str, list[float]] = {n: [] for n in runs}
    steps = dict.fromkeys(runs, 0)
    wire = {n: {} for n in runs}
    phased = {n: {} for n in runs}
    last = dict.fromkeys(runs, 0.0)
    for rnd in range(a.warmup + a.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            for k in range(a.block):
                x, y = batch(corpus.train, seed=0, step=steps[name], global_batch=glob,
                             lo=rt.rank * a.micro_batch, hi=(rt.rank + 1) * a.micro_batch, seq_len=shapes.SEQ)
                x, y = x.to(rt.device), y.to(rt.device)
                timed = rnd >= a.warmup and k > 0
                if k == 0:
                    dist.barrier()
                w0, p0 = comm_count.snapshot(), comm_count.phased_snapshot()
                sync(rt.device)
                t0 = time.perf_counter()
                loss = runs[name].step(x, y)
                sync(rt.device)
                if timed:
                    times[name].append(time.perf_counter() - t0)
                    _add(wire[name], w0, comm_count.snapshot())
                    _add(phased[name], p0, comm_count.phased_snapshot())
                last[name] = float(loss.detach())
                steps[name] += 1
            runs[name].finish()
    out = {"world_size": rt.world_size, "device": rt.device.type, "model": a.model,
           "micro_batch": a.micro_batch, "methods": {}}
    for name, m in runs.items():
        n = max(1, len(times[name]))
        stats = torch.tensor([peak_rss(), m.state_bytes(), last[name]], dtype=torch.float64, device=rt.device)
        mx, avg = stats.clone(), stats.clone()
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        dist.all_reduce(avg)
        out["methods"][name] = {
            "params": seen[name], "step_times": times[name], "steps": steps[name],
            "peak_rss": int(mx[0]), "state_bytes": int(mx[1]), "final_loss": float(avg[2]) / rt.world_size,
            "comm_bytes_per_step": {k: v / n for k, v in wire[name].items() if v},
            "by_phase_per_step": {k: v / n for k, v in phased[name].items() if v},
            "collectives": m.describe()}
    for name in list(runs):   # an optimizer that goes finishes its in-flight gathers (its finalizer)
        del runs[name]
    return out


def _add(acc: dict, before: dict, after: dict) -> None:
    for k, v in after.items():
        acc[k] = acc.get(k, 0) + v - before.get(k, 0)


if __name__ == "__main__":
    main()
