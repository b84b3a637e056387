"""Planned vs measured peak memory of whole training steps, activations included (2 CPU ranks).

    python bench/activation_check.py            # five configurations, prints a markdown table

Each row is a fresh 2-process ``torchrun`` job of the launcher's own Llama built the launcher's way
(``launch.model``, ``launch.tp``, ``launch.optim``; DP x TP mesh when tp > 1), trained 3 steps on
random tokens. The planned peak is what ``launch/plan.py`` prints: ``zero_adam.memory.estimate``
(model states and transient buffers) plus ``launch.activations.activation_bytes`` for the same
micro-batch, sequence length, TP degree, activation checkpointing and dtype. The measured peak is
the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model
is built and warmed up) minus its resident set just before the model was built, worst rank.
``MALLOC_MMAP_THRESHOLD_`` is fixed at 128 KiB so freed tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from memory_check import rss, run_job  # noqa: E402

from launch import runtime  # noqa: E402
from launch import tp as tensor_parallel  # noqa: E402
from launch.activations import activation_bytes  # noqa: E402
from launch.config import ModelConfig, OptimConfig  # noqa: E402
from launch.model import build_model  # noqa: E402
from launch.optim import DTYPES, build_optimizer, param_groups  # noqa: E402
from zero_adam.memory import estimate, plan_params  # noqa: E402

MODEL = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704,
                    max_seq_len=512)
RUNS = {  # name: (micro_batch, seq_len, tp, checkpoint_every, param dtype)
    "fp32": (8, 256, 1, 0, "float32"),
    "fp32-full-ac": (8, 256, 1, 1, "float32"),
    "bf16": (8, 256, 1, 0, "bfloat16"),
    "bf16-every2": (8, 256, 1, 2, "bfloat16"),
    "fp32-tp2": (8, 256, 2, 0, "float32"),
}
MIB = 2 ** 20


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def step(model, opt, x: torch.Tensor) -> None:
    F.cross_entropy(model(x).float().flatten(0, 1), x.flatten()).backward()
    opt.step()
    opt.zero_grad()


def worker(name: str, out: str) -> None:
    torch.set_num_threads(1)
    micro, seq, tp, every, dtype_name = RUNS[name]
    rt = runtime.with_tp(runtime.init(), tp)
    optim = OptimConfig(param_dtype=None if dtype_name == "float32" else dtype_name, bucket_mb=4,
                        overlap_gather=False)
    x = torch.randint(0, MODEL.vocab_size, (micro, seq), generator=torch.Generator().manual_seed(rt.dp_rank))
    warm = build_model(MODEL.model_copy(update={"n_layers": 1}), every)   # code, kernels, allocator arenas
    if tp > 1:
        tensor_parallel.parallelize(warm, rt.mesh["tp"])
    warm_opt = build_optimizer(warm, optim, rt.group, mesh=rt.mesh)
    step(warm, warm_opt, x)
    warm_opt.close()
    del warm, warm_opt
    gc.collect()
    before = rss()
    torch.manual_seed(0)
    model = build_model(MODEL, every)
    if tp > 1:
        tensor_parallel.parallelize(model, rt.mesh["tp"])
    opt = build_optimizer(model, optim, rt.group, mesh=rt.mesh)
    gc.collect()
    reset_peak()
    for _ in range(3):
        step(model, opt, x)
    measured = peak_rss() - before
    with torch.device("meta"):
        meta = build_model(MODEL)
    dtype = DTYPES[dtype_name]
    plan = plan_params(param_groups(meta, optim), param_dtype=dtype if dtype != torch.float32 else None,
                       bucket_mb=optim.bucket_mb, world_size=rt.dp_size,
                       tp_rule=lambda n, s: tensor_parallel.local_shape(n, s, tp))
    states = estimate(plan, rt.dp_size, stage=optim.stage, backend=rt.backend).device.total
    acts = activation_bytes(MODEL, micro_batch=micro, seq_len=seq, tp=tp, checkpoint_every=every,
                            dtype=dtype)
    row = {"rank": rt.rank, "measured": measured, "states": states, "activations": acts.as_dict(),
           "planned": states + acts.total}
    rows = [None] * rt.world_size
    dist.all_gather_object(rows, row)
    if rt.rank == 0:
        Path(out).write_text(json.dumps(rows))
    opt.close()
    del opt, model
    runtime.shutdown()


def launch(name: str, tmp: Path) -> list[dict]:
    return run_job(__file__, 2, name, tmp / f"{name}.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.out)
    print("| run | micro x seq | TP | AC | model states + buffers | activations | planned peak "
          "| measured peak (worst rank) | measured / planned |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.runs:
            micro, seq, tp, every, _ = RUNS[name]
            rows = launch(name, Path(tmp))
            worst = max(rows, key=lambda r: abs(r["measured"] / r["planned"] - 1))
            ac = {0: "none", 1: "full"}.get(every, f"every:{every}")
            print(f"| {name} | {micro} x {seq} | {tp} | {ac} | {worst['states'] / MIB:.1f} MiB | "
                  f"{worst['activations']['total'] / MIB:.1f} MiB | {worst['planned'] / MIB:.1f} MiB | "
                  f"{worst['measured'] / MIB:.1f} MiB | {worst['measured'] / worst['planned']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
