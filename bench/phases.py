"""Where a step's time goes: forward, backward and optimizer step, per method, interleaved.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node=2 bench/phases.py [--rounds 10] [--profile]

DDP + fused AdamW, zero-adam stage 2 (overlap_gather on) and DeepSpeed ZeRO-2 train their own
copy of the benchmark model; every round times one step of each (medians printed). Communication
overlapped with compute shows up inside forward (zero-adam's all-gather waits) or backward
(gradient reductions); what is left in "step" is the optimizer and whatever waits it holds.
``--profile`` then runs two more steps of each under ``torch.profiler`` and prints, per method,
the operators that take the most self time on rank 0 (where inside the phases the time goes).
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
import torch.nn.functional as F  # noqa: E402
from shapes import LLAMA as MODEL  # noqa: E402

from launch import runtime  # noqa: E402
from launch.model import Llama  # noqa: E402

import methods  # noqa: E402


def build(name: str, rt):
    torch.manual_seed(0)
    model = Llama(MODEL).to(rt.device)
    if name == "ddp":
        fwd = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=methods.LR, fused=True)
        return fwd, lambda loss: loss.backward(), lambda: (
            torch.nn.utils.clip_grad_norm_(model.parameters(), methods.CLIP), opt.step(), opt.zero_grad())
    if name == "zero-adam-2":
        from zero_adam import ZeroAdamW
        opt = ZeroAdamW(model.parameters(), lr=methods.LR, stage=2, max_grad_norm=methods.CLIP,
                        overlap_gather=True)
        return model, lambda loss: loss.backward(), lambda: (opt.step(), opt.zero_grad())
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": methods.CLIP,
              "zero_optimization": {"stage": 2, "overlap_comm": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=methods.LR, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    return engine, engine.backward, engine.step


def one_step(fwd, backward, step, x: torch.Tensor) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    with torch.profiler.record_function("## forward"):
        loss = F.cross_entropy(fwd(x).float().flatten(0, 1), x.flatten())
    t1 = time.perf_counter()
    with torch.profiler.record_function("## backward"):
        backward(loss)
    t2 = time.perf_counter()
    with torch.profiler.record_function("## step"):
        step()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def profile(runs: dict, x: torch.Tensor, is_main: bool) -> None:
    """Two steps per method under the torch profiler; rank 0 prints the top operators by self time."""
    for name, (fwd, backward, step) in runs.items():
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                one_step(fwd, backward, step, x)
        if is_main:
            print(f"\n### {name}: top operators by self CPU time (2 steps, rank 0)\n")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                              max_name_column_width=48)
            print(table)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler operator table")
    a = p.parse_args()
    rt = runtime.init()
    import deepspeed
    deepspeed.init_distributed(dist_backend=rt.backend)
    runs = {n: build(n, rt) for n in ("ddp", "zero-adam-2", "deepspeed-2")}
    times = {n: {"forward": [], "backward": [], "step": [], "total": []} for n in runs}
    g = torch.Generator().manual_seed(rt.rank)
    for r in range(a.rounds + 2):
        x = torch.randint(0, MODEL.vocab_size, (8, 128), generator=g)
        for name, (fwd, backward, step) in runs.items():
            dist.barrier()
            f, b, s = one_step(fwd, backward, step, x)
            if r >= 2:
                for k, v in (("forward", f), ("backward", b), ("step", s), ("total", f + b + s)):
                    times[name][k].append(v)
    if rt.is_main:
        print("| method | forward (ms) | backward (ms) | optimizer step (ms) | total (ms) |")
        print("| --- | --- | --- | --- | --- |")
        for name, ph in times.items():
            print(f"| {name} | " + " | ".join(f"{statistics.median(ph[k]) * 1e3:.0f}"
                                               for k in ("forward", "backward", "step", "total")) + " |")
    if a.profile:
        profile(runs, x, rt.is_main)
    runtime.shutdown()


if __name__ == "__main__":
    main()
