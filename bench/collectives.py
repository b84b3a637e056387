"""Which collective is fastest on this backend, for each direction of zero-adam's traffic?

    torchrun --standalone --nproc-per-node=2 bench/collectives.py [--rounds 9]

Times, on FP32 buckets of 1M-16M elements (6.5M = the default 25 MiB bucket), interleaved, median
over rounds, each direction through ``zero_adam.comm.Comm`` as the optimizer calls it, with each
choice: ``all_reduce`` both ways (a gather sums disjoint shards into zeros), ``reduce_scatter`` /
``all_gather``, and the point-to-point exchanges (``zero_adam.exchange``: a reduction sends each
rank its part and sums what it receives, a gather sends this rank's shard to every other rank,
received in place). ``reduce_collective``/``gather_collective="auto"`` follow
this measurement: exchanges on gloo, reduce-scatter and all-gather on NCCL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import runtime  # noqa: E402
from zero_adam.comm import Comm  # noqa: E402

SIZES = (1 << 20, 1 << 22, 25 * 2 ** 20 // 4, 1 << 24)
CHOICES = {"all_reduce": "all_reduce", "reduce_scatter / all_gather": None, "exchange": "exchange"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    rt = runtime.init()
    n = rt.world_size
    comms = {name: Comm(dist.group.WORLD, reduce_collective=c or "reduce_scatter",
                        gather_collective=c or "all_gather") for name, c in CHOICES.items()}
    cols = [f"{way} by {name} (ms)" for way in ("reduce", "gather") for name in comms]
    rows = ["| elements | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for numel in SIZES:
        numel -= numel % n
        full = torch.randn(numel, device=rt.device)
        lo, hi = rt.rank * (numel // n), (rt.rank + 1) * (numel // n)
        ops = [(c.reduce_mean, full, lo, hi) for c in comms.values()]
        ops += [(c.all_gather, full, lo, hi) for c in comms.values()]
        times: list[list[float]] = [[] for _ in ops]
        for _ in range(a.rounds):
            for (op, *args), ts in zip(ops, times):
                dist.barrier()
                t = time.perf_counter()
                op(*args).wait()
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
        rows.append(f"| {numel:,} | " + " | ".join(f"{statistics.median(v[1:]) * 1e3:.1f}" for v in times)
                    + " |")
    if rt.is_main:
        print(f"{rt.backend}, {n} ranks, median of {a.rounds - 1} rounds:")
        print("\n".join(rows))
    runtime.shutdown()


if __name__ == "__main__":
    main()
