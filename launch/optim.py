"""Optimizer and LR schedule from their config sections.

Parameter groups are chosen by name patterns (``fnmatch`` globs), first match wins; a pattern that
matches nothing, or a parameter that no group matches, is an error. Without ``optim.groups`` the
usual rule applies: no weight decay for parameters with fewer than 2 dimensions (norms, biases).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from launch.config import ConfigError, OptimConfig, ScheduleConfig
from zero_adam import ZeroAdamW
from zero_adam.scaler import LossScaleConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.groups is None:
        return [{"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in cfg.groups]
    unmatched = []
    for n, p in named:
        for i, g in enumerate(cfg.groups):
            if any(fnmatch.fnmatchcase(n, pat) for pat in g.match):
                members[i].append((n, p))
                break
        else:
            unmatched.append(n)
    problems = [f"optim.groups.{i}.match={g.match}: matches no trainable parameter (names look "
                f"like {named[0][0]!r})" for i, g in enumerate(cfg.groups) if not members[i]]
    if unmatched:
        problems.append(f"optim.groups: {len(unmatched)} parameters match no group, e.g. "
                        f"{unmatched[:3]}; add a last group with match: ['*']")
    if problems:
        raise ConfigError("optim.groups", problems)
    return [{"params": m, "lr": g.lr if g.lr is not None else cfg.lr,
             "weight_decay": g.weight_decay if g.weight_decay is not None else cfg.weight_decay}
            for g, m in zip(cfg.groups, members)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, process_group: Any = None,
                    mesh: Any = None) -> ZeroAdamW:
    """``mesh``: a ("dp", "tp") DeviceMesh; ZeroAdamW then shards over "dp" (instead of ``process_group``)."""
    groups = [g for g in param_groups(model, cfg) if g["params"]]
    return ZeroAdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
        process_group=process_group, mesh=mesh, stage=cfg.stage, bucket_mb=cfg.bucket_mb,
        param_dtype=DTYPES[cfg.param_dtype] if cfg.param_dtype else None,
        reduce_dtype=DTYPES[cfg.reduce_dtype], max_grad_norm=cfg.max_grad_norm,
        accumulate=cfg.accumulate, overlap_gather=cfg.overlap_gather, max_inflight=cfg.max_inflight,
        loss_scale=(LossScaleConfig(**cfg.loss_scaling.model_dump()) if cfg.loss_scale == "dynamic"
                    else cfg.loss_scale),
        nonfinite=cfg.nonfinite)


def lr_factor(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine/linear decay to ``min_lr_ratio`` at ``total_steps`` (or constant)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))
