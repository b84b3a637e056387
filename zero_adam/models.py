"""The modules behind a list of parameters: what DDP would see as "the model".

``ZeroAdamW`` takes parameters, not a model, but two of DDP's promises are about the whole model:
start-up sync covers frozen parameters and buffers too (BatchNorm statistics), and ``param_dtype``
must cast frozen parameters as well (a frozen embedding or a LoRA base model left in FP32 breaks or
bloats the forward). The modules are found once, at construction, through the garbage collector's
list of live objects (as ``validate.check_not_wrapped`` does): every ``nn.Module`` that holds one of
the parameters directly, walked up to the roots of the module trees containing them.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .dtensor import local


def owning_roots(params: Sequence[torch.Tensor]) -> list[nn.Module]:
    """The root modules (not a submodule of another live module) whose trees hold ``params``."""
    ours = {id(p) for p in params}
    modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]  # no __class__ lookups
    parent: dict[int, nn.Module] = {}
    for m in modules:
        for child in m._modules.values():
            if child is not None:
                parent.setdefault(id(child), m)
    roots: dict[int, nn.Module] = {}
    for m in modules:
        if any(id(p) in ours for p in m._parameters.values() if p is not None):
            top, seen = m, {id(m)}
            while id(top) in parent and id(parent[id(top)]) not in seen:
                top = parent[id(top)]
                seen.add(id(top))
            roots[id(top)] = top
    return list(roots.values())


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def other_params(roots: Sequence[nn.Module], extra: Sequence[torch.Tensor],
                 skip: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters of ``roots`` plus ``extra`` (e.g. frozen ones from the param groups), minus ``skip``."""
    mine = {id(p) for p in skip}
    everything = _unique(p for r in roots for p in r.parameters())
    return [p for p in _unique(iter([*everything, *extra])) if id(p) not in mine]


def buffers(roots: Sequence[nn.Module]) -> list[torch.Tensor]:
    return _unique(b for r in roots for b in r.buffers())


@torch.no_grad()
def cast_(params: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
    """Cast floating parameters in place (``param.data``), as ``model.to(dtype)`` would."""
    for p in params:
        if local(p).is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
