"""Is the local step at the memory-bandwidth limit? Fused AdamW on a flat shard vs streaming.

    python bench/kernel_bw.py [--numel 16777216] [--device cpu|cuda] [--threads 1]

AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq: 28 bytes per
FP32 element. ``x.mul_(1)`` reads and writes 8 bytes per element: the machine's in-place streaming
bandwidth. Also timed: the same update as torch.optim.AdamW(foreach=True) and as fused AdamW over
the 4 x 4 layer-shaped pieces a per-parameter optimizer would see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zero_adam import kernel  # noqa: E402


def timed(fn, device: torch.device, reps: int = 7) -> float:
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(numel: int, device: torch.device) -> dict:
    def tensors(n):
        return [torch.randn(n, device=device) for _ in range(4)]
    p, g, m, v = tensors(numel)
    step = torch.zeros((), device=device)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    fused = timed(lambda: kernel.adamw_([p], [g], [m], [v], [step], **hp), device)
    stream = timed(lambda: p.mul_(1.0), device)
    pieces = [tensors(numel // 16) for _ in range(16)]
    steps = [torch.zeros((), device=device) for _ in range(16)]
    per_param = timed(lambda: kernel.adamw_(*[[x[i] for x in pieces] for i in range(4)], steps, **hp),
                      device)
    params = [torch.nn.Parameter(torch.randn(numel // 16, device=device)) for _ in range(16)]
    for q in params:
        q.grad = torch.randn_like(q)
    foreach_opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    foreach = timed(foreach_opt.step, device)
    gb = 1e9
    return {
        "numel": numel, "device": str(device), "threads": torch.get_num_threads(),
        "fused_flat_s": fused, "fused_params_per_s": numel / fused,
        "fused_GBps": 28 * numel / fused / gb, "stream_GBps": 8 * numel / stream / gb,
        "fused_vs_stream": (28 * numel / fused) / (8 * numel / stream),
        "fused_16_pieces_s": per_param, "foreach_16_params_s": foreach,
        "foreach_over_fused": foreach / fused,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(measure(a.numel, torch.device(a.device)), indent=1))


if __name__ == "__main__":
    main()
