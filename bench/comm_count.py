"""Count what every method hands to collectives, the same way for all of them.

``torch.distributed``'s Python collectives are wrapped (FSDP2, ZeroRedundancyOptimizer, DeepSpeed
and zero-adam all call them through the module); DDP's C++ reducer is counted through a comm hook.
Bytes are per rank per call, converted to what a ring algorithm sends: all-reduce 2(N-1)/N x the
tensor, reduce-scatter and all-gather (N-1)/N x the full tensor, broadcast the tensor once.
Point-to-point sends (``isend``, zero-adam's exchange on gloo) count the bytes sent. Each call is
also filed under the phase of the step it was issued in (``phase()``: forward, backward or step),
which is how the report tells gradient traffic from parameter traffic.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist

COUNTS: Counter = Counter()   # "<op>" -> wire bytes sent by this rank
CALLS: Counter = Counter()
PHASED: Counter = Counter()   # "<op> in <phase>" -> wire bytes sent by this rank
_ORIGINAL = {}
_PHASE = ["other"]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """File the collectives issued inside under ``name`` (forward, backward, step)."""
    _PHASE.append(name)
    try:
        yield
    finally:
        _PHASE.pop()


def _count(kind: str, full_bytes: int, n: int) -> None:
    COUNTS[kind] += _ring(kind, full_bytes, n)
    CALLS[kind] += 1
    if n > 1:
        PHASED[f"{kind} in {_PHASE[-1]}"] += _ring(kind, full_bytes, n)


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _ring(op: str, full_bytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * full_bytes
    if op in ("broadcast", "send"):
        return float(full_bytes)
    return (n - 1) / n * full_bytes


# op name -> which argument (position) holds the *full* (un-sharded) tensor
_FULL_ARG = {
    "all_reduce": 0, "broadcast": 0, "reduce_scatter_tensor": 1, "reduce_scatter_single": 1,
    "_reduce_scatter_base": 1, "all_gather_into_tensor": 0, "all_gather_single": 0,
    "_all_gather_base": 0, "all_gather": 0, "reduce_scatter": 1, "isend": 0,
}
_KIND = {"reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
         "_reduce_scatter_base": "reduce_scatter", "all_gather_into_tensor": "all_gather",
         "all_gather_single": "all_gather", "_all_gather_base": "all_gather", "isend": "send"}


def install() -> None:
    """Wrap the collectives once per process."""
    for name, arg in _FULL_ARG.items():
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_counted", False):
            continue
        _ORIGINAL[name] = fn
        setattr(dist, name, _wrap(fn, name, arg))


def _wrap(fn, name: str, arg: int):
    params = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        bound = dict(zip(params, args), **kwargs)
        group = bound.get("group")
        n = dist.get_world_size(group) if dist.is_initialized() else 1
        full = bound.get(params[arg])
        _count(_KIND.get(name, name), _nbytes(full), n)
        return fn(*args, **kwargs)
    counted._counted = True
    return counted


def ddp_hook(state, bucket):
    """A DDP comm hook equal to the default all-reduce hook, counting its bytes."""
    n = dist.get_world_size()
    t = bucket.buffer()
    _count("all_reduce", _nbytes(t), n)
    fut = _ORIGINAL.get("all_reduce", dist.all_reduce)(t.div_(n), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def snapshot() -> dict[str, float]:
    return dict(COUNTS)


def phased_snapshot() -> dict[str, float]:
    return dict(PHASED)
