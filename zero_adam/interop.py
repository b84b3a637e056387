"""Start ``ZeroAdamW`` from a plain ``torch.optim.AdamW`` state dict (join from DDP).

A DDP job that trained with ``torch.optim.AdamW`` can switch to zero-adam without losing its
moments: build the model with the trained weights, build ``ZeroAdamW`` on it (the weights become
the FP32 masters), then call :func:`load_adamw_state_dict`. Each rank copies only its own pieces.
The reverse direction is ``python -m zero_adam.consolidate CKPT OUT --optimizer OUT.pt``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import update
from .optimizer import ZeroAdamW


@torch.no_grad()
def load_full_state(model: nn.Module, optimizer: ZeroAdamW, *, params: dict[str, torch.Tensor] | None,
                    exp_avg: dict[str, torch.Tensor], exp_avg_sq: dict[str, torch.Tensor],
                    step: float | dict[str, float],
                    max_exp_avg_sq: dict[str, torch.Tensor] | None = None) -> None:
    """Set masters (``params``: full FP32 weights by name; None keeps the current ones), moments
    (by name; a missing one is zero), AMSGrad's running maximum when the optimizer keeps one, and
    the step (one number, or one per parameter name); each rank copies only its own pieces."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names.get(id(p), "?") for fb in optimizer.buckets for p in fb.params
               if params is not None and names.get(id(p)) not in params]
    if missing:
        raise ValueError(f"no weights given for parameters {missing[:5]}")
    rank, world = optimizer.comm.rank, optimizer.comm.world_size
    for fb in optimizer.buckets:
        master = fb.read_master() if params is not None else None
        targets = {"exp_avg": (fb.exp_avg, exp_avg), "exp_avg_sq": (fb.exp_avg_sq, exp_avg_sq)}
        if fb.max_exp_avg_sq is not None:
            targets["max_exp_avg_sq"] = (fb.max_exp_avg_sq, max_exp_avg_sq or {})
        for pc in optimizer.plan.pieces(fb.bucket, rank, world):
            name = names[id(fb.params[_slot(fb, pc.param)])]
            n, span = pc.param_hi - pc.param_lo, slice(pc.param_lo, pc.param_hi)
            for dst, source in targets.values():
                view = dst[pc.shard_lo:pc.shard_lo + n]
                view.copy_(source[name].reshape(-1)[span]) if name in source else view.zero_()
            if master is not None:
                master[pc.shard_lo:pc.shard_lo + n].copy_(params[name].reshape(-1)[span])
        if master is not None:
            fb.write_master(master)
        slot_names = [names[id(p)] for p in fb.params]
        update.set_param_steps(fb, [float(step.get(n, 0.0)) if isinstance(step, dict) else float(step)
                                    for n in slot_names])
    optimizer.reload_params()


@torch.no_grad()
def load_adamw_state_dict(model: nn.Module, optimizer: ZeroAdamW, state_dict: dict[str, Any]) -> None:
    """Copy moments, step and hyperparameters from an AdamW state dict into ``optimizer``.

    AdamW indexes parameters by their position across its param groups. If the groups carry
    ``param_names`` (AdamW built from ``named_parameters()``, or exported by zero-adam), positions
    are matched by name; otherwise the AdamW must have been built with the same param groups, in
    the same order, as ``optimizer``.
    """
    position = _positions(model, optimizer, state_dict)
    _check_amsgrad(optimizer, state_dict["param_groups"])
    state = state_dict["state"]
    names = {id(p): n for n, p in model.named_parameters()}
    steps = {names[pid]: float(state[i]["step"]) if i in state else 0.0 for pid, i in position.items()}
    moments = {kind: {names[pid]: state[i][kind] for pid, i in position.items() if kind in state.get(i, {})}
               for kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    load_full_state(model, optimizer, params=None, exp_avg=moments["exp_avg"],
                    exp_avg_sq=moments["exp_avg_sq"], max_exp_avg_sq=moments["max_exp_avg_sq"],
                    step=steps)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, saved_groups):
            for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "initial_lr"):
                if k in saved:
                    group[k] = tuple(saved[k]) if k == "betas" else saved[k]


def _check_amsgrad(optimizer: ZeroAdamW, saved_groups: list[dict[str, Any]]) -> None:
    """AMSGrad's running maximum is state: joining with it on and off would drop it or leave the
    optimizer without the buffer it needs, so the two must agree before anything is copied."""
    theirs = any(g.get("amsgrad", False) for g in saved_groups)
    ours = any(fb.max_exp_avg_sq is not None for fb in optimizer.buckets)
    if theirs != ours:
        raise ValueError(f"the AdamW state dict was made with amsgrad={theirs} but ZeroAdamW was built with "
                         f"amsgrad={ours}; build ZeroAdamW with amsgrad={theirs} to keep its state")


def _slot(fb, param_index: int) -> int:
    for i, s in enumerate(fb.bucket.slots):
        if s.param == param_index:
            return i
    raise KeyError(param_index)


def _positions(model: nn.Module, optimizer: ZeroAdamW, state_dict: dict[str, Any]) -> dict[int, int]:
    """id(param) -> its index in the AdamW state dict."""
    groups = state_dict["param_groups"]
    if all("param_names" in g for g in groups):
        named = dict(model.named_parameters())
        out = {}
        for g in groups:
            for i, name in zip(g["params"], g["param_names"]):
                if name in named:
                    out[id(named[name])] = i
    else:
        ours = [p for g in optimizer.param_groups for p in g["params"]]
        theirs = [i for g in groups for i in g["params"]]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError("the AdamW state dict's param groups differ in size from ZeroAdamW's; build "
                             "both from the same param groups, or from named_parameters()")
        out = {id(p): i for p, i in zip(ours, theirs)}
    missing = [s.key for fb in optimizer.buckets for s, p in zip(
        (optimizer.plan.params[x.param] for x in fb.bucket.slots), fb.params) if id(p) not in out]
    if missing:
        raise ValueError(f"the AdamW state dict has no entry for parameters {missing[:5]}")
    return out
