"""GPU check: the CUDA + NCCL path of zero-adam, in a few minutes, on whatever cards are present.

    python bench/gpu_check.py                      # writes docs/gpu_check.json and prints markdown
    python bench/gpu_check.py --device cpu --quick # the same code path on CPU + gloo (used by tests)

1. Bandwidth: the card's copy bandwidth (``y.copy_(x)``) and in-place streaming (``x.mul_(1)``)
   against fused AdamW over one flat FP32 shard (28 bytes moved per element).
2. Exactness on NCCL world size 1: ZeroAdamW stage 1 and 2, fp32 and bf16 params, against
   ``torch.optim.AdamW(fused=True)`` on the same device, 10 steps.
3. Step time against DDP + fused AdamW, interleaved, on a bf16 Llama-style model: world size 1,
   and world size N when N > 1 GPUs are present (one process per GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from launch.config import ModelConfig  # noqa: E402
from launch.model import Llama, count_params  # noqa: E402
from zero_adam import ZeroAdamW  # noqa: E402

from kernel_bw import measure, timed  # noqa: E402

BIG = ModelConfig(vocab_size=32000, dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, ffn_dim=2816,
                  max_seq_len=512)
SMALL = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=32)


def bandwidth(device: torch.device, numel: int) -> dict:
    x, y = torch.randn(numel, device=device), torch.empty(numel, device=device)
    out = measure(numel, device)
    out["copy_GBps"] = 8 * numel / timed(lambda: y.copy_(x), device) / 1e9
    out["fused_vs_copy"] = out["fused_GBps"] / out["copy_GBps"]
    return out


def _init(backend: str, rank: int, world: int, port: int) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))


def exactness(device: torch.device) -> dict:
    """Max |param - reference| after 10 steps, world size 1 (the process group already exists)."""
    out = {}
    for stage in (1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            ours = Llama(SMALL).to(device)
            ref = Llama(SMALL).to(device)
            ref.load_state_dict(ours.state_dict())
            opt = ZeroAdamW(ours.parameters(), lr=1e-3, stage=stage, bucket_mb=0.05,
                            param_dtype=None if dtype == torch.float32 else dtype)
            masters = [p.detach().clone().float().requires_grad_() for p in ref.parameters()]
            ref_opt = torch.optim.AdamW(masters, lr=1e-3, fused=True)
            ref.to(dtype)
            for step in range(10):
                g = torch.Generator(device="cpu").manual_seed(step)
                x = torch.randint(0, SMALL.vocab_size, (4, 32), generator=g).to(device)
                for model in (ours, ref):
                    F.cross_entropy(model(x).float().flatten(0, 1), x.flatten()).backward()
                opt.step()
                for m, p in zip(masters, ref.parameters()):
                    m.grad = p.grad.float()
                    p.grad = None
                ref_opt.step()
                with torch.no_grad():
                    for m, p in zip(masters, ref.parameters()):
                        p.copy_(m)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours.parameters(),
                                                                                  ref.parameters()))
            out[f"stage{stage}-{str(dtype).removeprefix('torch.')}"] = diff
    return out


def step_times(device: torch.device, cfg: ModelConfig, steps: int, batch: int) -> dict:
    """Interleaved steps of DDP + fused AdamW and ZeroAdamW stage 2 (overlap on), bf16 params."""
    runs = {}
    for name in ("ddp", "zero-adam-2"):
        torch.manual_seed(0)
        model = Llama(cfg).to(device).to(torch.bfloat16)
        if name == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        else:
            fwd, opt = model, ZeroAdamW(model.parameters(), lr=1e-4, stage=2, overlap_gather=True)
        runs[name] = (fwd, opt, [])
    n_params = count_params(runs["ddp"][0])
    rank = dist.get_rank()
    for step in range(steps + 2):
        g = torch.Generator(device="cpu").manual_seed(1000 * rank + step)
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=g).to(device)
        for fwd, opt, times in runs.values():
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            F.cross_entropy(fwd(x).float().flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 2:
                times.append(time.perf_counter() - t)
    ddp, zero = runs["ddp"][2], runs["zero-adam-2"][2]
    return {"params": n_params, "world_size": dist.get_world_size(), "ddp_s": statistics.median(ddp),
            "zero_adam_2_s": statistics.median(zero),
            "ratio": statistics.median(z / d for z, d in zip(zero, ddp))}


def _worker(rank: int, world: int, port: int, backend: str, quick: bool, out_dir: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init(backend, rank, world, port)
    cfg, steps, batch = (SMALL, 3, 2) if quick else (BIG, 20, 8)
    result = step_times(device, cfg, steps, batch)
    if rank == 0:
        Path(out_dir, "multi.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the code path)")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "gpu_check.json"))
    a = p.parse_args()
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "backend": backend,
            "date": datetime.date.today().isoformat()}
    started = time.time()
    report = {"info": info, "bandwidth": bandwidth(device, 1 << (20 if a.quick else 28))}
    _init(backend, 0, 1, _free_port())
    report["exactness_max_param_diff"] = exactness(device)
    cfg, steps, batch = (SMALL, 3, 2) if a.quick else (BIG, 20, 8)
    report["step_time_ws1"] = step_times(device, cfg, steps, batch)
    dist.destroy_process_group()
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else (2 if a.quick else 1)
    if n_gpu > 1:
        out_dir = Path(a.out).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        mp.spawn(_worker, args=(n_gpu, _free_port(), backend, a.quick, str(out_dir)), nprocs=n_gpu)
        report["step_time_wsN"] = json.loads((out_dir / "multi.json").read_text())
        (out_dir / "multi.json").unlink()
    report["minutes"] = (time.time() - started) / 60
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))


def markdown(r: dict) -> str:
    b, i = r["bandwidth"], r["info"]
    head = f"## GPU check: {i['device']} ({i['date']}, torch {i['torch']}, CUDA {i['cuda']}, {i['backend']})"
    lines = [head, "", "Command: `python bench/gpu_check.py`", "",
             f"- Fused AdamW on a flat shard of {b['numel']:,} FP32 elements: "
             f"{b['fused_flat_s'] * 1e3:.2f} ms, "
             f"{b['fused_params_per_s'] / 1e9:.1f} G params/s, {b['fused_GBps']:.0f} GB/s effective; copy "
             f"bandwidth {b['copy_GBps']:.0f} GB/s, in-place streaming {b['stream_GBps']:.0f} GB/s: "
             f"**{b['fused_vs_copy']:.2f}x copy bandwidth**.",
             "- Max |param - torch.optim.AdamW(fused)| after 10 steps, world size 1: " +
             ", ".join(f"{k} {v:.1e}" for k, v in r["exactness_max_param_diff"].items()) + "."]
    for key in ("step_time_ws1", "step_time_wsN"):
        if key in r:
            s = r[key]
            lines.append(f"- Step time, {s['params'] / 1e6:.1f}M-param bf16 Llama, world size "
                         f"{s['world_size']}: DDP + fused AdamW {s['ddp_s'] * 1e3:.1f} ms, ZeroAdamW stage 2 "
                         f"{s['zero_adam_2_s'] * 1e3:.1f} ms ({s['ratio']:.2f}x).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
