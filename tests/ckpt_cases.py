"""Checkpoint cases run inside one 4-process gloo world (spawned by tests/test_checkpoint.py).

Phase 1 saves on N ranks and records the full optimizer state and where an uninterrupted run ends;
phase 2 loads on M ranks (another stage, a fresh model), compares the restored state bit for bit
and continues, comparing with the uninterrupted run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from zero_adam import ZeroAdamW, checkpoint

from _models import batch, loss_fn, make_model, named_groups
from _parity import MICRO

# (saved on N ranks, loaded on M ranks, stage at save, stage at load, bf16 params)
CASES = [(4, 1, 2, 2, False), (1, 3, 1, 2, False), (2, 3, 2, 1, True), (3, 2, 2, 2, True),
         (3, 4, 1, 1, False), (2, 2, 2, 2, False), (4, 3, 2, 1, True)]
K1, K2 = 3, 3


def case_name(c) -> str:
    n, m, s1, s2, bf16 = c
    return f"N{n}-M{m}-stage{s1}to{s2}-{'bf16' if bf16 else 'fp32'}"


def _build(group, stage, bf16, seed=0):
    model = make_model(seed=seed)
    opt = ZeroAdamW(named_groups(model), lr=1e-2, process_group=group, stage=stage, bucket_mb=0.004,
                    param_dtype=torch.bfloat16 if bf16 else None, max_grad_norm=0.5)
    return model, opt


def _train(model, opt, group, steps):
    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    b = MICRO // ws
    for step in steps:
        x, y = batch(step, MICRO)
        loss_fn(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).backward()
        opt.step()


def full_state(opt, group) -> dict:
    """Every parameter's master and moments, assembled from all ranks (names from the plan)."""
    out = {}
    for fb in opt.buckets:
        kinds = (("param", fb.read_master()), ("exp_avg", fb.exp_avg), ("exp_avg_sq", fb.exp_avg_sq))
        for kind, shard in kinds:
            full = shard.new_empty(fb.param_buffer.numel())
            dist.all_gather_single(full, shard.contiguous(), group=group)
            for s in fb.bucket.slots:   # a chunk of a cut parameter fills its element range
                spec = opt.plan.params[s.param]
                dst = out.setdefault(f"{kind}/{spec.key}", full.new_empty(spec.shape))
                dst.view(-1)[s.start:s.start + s.numel].copy_(full[s.offset:s.offset + s.numel])
    out["step"] = opt.buckets[0].step.clone()
    return out


def run_all(tmp: str) -> dict:
    groups = {n: dist.new_group(list(range(n))) for n in (1, 2, 3, 4)}
    rank = dist.get_rank()
    for c in CASES:
        n, _, s1, _, bf16 = c
        d = os.path.join(tmp, case_name(c))
        if rank < n:
            model, opt = _build(groups[n], s1, bf16)
            _train(model, opt, groups[n], range(K1))
            checkpoint.save(os.path.join(d, "ckpt"), model, opt, extra={"k1": K1, "note": "hi"})
            state = full_state(opt, groups[n])
            _train(model, opt, groups[n], range(K1, K1 + K2))
            if rank == 0:
                final = {k: v.detach().clone() for k, v in model.named_parameters()}
                torch.save({"state": state, "final": final}, os.path.join(d, "ref.pt"))
        dist.barrier()
    results = {}
    for c in CASES:
        n, m, _, s2, bf16 = c
        d = os.path.join(tmp, case_name(c))
        if rank < m:
            ref = torch.load(os.path.join(d, "ref.pt"), weights_only=True)
            model, opt = _build(groups[m], s2, bf16, seed=123)
            extra = checkpoint.load(os.path.join(d, "ckpt"), model, opt)
            state = full_state(opt, groups[m])
            same_state = all(torch.equal(state[k], ref["state"][k]) for k in ref["state"])
            _train(model, opt, groups[m], range(K1, K1 + K2))
            diff = max((p.detach().float() - ref["final"][k].float()).abs().max().item()
                       for k, p in model.named_parameters())
            results[case_name(c)] = {"same_state": same_state, "final_diff": diff, "extra": extra}
        dist.barrier()
    return results
