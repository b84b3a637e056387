"""What a run tells its user: a progress bar, metrics.jsonl, a loss plot and a final summary.

Only rank 0 writes; every number it writes is already agreed across ranks (losses are averaged).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from launch import deps
from launch.config import LoggingConfig


def to_json(row: dict[str, Any]) -> str:
    """Strict JSON: a skipped step's non-finite grad norm (or a diverged loss) is written as null, since
    NaN/Infinity are not JSON and break jq, JavaScript and strict parsers reading metrics.jsonl."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def _available(feature: str, module: str, setting: str) -> bool:
    """Checked at the start, so a missing optional package is a note, not a crash after training."""
    note = deps.optional(feature, module, setting)
    if note:
        print(note, flush=True)
    return note is None


class RunLog:
    def __init__(self, cfg: LoggingConfig, out_dir: Path, *, main: bool, total_steps: int,
                 start_step: int = 0, resume_at: int | None = None) -> None:
        self.cfg, self.out_dir, self.main = cfg, out_dir, main
        self.records: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self._bar = None
        self._file = None
        self._plot = main and cfg.plot
        if not main:
            return
        progress = cfg.progress and _available("the progress bar", "tqdm", "logging.progress")
        self._plot = cfg.plot and _available("the loss plot", "matplotlib", "logging.plot")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if resume_at is not None and path.exists():  # keep the history up to the resumed step
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r["step"] <= resume_at]
        self._file = open(path, "w")
        for r in self.records:
            self._file.write(to_json(r) + "\n")
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, text: str) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def record(self, row: dict[str, Any]) -> None:
        """One JSON object per logged step (and per evaluation)."""
        if not self.main:
            return
        self.records.append(row)
        self._file.write(to_json(row) + "\n")
        self._file.flush()
        if self._bar is not None and row.get("loss") is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                  refresh=False)

    def history(self) -> list[dict[str, Any]]:
        return list(self.records)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()

    def plot(self, name: str) -> Path | None:
        """loss.png: training loss per logged step and validation loss per evaluation. Never fails
        the run: training is done by now, so a plotting error is reported and skipped."""
        if not (self._plot and self.records):
            return None
        try:
            return self._draw(name)
        except Exception as e:  # noqa: BLE001 - any plotting failure must not lose a finished run
            self.info(f"note: loss.png not written ({type(e).__name__}: {e})")
            return None

    def _draw(self, name: str) -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
