"""Cases that run inside one 4-process gloo world (spawned once by tests/test_distributed.py).

World sizes 1-3 run on subgroups of the 4 ranks (ZeroAdamW takes ``process_group``); ranks
outside a case's subgroup skip it. Each case's result is JSON, checked by the parent.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
import torch.distributed as dist

from zero_adam import ZeroAdamW

from _models import batch, loss_fn, make_model, named_groups
from _parity import MICRO, run_parity

PARITY = [
    dict(name="plain", stage=1), dict(name="plain", stage=2),
    dict(name="clip_accum", stage=1, clip=0.05, accum=3),
    dict(name="clip_accum", stage=2, clip=0.05, accum=3),
    dict(name="clip_accum_local", stage=2, clip=0.05, accum=3, accumulate="local"),
    dict(name="bf16_accum", stage=1, dtype="bf16", accum=2, clip=0.1),
    dict(name="bf16_accum", stage=2, dtype="bf16", accum=2, clip=0.1),
    dict(name="overlap", stage=1, overlap=True, clip=0.05),
    dict(name="overlap_accum", stage=2, overlap=True, clip=0.05, accum=2),
    dict(name="overlap_bf16", stage=2, overlap=True, dtype="bf16"),
    # the collectives gloo's "auto" no longer picks (it picks exchanges), forced: same results
    dict(name="all_reduce_both", stage=2, overlap=True, reduce="all_reduce", gather="all_reduce", accum=2),
    dict(name="rs_ag", stage=1, reduce="reduce_scatter", gather="all_gather", clip=0.05),
]


def parity_all() -> dict:
    """Every parity case on world sizes 1-4."""
    groups = {ws: dist.new_group(list(range(ws))) for ws in (1, 2, 3, 4)}
    results = {}
    for ws, group in groups.items():
        for case in PARITY:
            key = f"{case['name']}-stage{case['stage']}-ws{ws}"
            if dist.get_rank() < ws:
                results[key] = _guard(run_parity, case, group)
            dist.barrier()
    return results


def behaviour_all() -> dict:
    """Non-parity behaviour on 2-3 ranks: errors, unused params, state dicts."""
    g2, g3 = dist.new_group([0, 1]), dist.new_group([0, 1, 2])
    out = {}
    for name, fn, group, ws in [
        ("unused", unused_params, g3, 3), ("mismatch", mismatched_models, g2, 2),
        ("ddp", ddp_wrapped, g2, 2), ("ddp_later", ddp_wrapped_later, g2, 2),
        ("roundtrip1", lambda g: roundtrip(g, 1), g3, 3),
        ("roundtrip2", lambda g: roundtrip(g, 2), g3, 3),
        ("outside_use", lambda g: outside_use(g, switch_at=None), g2, 2),
        ("switch_to_outside_use", lambda g: outside_use(g, switch_at=3), g2, 2),
        ("broken_prefetch", broken_prefetch, g2, 2),
    ]:
        if dist.get_rank() < ws:
            out[name] = _guard(fn, group)
        dist.barrier()
    return out


def _guard(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # reported to the parent, which asserts on it
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}


def unused_params(group) -> dict:
    """'spare' is used on rank 0 only; 'never' gets no gradient anywhere: no hang, same params."""
    model = make_model(unused=True)
    model.never = torch.nn.Parameter(torch.randn(3))
    spare0 = model.spare.detach().clone()
    never = model.never.detach().clone()
    opt = ZeroAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, process_group=group, bucket_mb=0.004)
    ref = torch.optim.AdamW([never], lr=1e-2, weight_decay=0.1)
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    for step in range(4):
        x, y = batch(step, MICRO)
        b = MICRO // ws
        loss = loss_fn(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
        if rank == 0:
            loss = loss + model.spare.square().mean()
        loss.backward()
        opt.step()
        never.grad = torch.zeros_like(never)
        ref.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(ws)]
    dist.all_gather(everyone, flat, group=group)
    return {"same": all(torch.equal(everyone[0], t) for t in everyone),
            "spare_moved": not torch.equal(model.spare.detach(), spare0),
            "never_vs_zero_grad_adamw": (model.never.detach() - never).abs().max().item()}


def mismatched_models(group) -> dict:
    hidden = 257 if dist.get_rank(group) == 0 else 256
    ZeroAdamW(make_model(hidden=hidden).parameters(), process_group=group)
    return {"constructed": True}


def ddp_wrapped(group) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(make_model(), process_group=group)
    ZeroAdamW(model.parameters(), process_group=group)
    return {"constructed": True}


def ddp_wrapped_later(group) -> dict:
    """What transformers.Trainer or accelerator.prepare do to a model whose ZeroAdamW exists: wrap
    it in DDP. The first step() refuses before anything is updated."""
    model = make_model()
    opt = ZeroAdamW(model.parameters(), process_group=group)
    before = [p.detach().clone() for p in model.parameters()]
    wrapped = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    x, y = batch(0, MICRO)
    loss_fn(wrapped, x, y).backward()
    try:
        opt.step()
    except ValueError as e:
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return {"error": f"ValueError: {e}", "unchanged": unchanged}
    return {"stepped": True}


def roundtrip(group, stage: int) -> dict:
    """state_dict after 3 steps, 3 more steps; a fresh optimizer loading it repeats them exactly."""
    rank, ws = dist.get_rank(group), dist.get_world_size(group)

    def train(model, opt, steps):
        for step in steps:
            x, y = batch(step, MICRO)
            b = MICRO // ws
            loss_fn(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).backward()
            opt.step()

    def build():
        model = make_model()
        return model, ZeroAdamW(named_groups(model), lr=1e-2, process_group=group, stage=stage,
                                bucket_mb=0.004, param_dtype=torch.bfloat16)

    model, opt = build()
    train(model, opt, range(3))
    saved = _clone(opt.state_dict())
    train(model, opt, range(3, 6))
    model2, opt2 = build()
    opt2.load_state_dict(saved)
    train(model2, opt2, range(3, 6))
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    other = _clone(saved)
    other["zero_adam"]["world_size"] = ws + 1
    out = {"same": same, "wrong_world_refused": False, "file_fraction": _saved_fraction(group, stage)}
    with contextlib.suppress(ValueError):
        opt2.load_state_dict(other)
        return out
    return {**out, "wrong_world_refused": True}


def _saved_fraction(group, stage: int) -> float:
    """torch.save(opt.state_dict()) of FP32 params (whose master is a slice of the parameter
    buffer) over the unsharded AdamW state (12 bytes per parameter)."""
    import io
    model = make_model()
    opt = ZeroAdamW(named_groups(model), process_group=group, stage=stage)  # one bucket per group
    loss_fn(model, *batch(0, MICRO)).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    opt.close()
    return buf.getbuffer().nbytes / (12 * sum(p.numel() for p in model.parameters()))


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


class Outside(torch.nn.Module):
    """``b``'s weights are used by the parent's code without calling ``b`` (from ``switch_at`` on)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(17, 64)
        self.b = torch.nn.Linear(64, 33)
        self.direct = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return torch.nn.functional.linear(h, self.b.weight, self.b.bias) if self.direct else self.b(h)


def outside_use(group, switch_at) -> dict:
    """With overlap_gather, every forward sees this step's weights, also when the parent's code
    reads a child's weight directly (from ``switch_at`` on: the recorded order does not know)."""
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    model = Outside()
    model.direct = switch_at is None
    ref = Outside()
    ref.load_state_dict(model.state_dict())
    ref.direct = model.direct
    opt = ZeroAdamW(model.parameters(), lr=1e-2, process_group=group, bucket_mb=0.001, overlap_gather=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    events: list = []   # what step() did, in order: ("update" | "gather", bucket)
    update_one, gather_one = opt._update_one, opt._gather_one
    opt._update_one = lambda bi: (events.append(("update", bi)), update_one(bi))[1]
    opt._gather_one = lambda bi: (events.append(("gather", bi)), gather_one(bi))[1]
    worst = 0.0
    b = MICRO // ws
    for step in range(6):
        events.clear()
        if switch_at is not None and step == switch_at:
            model.direct = ref.direct = True
        x, y = batch(step, MICRO)
        ours = loss_fn(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
        with torch.no_grad():
            worst = max(worst, abs(float(ours.detach()) - float(loss_fn(ref, x[rank * b:(rank + 1) * b],
                                                                       y[rank * b:(rank + 1) * b]))))
        ours.backward()
        opt.step()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return {"loss_diff": worst, "eager": sorted(opt._prefetch.eager), "order": opt._prefetch.order,
            "last_step": events, "buckets": len(opt.buckets)}


def broken_prefetch(group) -> dict:
    """The parity harness must notice a forward on stale weights: disable the waits and look."""
    from zero_adam.comm import Comm, Pending
    from zero_adam.prefetch import GatherPrefetch

    from _parity import run_parity
    saved = GatherPrefetch._pre_forward, GatherPrefetch.check_grad, GatherPrefetch.wait_for, Comm.all_gather
    GatherPrefetch._pre_forward = lambda self, module, args: (
        self._recording.extend(self._direct_buckets(module)) if self._recording is not None else None)
    GatherPrefetch.check_grad = lambda self, bi, name: None
    GatherPrefetch.wait_for = lambda self, values: None  # the per-read guard too

    def late_gather(self, full, lo, hi, what="parameter all-gather"):
        """A gather that lands only when waited for: a read without the wait sees other ranks'
        shards zeroed, however fast the collective would have been (no timing in the check)."""
        if not self.distributed:
            return Pending()
        full[:lo].zero_()
        full[hi:].zero_()
        return Pending(None, lambda: dist.all_reduce(full, group=self.group))
    Comm.all_gather = late_gather
    try:
        return run_parity(dict(stage=2, overlap=True, steps=4), group)
    finally:
        (GatherPrefetch._pre_forward, GatherPrefetch.check_grad, GatherPrefetch.wait_for,
         Comm.all_gather) = saved
