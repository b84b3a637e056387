"""ZeroAdamW vs a single-process torch.optim.AdamW reference, compared after every step.

fp32: the reference trains a copy of the model on the *whole* global batch.
bf16: the reference does the same casts as a bf16 data-parallel run: it computes each rank's
bf16 gradient on that rank's slice, averages them in FP32, steps an FP32 master with AdamW and
casts it to bf16. The FP32 masters are then compared element by element, shard by shard, after
every step; then the reference master is set to ours. Without that re-sync a rounding-level
difference (a clip coefficient computed in another order) flips one bf16 rounding of a weight,
which changes every later gradient at bf16 scale: the comparison would measure bf16 chaos, not
the optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.distributed as dist

from zero_adam import ZeroAdamW
from zero_adam.kernel import round_to_bf16
from zero_adam.memory import FIELDS, estimate, plan_params

from _models import batch, loss_fn, make_model, named_groups, warmup_decay

LR = 1e-2
MICRO = 24  # global micro-batch: divisible by 1, 2, 3 and 4 ranks


def run_parity(case: dict, group=None) -> dict:
    ws = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    bf16 = case.get("dtype") == "bf16"
    accum, steps, clip = case.get("accum", 1), case.get("steps", 10), case.get("clip")
    model = make_model()
    ref = copy.deepcopy(model)
    overlap = case.get("overlap", False)
    opt = ZeroAdamW(named_groups(model), lr=LR, process_group=group, stage=case["stage"],
                    bucket_mb=0.004, param_dtype=torch.bfloat16 if bf16 else None,
                    max_grad_norm=clip, accumulate=case.get("accumulate"), overlap_gather=overlap,
                    reduce_collective=case.get("reduce", "auto"),
                    gather_collective=case.get("gather", "auto"))
    masters = [p for g in named_groups(ref) for _, p in g["params"]]
    ref_groups = [{"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in named_groups(ref)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=LR)
    ref_lowp = copy.deepcopy(ref).to(torch.bfloat16) if bf16 else None
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_decay) for o in (opt, ref_opt)]
    out = {"param": 0.0, "master": 0.0, "norm_rel": 0.0, "reduce_calls": [], "lr": [], "loss": 0.0}
    for step in range(steps):
        calls0 = opt.comm.traffic.calls["reduce"]
        for k in range(accum):
            x, y = batch(step * accum + k, MICRO)
            b = MICRO // ws
            ctx = opt.no_sync() if k < accum - 1 else contextlib.nullcontext()
            xs, ys = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
            with ctx:
                ours = loss_fn(model, xs, ys)
                (ours / accum).backward()
            with torch.no_grad():  # the same rows through the reference: a stale forward would differ
                theirs = loss_fn(ref_lowp if bf16 else ref, xs, ys)
            out["loss"] = max(out["loss"], abs(float(ours.detach()) - float(theirs)))
            if bf16:
                _bf16_reference_grads(ref_lowp, masters, x, y, ws, accum)
            else:
                (loss_fn(ref, x, y) / accum).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(masters, clip if clip else math.inf))
        opt.step()
        ref_opt.step()
        out["reduce_calls"].append(opt.comm.traffic.calls["reduce"] - calls0)
        out["norm_rel"] = max(out["norm_rel"], abs(opt.last_grad_norm - ref_norm) / ref_norm)
        ref_opt.zero_grad()
        opt.zero_grad()
        for s in scheds:
            s.step()
        out["lr"].append(opt.param_groups[0]["lr"] - ref_opt.param_groups[0]["lr"])
        out["master"] = max(out["master"], _master_diff(opt, masters))
        if bf16:  # bf16 tolerance vs the reference; then re-sync and require an exact cast
            lowp = [p for g in named_groups(ref_lowp) for _, p in g["params"]]
            with torch.no_grad():
                for q, m in zip(lowp, masters):
                    q.copy_(m)
                if not overlap:  # with overlap the gather is legitimately still in flight here
                    out["param"] = max(out["param"], _max_diff(model, ref_lowp))
                for q, m, full in zip(lowp, masters, _full_masters(opt, group)):
                    m.copy_(full)
                    q.copy_(round_to_bf16(full))  # the rounding ZeroAdamW publishes
            if not overlap:
                out["cast_exact"] = out.get("cast_exact", True) and _max_diff(model, ref_lowp) == 0.0
        elif not overlap:
            out["param"] = max(out["param"], _max_diff(model, ref))
    opt.wait_params()
    if bf16:
        out["cast_exact"] = out.get("cast_exact", True) and _max_diff(model, ref_lowp) == 0.0
    else:
        out["param"] = max(out["param"], _max_diff(model, ref))
    out["same_on_all_ranks"] = _identical_across_ranks(model, group)
    out["state_numel_ok"] = all(
        t.numel() == opt.plan.shard_numel(fb.bucket, ws)
        for fb in opt.buckets for n, t in fb.state_tensors().items() if n != "step")
    out["full_grads_after_step"] = sum(fb.full_grad is not None for fb in opt.buckets)
    out["buckets"] = len(opt.buckets)
    out["grads_none"] = all(p.grad is None for p in model.parameters())
    out["bytes"] = _bytes_vs_plan(opt, case, ws, bf16)
    return out


def _bytes_vs_plan(opt: ZeroAdamW, case: dict, ws: int, bf16: bool) -> dict:
    """This rank's optimizer tensors (measured) next to the planner's per-rank figures."""
    plan = plan_params(named_groups(make_model().to("meta")), bucket_mb=0.004,
                       param_dtype=torch.bfloat16 if bf16 else None, world_size=ws)
    e = estimate(plan, ws, stage=case["stage"], accumulate=case.get("accumulate"),
                 backend="gloo").device
    got = opt.memory_report()
    return {f: [got[f], getattr(e, f)] for f in FIELDS}


def _bf16_reference_grads(ref_lowp, masters, x, y, ws, accum) -> None:
    """Each rank's bf16 gradient on its slice, averaged in FP32, accumulated into master.grad."""
    b = MICRO // ws
    lowp = [p for g in named_groups(ref_lowp) for _, p in g["params"]]
    per_rank = []
    for r in range(ws):
        for p in lowp:
            p.grad = None
        (loss_fn(ref_lowp, x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]) / accum).backward()
        per_rank.append([p.grad.float() for p in lowp])
    for i, m in enumerate(masters):
        g = torch.stack([pr[i] for pr in per_rank]).sum(0) / ws
        m.grad = g if m.grad is None else m.grad + g


def _max_diff(a, b) -> float:
    return max((p.detach().float() - q.detach().float()).abs().max().item()
               for p, q in zip(a.parameters(), b.parameters()))


def _master_diff(opt, masters) -> float:
    """Compare this rank's FP32 master shard with the same elements of the reference."""
    worst = 0.0
    for fb in opt.buckets:
        for piece in opt.plan.pieces(fb.bucket, opt.comm.rank, opt.comm.world_size):
            n = piece.param_hi - piece.param_lo
            ours = fb.read_master()[piece.shard_lo:piece.shard_lo + n].float()
            theirs = masters[piece.param].detach().reshape(-1)[piece.param_lo:piece.param_hi]
            worst = max(worst, (ours - theirs).abs().max().item())
    return worst


def _full_masters(opt, group) -> list[torch.Tensor]:
    """Every parameter's FP32 master, assembled from all ranks' shards."""
    out = [torch.empty(s.shape) for s in opt.plan.params]
    for fb in opt.buckets:
        master = fb.read_master()
        full = master.new_empty(fb.param_buffer.numel())
        if group is None:
            full.copy_(master)
        else:
            dist.all_gather_single(full, master.contiguous(), group=group)
        for s in fb.bucket.slots:   # a chunk of a split parameter fills its element range
            out[s.param].view(-1)[s.start:s.start + s.numel].copy_(full[s.offset:s.offset + s.numel])
    return out


def _identical_across_ranks(model, group) -> bool:
    if group is None:
        return True
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, flat, group=group)
    return all(torch.equal(everyone[0], t) for t in everyone)
