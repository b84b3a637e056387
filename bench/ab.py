"""A/B of zero-adam variants against DDP, interleaved step by step inside one job.

    torchrun --standalone --nproc-per-node=2 bench/ab.py [--rounds 12] [--variants ddp z2 z2-overlap]

Each variant trains its own copy of the benchmark model; every round runs one step of each
variant in turn, so slow drifts of a shared machine hit all variants alike. Prints the median step
time of each variant and the median of its per-round ratio to DDP. For deciding defaults quickly;
bench/run.py is the full comparison with the other libraries.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import runtime  # noqa: E402
from launch.model import Llama  # noqa: E402

import methods  # noqa: E402
from worker import MODEL  # noqa: E402

VARIANTS = {
    "ddp": lambda m, d: methods.ddp(m, d),
    "z1": lambda m, d: methods.zero_adam(m, 1),
    "z2": lambda m, d: methods.zero_adam(m, 2),
    "z1-overlap": lambda m, d: methods.zero_adam(m, 1, overlap_gather=True),
    "z2-overlap": lambda m, d: methods.zero_adam(m, 2, overlap_gather=True),
    "z2-overlap-ag": lambda m, d: methods.zero_adam(m, 2, overlap_gather=True,
                                                    gather_collective="all_gather"),
    "z2-ag": lambda m, d: methods.zero_adam(m, 2, gather_collective="all_gather"),
    "z2-rs-ag": lambda m, d: methods.zero_adam(m, 2, reduce_collective="reduce_scatter",
                                               gather_collective="all_gather"),
    "z2-overlap-b8": lambda m, d: methods.zero_adam(m, 2, overlap_gather=True, bucket_mb=8),
    "z2-overlap-b50": lambda m, d: methods.zero_adam(m, 2, overlap_gather=True, bucket_mb=50),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=["ddp", "z2", "z2-overlap"])
    a = p.parse_args()
    rt = runtime.init()
    runs = {}
    for name in a.variants:
        torch.manual_seed(0)
        model = Llama(MODEL).to(rt.device)
        runs[name] = VARIANTS[name](model, rt.device)
    g = torch.Generator().manual_seed(rt.rank)
    times = {n: [] for n in runs}
    for r in range(a.rounds + 2):
        x = torch.randint(0, MODEL.vocab_size, (8, 128), generator=g).to(rt.device)
        y = torch.randint(0, MODEL.vocab_size, (8, 128), generator=g).to(rt.device)
        for name, m in runs.items():
            dist.barrier()
            t = time.perf_counter()
            m.step(x, y)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    if rt.is_main:
        base = times.get("ddp")
        for name, ts in times.items():
            ratio = statistics.median(t / b for t, b in zip(ts, base)) if base else float("nan")
            print(f"{name:>16}: median {statistics.median(ts) * 1e3:7.1f} ms, vs ddp {ratio:.3f}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
