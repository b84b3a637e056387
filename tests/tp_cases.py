"""TP=2 x DP=2 on 4 gloo ranks (spawned by tests/test_tp.py): parallelize_module + ZeroAdamW."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from launch import tp
from launch.config import ModelConfig, OptimConfig
from launch.model import Llama
from launch.optim import param_groups
from zero_adam import ZeroAdamW
from zero_adam.memory import estimate, plan_params

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)


def tp_dp(stage: int) -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Llama(CFG)
    ref = copy.deepcopy(model)
    tp.parallelize(model, mesh["tp"])
    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = ZeroAdamW([{k: v for k, v in g.items()} for g in param_groups(model, optim_cfg)], lr=1e-2,
                    mesh=mesh, dp_dim="dp", stage=stage, max_grad_norm=0.5, bucket_mb=0.001)
    ref_groups = [{"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in param_groups(ref, optim_cfg)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2)
    _lazy_gathers(opt)
    dp = mesh.get_local_rank("dp")
    out = {"param": 0.0, "norm_rel": 0.0, "loss": 0.0, "dtensor_reads": 0, "dtensor_reads_unwaited": 0}
    for step in range(6):
        x = torch.randint(0, CFG.vocab_size, (8, 16), generator=torch.Generator().manual_seed(step))
        mine = x[dp * 4:(dp + 1) * 4]
        loss = F.cross_entropy(model(mine).flatten(0, 1), mine.flatten())
        with torch.no_grad():
            ref_loss = F.cross_entropy(ref(mine).flatten(0, 1), mine.flatten())
        out["loss"] = max(out["loss"], abs(float(loss.detach()) - float(ref_loss)))
        loss.backward()
        opt.step()
        F.cross_entropy(ref(x).flatten(0, 1), x.flatten()).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
        ref_opt.step()
        ref_opt.zero_grad()
        out["norm_rel"] = max(out["norm_rel"], abs(opt.last_grad_norm - norm) / norm)
        _dtensor_reads_wait(opt, model, out)
        for p, q in zip(model.parameters(), ref.parameters()):   # right after step(), gathers pending
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out["param"] = max(out["param"], (full.detach() - q.detach()).abs().max().item())
    planned = plan_params(param_groups(Llama(CFG).to("meta"), optim_cfg), bucket_mb=0.001, world_size=2,
                          tp_rule=lambda n, s: tp.local_shape(n, s, 2))
    out["plan_matches"] = planned.fingerprint() == opt.plan.fingerprint()
    e = estimate(planned, 2, stage=stage).device
    got = opt.memory_report()
    out["bytes_match"] = all(got[f] == getattr(e, f) for f in ("params", "grads", "master", "exp_avg",
                                                                 "exp_avg_sq"))
    out["sharded_buckets"] = sum(fb.bucket.tp_sharded for fb in opt.buckets)
    return out


class _Lazy:
    """A parameter all-gather that starts only when waited for: until then the parameters hold
    the previous step's values, so any read the overlap guard lets through before waiting is
    stale for certain, not only when the wire happens to be slow."""

    def __init__(self, start) -> None:
        self.start = start

    def wait(self) -> None:
        self.start().wait()


def _lazy_gathers(opt) -> None:
    real = opt._gather_one
    opt._gather_one = lambda bi: _Lazy(lambda: real(bi))


def _dtensor_reads_wait(opt, model, out: dict) -> None:
    """Right after step(): ``full_tensor()`` (a collective) or ``to_local()`` (a view of the
    local shard) of a DTensor whose all-gather is in flight must first wait for that gather.
    Every rank has the same gathers pending, so all call the same collectives."""
    pf = opt._prefetch
    if pf is None or not pf.pending:
        return
    for i, p in enumerate(model.parameters()):   # sharded ones (a collective), replicated ones
        if hasattr(p, "full_tensor") and any(bi in pf.pending for bi in pf.bucket_of[id(p)]):
            p.to_local().clone() if i % 2 else p.full_tensor()
            out["dtensor_reads"] += 1
            out["dtensor_reads_unwaited"] += any(bi in pf.pending for bi in pf.bucket_of[id(p)])


def bf16() -> dict:
    """param_dtype=bfloat16 on DTensor parameters: the DTensors themselves say bfloat16 (not only
    their local shards), so full_tensor(), state_dict() and dtype checks see what the model runs."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Llama(CFG)
    tp.parallelize(model, mesh["tp"])
    opt = ZeroAdamW(model.parameters(), lr=1e-2, mesh=mesh, param_dtype=torch.bfloat16, bucket_mb=0.001)
    x = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss))
    wq = model.layers[0].attn.wq.weight
    out = {"dtypes": sorted({str(p.dtype) for p in model.parameters()}),
           "local_dtypes": sorted({str(getattr(p, "_local_tensor", p).dtype) for p in model.parameters()}),
           "full_dtype": str(wq.full_tensor().dtype), "losses": losses}
    opt.close()
    return out


def both() -> dict:
    return {**{f"stage{s}": tp_dp(s) for s in (1, 2)}, "bf16": bf16()}
