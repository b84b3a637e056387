"""DDP idioms that silently do nothing under ZeroAdamW: detected where that is cheap, warned once.

``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` is the common one: ZeroAdamW moves
each gradient into its buckets as it is produced, so ``param.grad`` is None, the call clips
nothing and returns 0.0, and training runs unclipped with a logged norm of zero. ``install()``
(run by every ZeroAdamW) wraps torch's function: the wrapper looks each parameter up in the
ownership registry (one dict lookup per parameter) and calls torch's function unchanged. Each
optimizer warns once (a training loop sees one warning, not one per step).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.utils.clip_grad as clip_module

from . import lifetime

MESSAGE = ("torch.nn.utils.clip_grad_norm_ was called on parameters trained by ZeroAdamW: their .grad "
           "is None (gradients live in the optimizer's buffers), so it clipped nothing and returned 0.0. "
           "Use opt.clip_grad_norm_(max_norm) (it returns the global norm) or ZeroAdamW(..., "
           "max_grad_norm=...) and opt.last_grad_norm")


def _check(parameters: list[Any]) -> None:
    owners = {}
    for p in parameters:
        owner = lifetime.owner_of(p) if isinstance(p, torch.Tensor) else None
        if owner is not None:
            owners.setdefault(id(owner), (owner, []))[1].append(p)
    for owner, owned in owners.values():
        if not getattr(owner, "_warned_clip", False) and all(p.grad is None for p in owned):
            owner._warned_clip = True
            warnings.warn(MESSAGE, UserWarning, stacklevel=3)
            return


def install() -> None:
    """Wrap ``torch.nn.utils.clip_grad_norm_`` once per process (idempotent)."""
    original = clip_module.clip_grad_norm_
    if getattr(original, "_zero_adam_checked", False):
        return

    @functools.wraps(original)
    def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        _check(parameters)
        return original(parameters, *args, **kwargs)

    clip_grad_norm_._zero_adam_checked = True
    clip_module.clip_grad_norm_ = clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
