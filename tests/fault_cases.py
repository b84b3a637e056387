"""Faults provoked inside a gloo world (spawned by tests/test_faults.py): fp16 overflow, injected
inf/NaN gradients, divergent settings, and a rank that dies or hangs."""

from __future__ import annotations

import math
import os
import signal
import time
import traceback

import torch
import torch.distributed as dist

from zero_adam import ZeroAdamW
from zero_adam.scaler import LossScaleConfig

from _models import batch, loss_fn, make_model, named_groups
from _parity import MICRO


def _guard(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}


def _slice(step, group):
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    x, y = batch(step, MICRO)
    b = MICRO // ws
    return x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]


def _state(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for fb in opt.buckets:
        out += [t.detach().clone() for t in fb.state_tensors().values()]
    return out


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def all_cases() -> dict:
    g2 = dist.new_group([0, 1])
    out = {}
    for name, fn in [("fp16", fp16_overflow), ("skip", lambda g: injected(g, "skip")),
                     ("raise", lambda g: injected(g, "raise")), ("lr", lambda g: divergent(g, "lr")),
                     ("groups", lambda g: divergent(g, "groups"))]:
        if dist.get_rank() < 2:
            out[name] = _guard(fn, g2)
        dist.barrier()
    return out


def fp16_overflow(group) -> dict:
    """fp16 params, a loss scale so large the first backward overflows: skipped steps touch no
    state on any rank, the scale backs off, then training proceeds (with clipping, accumulation)."""
    model = make_model()
    opt = ZeroAdamW(named_groups(model), lr=1e-2, process_group=group, param_dtype=torch.float16,
                    max_grad_norm=1.0, bucket_mb=0.004,
                    loss_scale=LossScaleConfig(init_scale=2.0 ** 24, hysteresis=1, growth_interval=1000))
    steps = []
    for step in range(10):
        before, scale = _state(model, opt), opt.loss_scale
        for k in range(2):
            x, y = _slice(step * 2 + k, group)
            with opt.no_sync() if k == 0 else torch.enable_grad():
                opt.scale_loss(loss_fn(model, x, y) / 2).backward()
        opt.step()
        unchanged = _same(before, _state(model, opt))
        steps.append({"skipped": opt.last_step_skipped, "unchanged": unchanged, "scale_before": scale,
                      "scale_after": opt.loss_scale, "norm": opt.last_grad_norm})
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(everyone, flat, group=group)
    return {"steps": steps, "same": torch.equal(everyone[0], everyone[1]),
            "step_count": float(opt.buckets[0].step), "skipped": opt.skipped_steps}


def injected(group, policy: str) -> dict:
    """Rank 1 puts an inf into out.bias's gradient at step 2 (a NaN at step 4)."""
    model = make_model()
    opt = ZeroAdamW(named_groups(model), lr=1e-2, process_group=group, bucket_mb=0.004, nonfinite=policy)
    bad = {2: math.inf, 4: math.nan}
    step_box = [0]
    if dist.get_rank(group) == 1:
        model.out.bias.register_hook(
            lambda g: g.index_fill(0, torch.tensor([0]), bad[step_box[0]]) if step_box[0] in bad else g)
    records = []
    for step in range(6):
        step_box[0] = step
        before = _state(model, opt)
        loss_fn(model, *_slice(step, group)).backward()
        opt.step()
        records.append({"skipped": opt.last_step_skipped, "unchanged": _same(before, _state(model, opt))})
    return {"steps": records, "skipped": opt.skipped_steps, "step_count": float(opt.buckets[0].step)}


def divergent(group, what: str) -> dict:
    model = make_model()
    rank = dist.get_rank(group)
    if what == "lr":
        ZeroAdamW(model.parameters(), lr=1e-3 if rank == 0 else 2e-3, process_group=group)
    else:
        groups = named_groups(model) if rank == 0 else [{"params": list(model.named_parameters())}]
        ZeroAdamW(groups, process_group=group)
    return {"constructed": True}


def dead_rank(mode: str, out_dir: str) -> dict:
    """Rank 1 is SIGKILLed (or SIGSTOPped: hung) at step 3; rank 0 must fail clearly and quickly."""
    model = make_model()
    opt = ZeroAdamW(model.parameters(), lr=1e-2, bucket_mb=0.004)
    rank = dist.get_rank()
    started = None
    try:
        for step in range(50):
            if step == 3:
                started = time.monotonic()
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
            loss_fn(model, *_slice(step, None)).backward()
            opt.step()
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started}
    with open(os.path.join(out_dir, f"dead-{rank}.json"), "w") as f:
        import json
        json.dump(result, f)
    os._exit(0)
