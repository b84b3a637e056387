"""Semantics at the edges (DESIGN.md section 7), run inside one 3-process gloo world.

Every training case compares ZeroAdamW after *every* step with ``torch.optim.AdamW`` on one process
over the global batch (rank r's rows are ``x[r*b:(r+1)*b]``). World sizes 1-3 run on subgroups;
each case's result is JSON, checked by ``tests/test_edges.py``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zero_adam import ZeroAdamW

from dist_cases import _guard

GLOBAL = 12  # global batch rows: divisible by 1, 2 and 3 ranks
LR = 1e-2


class Albert(nn.Module):
    """One weight shared by every (reentrant-checkpointed) layer, also used outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(7, 33)
        self.shared = nn.Linear(33, 33)
        self.head = nn.Linear(33, 5)

    def forward(self, x):
        h = self.shared(self.emb(x))  # the shared weight's gradient arrives in the outer task too
        for _ in range(3):
            h = checkpoint(lambda t: torch.tanh(self.shared(t)), h, use_reentrant=True)
        return self.head(h)


class Tied(nn.Module):
    """One layer applied twice in one graph (no checkpointing): one AccumulateGrad, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(7, 33)
        self.twice = nn.Linear(33, 33)
        self.head = nn.Linear(33, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.twice(torch.tanh(self.twice(self.emb(x))))))


class Blocks(nn.Module):
    """Ordinary blocks, each its own reentrant checkpoint segment; the input does not need grad,
    so the first gradient of the backward arrives inside a nested segment."""

    def __init__(self, frozen_emb: bool = False) -> None:
        super().__init__()
        self.emb = nn.Linear(7, 33)
        self.emb.requires_grad_(not frozen_emb)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(33, 33), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(33, 5)

    def forward(self, x):
        h = self.emb(x)
        if not h.requires_grad:
            h = h.detach().requires_grad_(True)
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=True)
        return self.head(h)


class Plain(nn.Module):
    def __init__(self, dtype=torch.float32, empty: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(7, 17, dtype=dtype)
        self.b = nn.Linear(17, 5, dtype=dtype)
        if empty:
            self.nothing = nn.Parameter(torch.zeros(0, 4, dtype=dtype))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))))


class Reader(nn.Module):
    """The parent reads a child's weight functionally before another child (same bucket) runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 7)
        self.b = nn.Linear(7, 5)

    def forward(self, x):
        return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))


def data(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL, 7, generator=g, dtype=dtype), torch.randn(GLOBAL, 5, generator=g, dtype=dtype)


def loss_of(model, x, y):
    return F.mse_loss(model(x), y)


def step_both(group, step: int, model, opt, ref, ref_opt) -> float:
    """One step of ZeroAdamW (this rank's rows) and of AdamW (all rows); their max difference."""
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    b = GLOBAL // ws
    x, y = data(step)
    loss_of(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).backward()
    loss_of(ref, x, y).backward()
    opt.step()
    ref_opt.step()
    ref_opt.zero_grad()
    return diff(model, ref)


def diff(a: nn.Module, b: nn.Module) -> float:
    return max(((p.detach().double() - q.detach().double()).abs().max().item()
                for p, q in zip(a.parameters(), b.parameters()) if p.numel()), default=0.0)


def train(group, make, *, stage: int, steps: int = 4, backwards: int = 1, use_no_sync: bool = False,
          accumulate=None, overlap: bool = False, before_step=None, dtype=torch.float32,
          setup=None, **kw) -> dict:
    """ZeroAdamW vs AdamW, ``backwards`` backward passes per step (``no_sync`` around all but the
    last when ``use_no_sync``); ``setup(model)`` runs before the optimizers are built,
    ``before_step(step, model, ref, ref_opt, opt)`` before each step's forward. With ``overlap``
    nothing waits for the gathers: the forward's loss against the reference shows a stale read."""
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    model = make()
    if setup is not None:
        setup(model)
    ref = copy.deepcopy(model)
    opt = ZeroAdamW(model.parameters(), lr=LR, weight_decay=0.1, process_group=group, stage=stage,
                    bucket_mb=0.002, accumulate=accumulate, overlap_gather=overlap, **kw)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    out = {"diff": [], "reduce_calls": [], "buckets": len(opt.buckets), "loss": 0.0}
    b = GLOBAL // ws
    for step in range(steps):
        if before_step is not None:
            before_step(step, model, ref, ref_opt, opt)
            out["buckets"] = len(opt.buckets)
        calls = opt.comm.traffic.calls["reduce"]
        for k in range(backwards):
            x, y = data(step * backwards + k, dtype)
            last = k == backwards - 1
            ctx = opt.no_sync() if use_no_sync and not last else contextlib.nullcontext()
            with ctx:
                loss = loss_of(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
                loss.backward()
            with torch.no_grad():
                theirs = loss_of(ref, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
            out["loss"] = max(out["loss"], abs(float(loss) - float(theirs)))
            loss_of(ref, x, y).backward()
        opt.step()
        ref_opt.step()
        ref_opt.zero_grad()
        out["reduce_calls"].append(opt.comm.traffic.calls["reduce"] - calls)
        if not overlap:
            out["diff"].append(diff(model, ref))
    out["diff"].append(diff(model, ref))
    out["norm"] = opt.last_grad_norm
    opt.close()
    return out


# -- the cases ---------------------------------------------------------------------------------
def reentrant(group) -> dict:
    out = {}
    for stage, acc in ((1, None), (2, None), (2, "local")):
        models = (("albert", Albert), ("blocks", Blocks), ("blocks_frozen_emb", lambda: Blocks(True)),
                  ("tied", Tied))
        for name, make in models:
            out[f"{name}-s{stage}-{acc}"] = train(group, make, stage=stage, accumulate=acc)
            out[f"{name}-s{stage}-{acc}-accum"] = train(group, make, stage=stage, accumulate=acc,
                                                        backwards=2, use_no_sync=True, steps=3)
    return out


def multi_backward(group) -> dict:
    """Several backward passes per step *without* no_sync (DeepSpeed's multi-backward test)."""
    return {f"s{stage}": train(group, Plain, stage=stage, backwards=3) for stage in (1, 2)}


def lifetime(group) -> dict:
    out = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = Plain()
        first = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage)
        try:
            ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage)
            out[f"refused-s{stage}"] = ""
        except ValueError as e:
            out[f"refused-s{stage}"] = str(e)
        first.close()
        try:
            first.step()
            out[f"closed_step-s{stage}"] = ""
        except RuntimeError as e:
            out[f"closed_step-s{stage}"] = str(e)
        # a new optimizer after close(), after `del` + gc, and after a bare `del`
        out[f"after_close-s{stage}"] = _continue(group, model, stage)
        second = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage)
        del second
        gc.collect()
        out[f"after_del_gc-s{stage}"] = _continue(group, model, stage)
        third = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage)
        del third
        out[f"after_del-s{stage}"] = _continue(group, model, stage)
    return out


def _continue(group, model, stage) -> dict:
    ref = copy.deepcopy(model)
    opt = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    worst = max(step_both(group, step, model, opt, ref, ref_opt) for step in range(3))
    norm = opt.last_grad_norm
    opt.close()
    return {"diff": worst, "norm": norm}


def freezing(group) -> dict:
    """Freeze a parameter after construction, then unfreeze it: exactly what AdamW does."""
    def toggle(step, model, ref, ref_opt, opt):
        flag = not (1 <= step < 3)  # frozen during steps 1 and 2
        for m in (model, ref):
            m.a.weight.requires_grad_(flag)
    out = {f"toggle-s{s}": train(group, Plain, stage=s, steps=5, before_step=toggle) for s in (1, 2)}
    for s in (1, 2):
        out[f"unfrozen_outside-s{s}"] = _unfrozen_outside(group, s)
        out[f"add_group-s{s}"] = train(group, Plain, stage=s, steps=5, before_step=_grow_at_2,
                                       setup=lambda m: m.b.requires_grad_(False))
    return out


def _grow_at_2(step, model, ref, ref_opt, opt):
    """Progressive unfreezing: ``b`` starts frozen and joins at step 2 with its own lr."""
    if step == 2:
        for m, o in ((model, opt), (ref, ref_opt)):
            m.b.requires_grad_(True)
            o.add_param_group({"params": list(m.b.parameters()), "lr": LR / 2})


def _unfrozen_outside(group, stage) -> dict:
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    model = Plain()
    model.b.weight.requires_grad_(False)
    opt = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage)
    model.b.weight.requires_grad_(True)
    before = copy.deepcopy(model)
    x, y = data(0)
    b = GLOBAL // ws
    loss_of(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).backward()
    try:
        opt.step()
        error = ""
    except RuntimeError as e:
        error = str(e)
    out = {"error": error, "unchanged": diff(model, before) == 0.0}
    opt.close()
    return out


def no_gradient(group) -> dict:
    """step() with no gradient anywhere since the last step changes nothing (AdamW's behaviour)."""
    out = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = Plain()
        opt = ZeroAdamW(model.parameters(), lr=LR, weight_decay=0.1, process_group=group, stage=stage)
        x, y = data(0)
        loss_of(model, x, y).backward()
        opt.step()
        before = copy.deepcopy(model)
        records = _capture_warnings()
        opt.step()
        opt.step()
        logging.getLogger("zero_adam").removeHandler(records)
        state_same = all(int(fb.step) == 1 for fb in opt.buckets)
        out[f"s{stage}"] = {"unchanged": diff(model, before) == 0.0, "step_count_same": state_same,
                            "warnings": [r.getMessage() for r in records.records]}
        opt.close()
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _capture_warnings() -> _Records:
    h = _Records()
    logging.getLogger("zero_adam").addHandler(h)
    return h


def overlap_reads(group) -> dict:
    """overlap_gather with functional reads of a child's weight, in train and in eval."""
    out = {f"train-s{s}": train(group, Reader, stage=s, overlap=True, steps=5) for s in (1, 2)}
    for s in (1, 2):
        torch.manual_seed(0)
        model = Reader()
        opt = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=s, overlap_gather=True,
                        bucket_mb=0.002)
        errs = []
        for step in range(4):
            x, y = data(step)
            loss_of(model, x, y).backward()
            opt.step()
            with torch.no_grad():  # eval forward and a plain read before anything waited
                ema = model.a.weight * 1.0
                got = model.eval()(x)
            opt.wait_params()
            with torch.no_grad():
                want = model(x)
            errs.append(max((got - want).abs().max().item(), (ema - model.a.weight).abs().max().item()))
            model.train()
        out[f"eval-s{s}"] = max(errs)
        opt.close()
    return out


def profiled(group) -> dict:
    """``torch.profiler`` windows that close right after ``step()`` (a context manager, a
    schedule) or after a backward, with overlap on (the default): torch 2.13 crashes a gloo
    process whose work launched under the profiler is waited after the profile is freed, so such
    work must not outlive the profiled call. Training stays exact across the windows."""
    return {f"s{s}": _profiled(group, s) for s in (1, 2)}


def _profiled(group, stage: int) -> dict:
    act = [torch.profiler.ProfilerActivity.CPU]
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    b = GLOBAL // ws
    torch.manual_seed(0)
    model = Reader()
    ref = copy.deepcopy(model)
    opt = ZeroAdamW(model.parameters(), lr=LR, process_group=group, stage=stage, bucket_mb=0.002)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    worst, steps = 0.0, 0

    def one(backward_only=None) -> None:
        nonlocal steps
        x, y = data(steps)
        with backward_only or contextlib.nullcontext():
            loss_of(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).backward()
        opt.step()
        loss_of(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        steps += 1

    for _ in range(3):     # a profiled step, the profile freed before the next forward
        with torch.profiler.profile(activities=act) as prof:
            one()
        del prof
        gc.collect()
        worst = max(worst, diff(model, ref))
    sched = torch.profiler.schedule(wait=0, warmup=0, active=1, repeat=3)
    with torch.profiler.profile(activities=act, schedule=sched) as prof:
        for _ in range(4):
            one()
            prof.step()
    del prof
    gc.collect()
    for _ in range(2):     # only the backward profiled, step() outside
        one(torch.profiler.profile(activities=act))
        gc.collect()
    worst = max(worst, diff(model, ref))
    opt.close()
    return {"diff": [worst], "loss": 0.0, "steps": steps}


def dtypes(group) -> dict:
    out = {}
    for s in (1, 2):
        out[f"fp64-s{s}"] = train(group, lambda: Plain(torch.float64), stage=s, dtype=torch.float64)
        out[f"empty-s{s}"] = train(group, lambda: Plain(empty=True), stage=s)
    torch.manual_seed(0)
    model = Plain()
    model.a.requires_grad_(False)  # a frozen layer, as in LoRA: cast too
    opt = ZeroAdamW(model.parameters(), lr=LR, process_group=group, param_dtype=torch.bfloat16)
    x, y = data(0)
    model(x).float().sum().backward()
    opt.step()
    out["bf16_frozen"] = [str(p.dtype) for p in model.parameters()]
    opt.close()
    return out


def startup_sync(group) -> dict:
    """Frozen parameters and buffers start from rank 0's values, as with DDP."""
    rank = dist.get_rank(group)
    torch.manual_seed(rank)  # every rank builds a different model
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model[2].requires_grad_(False)
    model[1].running_mean.add_(rank)
    opt = ZeroAdamW(model.parameters(), lr=LR, process_group=group)
    flat = torch.cat([t.detach().reshape(-1) for t in [*model.parameters(), *model.buffers()]
                      if t.is_floating_point()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, flat, group=group)
    opt.close()
    return {"same": all(torch.equal(everyone[0], t) for t in everyone)}


def frozen_checkpoint(group) -> dict:
    """Per-parameter step counts (a frozen spell, a group added later) survive a checkpoint:
    the resumed run continues exactly like AdamW."""
    import tempfile

    from zero_adam import checkpoint
    from zero_adam.ckpt_format import read_meta
    rank = dist.get_rank(group)
    where = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(where, src=dist.get_global_rank(group, 0), group=group)

    def build():
        torch.manual_seed(0)
        m = Plain()
        m.b.requires_grad_(False)
        return m, ZeroAdamW(m.parameters(), lr=LR, weight_decay=0.1, process_group=group)

    model, opt = build()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    worst = step_both(group, 0, model, opt, ref, ref_opt)
    for m in (model, ref):
        m.a.weight.requires_grad_(False)
    worst = max(worst, step_both(group, 1, model, opt, ref, ref_opt))
    for m, o in ((model, opt), (ref, ref_opt)):
        m.b.requires_grad_(True)
        o.add_param_group({"params": list(m.b.parameters())})
    worst = max(worst, step_both(group, 2, model, opt, ref, ref_opt))
    path = checkpoint.save(f"{where[0]}/ckpt", model, opt)
    meta_steps = read_meta(path).get("param_steps", {})
    opt.close()
    model2, opt2 = build()
    model2.a.weight.requires_grad_(False)
    model2.b.requires_grad_(True)
    opt2.add_param_group({"params": list(model2.b.parameters())})
    checkpoint.load(path, model2, opt2)
    for step in range(3, 6):
        if step == 4:
            for m in (model2, ref):
                m.a.weight.requires_grad_(True)
        worst = max(worst, step_both(group, step, model2, opt2, ref, ref_opt))
    opt2.close()
    return {"diff": worst, "param_steps": meta_steps}


def run_all(names: list[str]) -> dict:
    groups = {ws: dist.new_group(list(range(ws))) for ws in (1, 2, 3)}
    out = {}
    for name in names:
        fn = globals()[name]
        for ws, g in groups.items():
            if dist.get_rank() < ws:
                out[f"{name}-ws{ws}"] = _guard(fn, g)
            dist.barrier()
    return out

