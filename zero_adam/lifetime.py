"""Which live ``ZeroAdamW`` owns a parameter, and what goes when an optimizer goes.

A parameter's gradient hook moves its gradient into the owning optimizer's buffer and clears
``param.grad``. Two optimizers on one parameter would race for it (the second would train on
zeros), so ownership is exclusive while the owner lives: ``close()`` or garbage collection of the
owner releases it and removes the hooks. The registry holds only weak references.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def owner_of(p: torch.Tensor) -> Any:
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    owner = entry[1]()
    return None if owner is None or getattr(owner, "closed", False) else owner


def claim(params: Sequence[torch.Tensor], names: Sequence[str], owner: Any) -> None:
    """Record ``owner`` for ``params``; refuse any owned by another live optimizer."""
    if any(owner_of(p) is not None for p in params):
        gc.collect()  # an optimizer dropped with `del` may only be waiting for the cycle collector
    taken = [n for p, n in zip(params, names) if owner_of(p) not in (None, owner)]
    if taken:
        raise ValueError(
            f"{len(taken)} parameter(s) already belong to another live ZeroAdamW, e.g. {taken[:3]}: "
            "its gradient hooks would take their gradients. Call old_optimizer.close() (or drop every "
            "reference to it) before creating a new one for the same parameters")
    ref = weakref.ref(owner)
    for p in params:
        _OWNERS[id(p)] = (weakref.ref(p), ref)


def release(keys: list[int]) -> None:
    """Forget the ownership entries ``keys`` (ids of parameters); safe to call twice."""
    for k in keys:
        _OWNERS.pop(k, None)
    keys.clear()


def on_collect(owner: Any, *cleanups: Callable[[], None]) -> weakref.finalize:
    """Run ``cleanups`` when ``owner`` is garbage collected (none may reference ``owner``)."""
    def run() -> None:
        for c in cleanups:
            c()
    return weakref.finalize(owner, run)
