"""Which elements of a bucket shard the update touches, and at which AdamW step count.

``torch.optim.AdamW`` skips a parameter whose ``requires_grad`` is off (it has no ``.grad``): its
weight, moments and step count stay exactly as they are, and when it is unfrozen its bias correction
continues from its own step count. A bucket shard is one flat tensor updated by one fused call, so
the shard is cut into *runs*: contiguous pieces of parameters that are trainable now and share a
step count (``lag`` = steps a slot sat out). In the usual case there is one run, the whole shard,
and the bucket's own ``step`` tensor is used: no extra work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan


@dataclass(frozen=True)
class Run:
    lo: int      # element range in the shard
    hi: int
    lag: int     # updates this run's parameters sat out (their step = bucket step - lag)


def runs(plan: Plan, fb, rank: int, world_size: int) -> list[Run] | None:
    """The runs of ``fb``'s shard, or None when the whole shard is one run at the bucket's step."""
    frozen = [not p.requires_grad for p in fb.params]
    if not any(frozen) and not any(fb.lag):
        return None
    slot_of = {s.param: i for i, s in enumerate(fb.bucket.slots)}
    out: list[Run] = []
    for piece in plan.pieces(fb.bucket, rank, world_size):
        si = slot_of[piece.param]
        if frozen[si]:
            continue
        lo, hi = piece.shard_lo, piece.shard_lo + piece.param_hi - piece.param_lo
        if out and out[-1].hi == lo and out[-1].lag == fb.lag[si]:
            out[-1] = Run(out[-1].lo, hi, out[-1].lag)
        else:
            out.append(Run(lo, hi, fb.lag[si]))
    return out


def after_update(fb, stepped_own: bool) -> None:
    """Count the update: frozen slots fall one step behind; the bucket's step advances once.
    ``stepped_own``: the whole shard was one run at the bucket's step (the kernel advanced it and
    nothing was frozen), so there is nothing else to count."""
    if stepped_own:
        return
    for si, p in enumerate(fb.params):
        if not p.requires_grad:
            fb.lag[si] += 1
    fb.step.add_(1)


def run_step(fb, run: Run) -> torch.Tensor:
    """A step tensor for ``run`` (the kernel increments it before use, as torch's fused AdamW does)."""
    return fb.step - run.lag


def param_steps(fb) -> list[float]:
    """Each slot's AdamW step count (what ``torch.optim.AdamW`` keeps per parameter)."""
    top = float(fb.step)
    return [top - lag for lag in fb.lag]


def set_param_steps(fb, steps: list[float]) -> None:
    """Restore per-slot step counts (checkpoints, AdamW state dicts): the bucket keeps the
    largest, the others as lags."""
    top = max(steps)
    fb.step.fill_(top)
    fb.lag = [int(top - s) for s in steps]
