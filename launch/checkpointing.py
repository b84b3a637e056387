"""The launcher's checkpoint policy: where to save, which to resume from, how many to keep.

Checkpoints are ``<checkpoint.dir>/step_<N>``, written by ``zero_adam.checkpoint.save`` with the
run's own state in ``extra`` (step, LR scheduler, RNG, the partial logging window), so a resumed
run continues the exact loss curve. Nothing is ever deleted except complete checkpoints older than
the newest ``keep`` and abandoned ``.partial`` saves; a fresh run refuses to start on top of an
earlier run's checkpoints.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.config import CheckpointConfig, ConfigError
from zero_adam import ZeroAdamW, checkpoint
from zero_adam.ckpt_format import CheckpointError


def directory(cfg: CheckpointConfig, name: str) -> Path:
    return Path(cfg.dir.format(name=name))


def resume_from(cfg: CheckpointConfig, root: Path, say: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (refusing to clobber an old run)."""
    if cfg.resume == "none":
        found = checkpoint.latest(root)
        if found is not None:
            raise ConfigError("checkpoint.resume", [
                f"checkpoint.resume=none but {root} holds checkpoints of an earlier run (newest "
                f"{found.name}); set checkpoint.resume=auto to continue it, or point checkpoint.dir "
                "(and logging.out_dir) somewhere else"])
        return None
    if cfg.resume == "auto":
        for broken in _incomplete(root):
            say(f"skipping incomplete or damaged checkpoint {broken}")
        return checkpoint.latest(root)
    path = Path(cfg.resume)
    if not path.exists():
        raise ConfigError("checkpoint.resume", [f"checkpoint.resume={cfg.resume}: no such checkpoint"])
    return path


def restore(path: Path, model: nn.Module, opt: ZeroAdamW, sched) -> dict[str, Any]:
    try:
        extra = checkpoint.load(path, model, opt)
    except CheckpointError as e:
        raise ConfigError("checkpoint.resume", [f"cannot resume from {path}: {e}"]) from None
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if torch.cuda.is_available() and "cuda" in extra["rng"]:
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra


def save(root: Path, step: int, model: nn.Module, opt: ZeroAdamW, sched, window: dict[str, Any],
         keep: int, main: bool) -> Path:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    extra = {"step": step, "scheduler": sched.state_dict(), "rng": rng, "window": window}
    path = checkpoint.save(root / f"step_{step:08d}", model, opt, extra=extra)
    if main:
        _prune(root, keep)
    return path


def _prune(root: Path, keep: int) -> None:
    complete = sorted((int(m.group(1)), d) for d in root.iterdir()
                      if (m := re.fullmatch(r"step_(\d+)", d.name)) and checkpoint.is_complete(d))
    for _, d in complete[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("*.partial"):
        shutil.rmtree(d, ignore_errors=True)


def _incomplete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not checkpoint.is_complete(d))
