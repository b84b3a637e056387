"""One benchmark job, launched by torchrun on N ranks (see bench/run.py).

    torchrun --standalone --nproc-per-node=2 bench/worker.py --method zero-adam-2 --out r.json
    torchrun --standalone --nproc-per-node=2 bench/worker.py --interleave ddp zero-adam-2 --out t.json

With ``--method``: trains the benchmark model for warmup + timed steps on the same data and seed
as every other method, and writes this rank's optimizer-state bytes, peak RSS, bytes sent to
collectives per step, the loss of the last step (averaged over ranks) and the step times.
With ``--interleave``: builds every listed method on its own copy of the model in this process
and runs one step of each in turn, round after round, so that the shared machine's slow phases
hit every method alike; writes each method's step times (this is what the ratios come from).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import runtime  # noqa: E402
from launch.config import DataConfig, ModelConfig  # noqa: E402
from launch.data import batch, load_corpus  # noqa: E402
from launch.model import Llama, count_params  # noqa: E402

import comm_count  # noqa: E402
import methods  # noqa: E402

MODEL = ModelConfig(vocab_size=4096, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408,
                    max_seq_len=128)


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
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    rt = runtime.init()
    comm_count.install()
    if any(m.startswith("deepspeed") for m in (a.interleave or [a.method])):
        import deepspeed
        deepspeed.init_distributed(dist_backend=rt.backend)
    if a.interleave:
        interleave(a, rt)
        runtime.shutdown()
        return
    torch.manual_seed(0)
    model = Llama(MODEL).to(rt.device)
    n_params = count_params(model)
    method = methods.build(a.method, model, rt.device, a.micro_batch)
    corpus = load_corpus(DataConfig(max_bytes=2_000_000), a.seq_len, MODEL.vocab_size)
    glob = a.micro_batch * rt.world_size
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        x, y = batch(corpus.train, seed=0, step=step, global_batch=glob, lo=rt.rank * a.micro_batch,
                     hi=(rt.rank + 1) * a.micro_batch, seq_len=a.seq_len)
        x, y = x.to(rt.device), y.to(rt.device)
        if step == a.warmup:
            comm_before = comm_count.snapshot()
        dist.barrier()
        sync(rt.device)
        t0 = time.perf_counter()
        loss = method.step(x, y)
        sync(rt.device)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    comm = {k: (v - comm_before.get(k, 0)) / a.steps for k, v in comm_count.snapshot().items()}
    stats = torch.tensor([peak_rss(), method.state_bytes(), statistics.median(times)], dtype=torch.float64,
                         device=rt.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    last = torch.tensor([losses[-1]], dtype=torch.float64, device=rt.device)
    dist.all_reduce(last)
    if rt.is_main:
        out = {"method": a.method, "world_size": rt.world_size, "device": str(rt.device.type),
               "params": n_params, "step_s": float(stats[2]), "step_times": times,
               "peak_rss": int(stats[0]), "state_bytes": int(stats[1]),
               "comm_bytes_per_step": comm, "final_loss": float(last) / rt.world_size}
        Path(a.out).write_text(json.dumps(out, indent=1))
    del method, model  # an optimizer that goes finishes its in-flight gathers (its finalizer)
    runtime.shutdown()


def interleave(a: argparse.Namespace, rt: runtime.Runtime) -> None:
    runs = {}
    for name in a.interleave:
        torch.manual_seed(0)
        runs[name] = methods.build(name, Llama(MODEL).to(rt.device), rt.device, a.micro_batch)
    corpus = load_corpus(DataConfig(max_bytes=2_000_000), a.seq_len, MODEL.vocab_size)
    glob = a.micro_batch * rt.world_size
    times: dict[str, list[float]] = {n: [] for n in runs}
    for step in range(a.warmup + a.steps):
        x, y = batch(corpus.train, seed=0, step=step, global_batch=glob, lo=rt.rank * a.micro_batch,
                     hi=(rt.rank + 1) * a.micro_batch, seq_len=a.seq_len)
        x, y = x.to(rt.device), y.to(rt.device)
        for name in (list(runs)[step % len(runs):] + list(runs)[:step % len(runs)]):
            dist.barrier()
            sync(rt.device)
            t0 = time.perf_counter()
            runs[name].step(x, y)
            sync(rt.device)
            if step >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    if rt.is_main:
        Path(a.out).write_text(json.dumps({"step_times": times, "world_size": rt.world_size}))


if __name__ == "__main__":
    main()
