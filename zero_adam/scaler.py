"""Dynamic loss scaling for fp16 and the policy for non-finite gradients (pure, no processes).

The optimizer already all-reduces the squared norm of the gradient every step; a single inf or NaN
anywhere makes that sum non-finite on every rank. So overflow is agreed across ranks with the
collective that exists anyway, and every rank takes the same decision here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LossScaleConfig:
    """Dynamic loss scaling (torch's ``GradScaler`` knobs plus DeepSpeed's ``hysteresis``).

    The scale is multiplied by ``backoff_factor`` after ``hysteresis`` consecutive overflowing
    steps (each of them is skipped), never below ``min_scale``, and by ``growth_factor`` after
    ``growth_interval`` steps in a row without overflow.
    """

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 2
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            problems.append(f"init_scale={self.init_scale}: must be a positive number, e.g. 65536")
        if not self.growth_factor > 1:
            problems.append(f"growth_factor={self.growth_factor}: must be > 1, e.g. 2")
        if not 0 < self.backoff_factor < 1:
            problems.append(f"backoff_factor={self.backoff_factor}: must be in (0, 1), e.g. 0.5")
        if not (isinstance(self.growth_interval, int) and self.growth_interval >= 1):
            problems.append(f"growth_interval={self.growth_interval}: must be a positive integer")
        if not (isinstance(self.hysteresis, int) and self.hysteresis >= 1):
            problems.append(f"hysteresis={self.hysteresis}: must be a positive integer")
        if not 0 < self.min_scale <= self.init_scale:
            problems.append(f"min_scale={self.min_scale}: must be positive and at most init_scale")
        if problems:
            raise ValueError("invalid loss scaling:\n  - " + "\n  - ".join(problems))


@dataclass
class LossScaler:
    """The scale and its counters; ``update(found_inf)`` says whether to skip this step."""

    config: LossScaleConfig
    dynamic: bool = True
    scale: float = field(init=False)
    good_steps: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.scale = float(self.config.init_scale)

    def update(self, found_inf: bool) -> bool:
        """Record one step's outcome; True means the step must be skipped."""
        c = self.config
        if not self.dynamic:
            self.skipped += found_inf
            return found_inf
        if found_inf:
            self.skipped += 1
            self.good_steps = 0
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= c.hysteresis:
                self.scale = max(self.scale * c.backoff_factor, c.min_scale)
                self.bad_in_a_row = 0
            return True
        self.bad_in_a_row = 0
        self.good_steps += 1
        if self.good_steps >= c.growth_interval:
            self.scale *= c.growth_factor
            self.good_steps = 0
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "bad_in_a_row": self.bad_in_a_row,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.skipped = int(state.get("skipped", 0))


@dataclass(frozen=True)
class Decision:
    """What one step does with its gradient: skip it, or multiply it by ``multiplier``."""

    skip: bool
    norm: float          # the norm of the true (unscaled) averaged gradient, before clipping
    multiplier: float    # unscaling and clipping folded into one factor


def decide(scaled_norm: float, *, scaler: LossScaler | None, max_grad_norm: float | None) -> Decision:
    """One step's decision from the agreed global norm of the (possibly scaled) gradient.

    A non-finite norm means some rank saw an inf or NaN: with a loss scaler the step is skipped
    and the scale backs off; without one the caller applies its ``nonfinite`` policy.
    """
    scale = scaler.scale if scaler is not None else 1.0
    norm = scaled_norm / scale
    found_inf = not math.isfinite(scaled_norm)
    skip = scaler.update(found_inf) if scaler is not None else found_inf
    if skip:
        return Decision(True, norm, 1.0)
    coef = min(max_grad_norm / (norm + 1e-6), 1.0) if max_grad_norm is not None else 1.0
    return Decision(False, norm, coef / scale)


def make_scaler(loss_scale: Any) -> LossScaler | None:
    """``None``: no scaling; ``"dynamic"`` or a ``LossScaleConfig``: dynamic; a number: static."""
    if loss_scale is None:
        return None
    if loss_scale == "dynamic":
        return LossScaler(LossScaleConfig())
    if isinstance(loss_scale, LossScaleConfig):
        return LossScaler(loss_scale)
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0 \
            and math.isfinite(loss_scale):
        return LossScaler(LossScaleConfig(init_scale=float(loss_scale), min_scale=float(loss_scale)),
                          dynamic=False)
    raise ValueError(f"loss_scale={loss_scale!r}: must be None, 'dynamic', a LossScaleConfig or a "
                     "positive number (a static scale)")
