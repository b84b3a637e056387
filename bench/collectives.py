"""Which collective is fastest on this backend? all-reduce vs reduce-scatter vs all-gather.

    torchrun --standalone --nproc-per-node=2 bench/collectives.py

Times each collective on fp32 tensors of 1M-16M elements (interleaved, median of 5). zero-adam's
``reduce_collective``/``gather_collective="auto"`` follow this measurement: on gloo an all-reduce
is faster than both, so both operations are all-reduces; on NCCL reduce-scatter/all-gather are.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import runtime  # noqa: E402


def main() -> None:
    rt = runtime.init()
    n = rt.world_size
    print_rows = ["| elements | all_reduce (ms) | reduce_scatter (ms) | all_gather (ms) |",
                  "| --- | --- | --- | --- |"]
    for numel in (1 << 20, 1 << 22, 1 << 24):
        full = torch.randn(numel, device=rt.device)
        shard = torch.empty(numel // n, device=rt.device)
        ops = {"all_reduce": lambda f=full: dist.all_reduce(f),
               "reduce_scatter": lambda f=full, s=shard: dist.reduce_scatter_single(s, f),
               "all_gather": lambda f=full, s=shard: dist.all_gather_single(f, s)}
        times = {k: [] for k in ops}
        for _ in range(6):
            for k, op in ops.items():
                dist.barrier()
                t = time.perf_counter()
                op()
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        print_rows.append(f"| {numel:,} | " + " | ".join(f"{statistics.median(v[1:]) * 1e3:.1f}"
                                                         for v in times.values()) + " |")
    if rt.is_main:
        print(f"{rt.backend}, {n} ranks:")
        print("\n".join(print_rows))
    runtime.shutdown()


if __name__ == "__main__":
    main()
