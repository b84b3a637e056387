"""Planned vs measured memory at 2-4 ranks: the optimizer's tensor bytes and the process's growth.

    python bench/memory_check.py                 # N = 2 and 4, four option sets, prints a table
    python bench/memory_check.py --world-sizes 2 --options stage2 stage2-bf16

For each (N, option set) a fresh ``torchrun`` job builds the benchmark Llama (16.0M params), then
ZeroAdamW, and trains 3 steps. Every rank reports

* ``memory_report()`` against ``zero_adam.memory.estimate`` for the same plan (equal to the byte),
* its resident-set growth from just before the optimizer is built to after the steps, against
  what the plan says the optimizer adds: its total minus the model's original parameter bytes,
  which the flat buffers replace.

The jobs run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that freed large tensors go back
to the OS (glibc otherwise raises the threshold and keeps them in its heap), which makes RSS a
faithful meter of live tensor bytes; what is left is the allocator's and autograd's small change.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from shapes import LLAMA as MODEL  # noqa: E402

from launch import runtime  # noqa: E402
from launch.model import Llama  # noqa: E402
from zero_adam import ZeroAdamW  # noqa: E402
from zero_adam.memory import FIELDS, estimate, plan_params  # noqa: E402

OPTIONS = {
    "stage1": dict(stage=1),
    "stage2": dict(stage=2),
    "stage2-bf16": dict(stage=2, param_dtype="bfloat16"),
    "stage2-bf16-remainder": dict(stage=2, param_dtype="bfloat16", master="remainder"),
}
MIB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(option: str, out: str) -> None:
    torch.set_num_threads(1)
    runtime.init()
    kw = dict(OPTIONS[option])
    dtype = getattr(torch, kw.pop("param_dtype")) if "param_dtype" in kw else None
    torch.manual_seed(0)
    model = Llama(MODEL)
    original = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randint(0, MODEL.vocab_size, (8, 128), generator=torch.Generator().manual_seed(dist.get_rank()))
    # warm autograd, the allocator and the matmul library's caches once, in the dtype the run uses
    replica = copy.deepcopy(model).to(dtype or torch.float32)
    F.cross_entropy(replica(x).float().flatten(0, 1), x.flatten()).backward()
    del replica
    warm_up()  # one-time code loading is not the optimizer's memory
    before = rss()
    opt = ZeroAdamW(model.parameters(), lr=1e-3, param_dtype=dtype, **kw)
    for _ in range(3):
        F.cross_entropy(model(x).float().flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()
    gc.collect()
    grown = rss() - before
    plan = plan_params(Llama(MODEL).to("meta").parameters(), param_dtype=dtype,
                       world_size=dist.get_world_size())
    e = estimate(plan, dist.get_world_size(), stage=kw["stage"], master=kw.get("master", "fp32"),
                 backend=dist.get_backend()).device
    got = opt.memory_report()
    row = {"rank": dist.get_rank(), "report": got, "plan": {f: getattr(e, f) for f in FIELDS},
           "plan_total": e.total, "original_params": original, "rss_growth": grown,
           "plan_growth": e.total - original}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    del opt, model
    runtime.shutdown()


def warm_up() -> None:
    """A tiny ZeroAdamW and one step: the lazily imported modules (DTensor, ...) and the allocator's
    first arenas would otherwise count as growth (about 28 MiB here)."""
    layer = torch.nn.Linear(4, 4)
    opt = ZeroAdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(2, 4)).sum().backward()
    opt.step()
    del opt, layer
    gc.collect()


def run_job(script: str, world: int, name: str, out: Path) -> list[dict]:
    """``torchrun`` ``script --worker name --out out`` on ``world`` CPU processes with the allocator
    set up for measuring (freed tensors leave the resident set); the rows rank 0 wrote."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           script, "--worker", name, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{name} at N={world} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def launch(world: int, option: str, tmp: Path) -> list[dict]:
    return run_job(__file__, world, option, tmp / f"{option}-{world}.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.out)
    print("| N | options | optimizer tensors: measured = planned | RSS growth (worst rank) | planned growth "
          "| ratio |\n| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for world in a.world_sizes:
            for option in a.options:
                rows = launch(world, option, Path(tmp))
                exact = all(r["report"][f] == r["plan"][f] for r in rows for f in FIELDS if f != "buffers")
                exact &= all(r["report"]["buffers"] <= r["plan"]["buffers"] for r in rows)
                worst = max(rows, key=lambda r: abs(r["rss_growth"] - r["plan_growth"]))
                held = rows[0]["report"]["total"] / MIB
                print(f"| {world} | {option} | {'yes' if exact else 'NO'} ({held:.1f} MiB) | "
                      f"{worst['rss_growth'] / MIB:.1f} MiB | {worst['plan_growth'] / MIB:.1f} MiB | "
                      f"{worst['rss_growth'] / worst['plan_growth']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
