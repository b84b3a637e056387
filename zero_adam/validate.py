"""Checks on what a user hands to ``ZeroAdamW``: hyperparameters and the parameters themselves.

Each check raises a ``ValueError``/``TypeError`` that says what is wrong and how to fix it, before
any buffer is allocated or any parameter rebound (so a failed construction changes nothing).
"""

from __future__ import annotations

import gc
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .options import FLOAT_DTYPES


def check_hyperparams(group: dict[str, Any], where: str = "") -> None:
    """Reject what ``torch.optim.AdamW`` rejects, with the same wording plus a hint."""
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    betas = group["betas"]
    at = f" ({where})" if where else ""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element{at}")
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}{at}; lr must be a finite number >= 0")
    if not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}{at}; eps must be a finite number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}{at}; pass two numbers, e.g. (0.9, 0.999)")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element{at}")
        b = float(b) if isinstance(b, torch.Tensor) else b
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}{at}; betas must be in [0, 1)")
    kinds = {isinstance(b, torch.Tensor) or (isinstance(b, float) and "float") for b in betas}
    if kinds not in ({True}, {"float"}):
        raise ValueError(f"betas must be either both floats or both Tensors{at}, got "
                         f"{tuple(type(b).__name__ for b in betas)}; write e.g. (0.9, 0.999)")
    if not isinstance(wd, (int, float)) or not 0.0 <= wd < math.inf:
        raise ValueError(f"Invalid weight_decay value: {wd}{at}; weight_decay must be >= 0")


def check_unsupported(*, capturable: bool, differentiable: bool) -> None:
    if capturable:
        raise ValueError("capturable=True is not supported: ZeroAdamW's step runs collectives and "
                         "cannot be captured in a CUDA graph; drop the argument")
    if differentiable:
        raise ValueError("differentiable=True is not supported by ZeroAdamW; drop the argument")


def check_params(params: Sequence[torch.Tensor], names: Sequence[str]) -> torch.device:
    """Validate the trainable parameters; return their common device."""
    if not params:
        raise ValueError("ZeroAdamW got no trainable parameters (every parameter has "
                         "requires_grad=False, or the list was empty); pass model.parameters()")
    seen: dict[int, str] = {}
    for p, name in zip(params, names):
        if id(p) in seen:
            raise ValueError(f"parameter {name} is listed twice (also as {seen[id(p)]}); "
                             "pass every parameter exactly once")
        seen[id(p)] = name
        if p.layout != torch.strided:
            raise ValueError(f"parameter {name} has layout {p.layout}; ZeroAdamW needs dense "
                             "(strided) parameters")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameter {name} has dtype {p.dtype}; ZeroAdamW supports real "
                            "floating parameters (float16, bfloat16, float32, float64)")
        if type(p).__name__ == "FlatParameter":
            raise ValueError(f"parameter {name} belongs to a model wrapped in FSDP; ZeroAdamW "
                             "owns gradient reduction: pass the unwrapped model's parameters")
    devices = {p.device for p in params}
    if len(devices) > 1:
        by_dev = {str(d): [n for p, n in zip(params, names) if p.device == d][:3] for d in devices}
        raise ValueError(f"parameters are on different devices: {by_dev}; ZeroAdamW shards one "
                         "data-parallel replica, so move the whole model to one device first")
    check_not_wrapped(params)
    return devices.pop()


def check_not_wrapped(params: Iterable[torch.Tensor], later: bool = False) -> None:
    """Refuse parameters of a model wrapped in DDP or FSDP2: at construction, and (``later``) at
    the first ``step()``, for a wrap that came after it (``transformers.Trainer`` and
    ``accelerator.prepare`` wrap the model in DDP themselves).

    Both would reduce gradients a second time (DDP: twice the traffic) or own the parameters
    (FSDP2); the result would be silently wrong, slow or hang, so look for a live wrapper holding
    these parameters (a walk over live objects: once per optimizer at each of the two points).
    """
    wrappers = _wrapper_types()
    if not wrappers:
        return
    ours = {id(p) for p in params}
    if _find_wrapper(ours, wrappers) is not None:
        gc.collect()  # a dropped wrapper may only be waiting for the cycle collector
    obj = _find_wrapper(ours, wrappers)
    if obj is not None:
        raise ValueError(
            f"these parameters belong to a model wrapped in {type(obj).__name__}"
            + (" after ZeroAdamW was created (transformers.Trainer and accelerator.prepare "
               "wrap it: use zero_adam.integrations.transformers.ZeroAdamTrainer or "
               "zero_adam.integrations.accelerate.prepare)" if later else "")
            + "; ZeroAdamW reduces gradients itself: build it from the unwrapped model "
            "(model.module.parameters() for DDP) and do not wrap the model")


def _find_wrapper(ours: set[int], wrappers: tuple[type, ...]) -> Any:
    """A live DDP/FSDP module holding one of the parameters ``ours`` (by id), or None."""
    for obj in gc.get_objects():
        if issubclass(type(obj), wrappers) and issubclass(type(obj), torch.nn.Module):
            if any(id(p) in ours for p in obj.parameters()):
                return obj
    return None


def _wrapper_types() -> tuple[type, ...]:
    out: list[type] = []
    try:
        from torch.nn.parallel import DistributedDataParallel
        out.append(DistributedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        out += [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(out)


def check_ranks_agree(comm: Any, lines: list[str], device: torch.device) -> None:
    """Refuse to start when ranks built different models or settings (one small all-reduce).

    On a mismatch every rank learns every rank's description and the error names the first line
    where each differing rank departs from rank 0.
    """
    digest = int.from_bytes(hashlib.sha256("\n".join(lines).encode()).digest()[:8], "little")
    if comm.agree(digest >> 1, device):
        return
    everyone = comm.gather_objects(lines)
    diffs = []
    for r, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            first = next((i for i, (a, b) in enumerate(zip(everyone[0], theirs)) if a != b),
                         min(len(theirs), len(everyone[0])))
            mine = everyone[0][first] if first < len(everyone[0]) else "(nothing)"
            other = theirs[first] if first < len(theirs) else "(nothing)"
            diffs.append(f"rank {r} has '{other}' where rank 0 has '{mine}'")
    raise ValueError("ranks built different models or optimizer settings, so their shards would "
                     "not line up:\n  " + "\n  ".join(diffs) +
                     "\nBuild the same model with the same param groups and settings on every rank.")
