"""Train a Llama-style model with ZeroAdamW from a YAML config.

    torchrun --standalone --nproc-per-node=2 launch/train.py --config configs/tiny.yaml optim.lr=3e-3
    python launch/train.py --config configs/tiny.yaml          # one process, same code path
    python launch/train.py --config configs/tiny.yaml --check  # validate the config and exit

A bad config, data file or override exits with status 2 and a short message (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `launch` and `zero_adam` from a checkout

from launch import deps  # noqa: E402

deps.require()  # the [train] extras, before anything imports them

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from launch import checkpointing, runtime  # noqa: E402
from launch import tp as tensor_parallel  # noqa: E402
from launch.config import Config, ConfigError, check_world, load_config  # noqa: E402
from launch.data import Corpus, DataError, batch, load_corpus, rows_of  # noqa: E402
from launch.logs import RunLog  # noqa: E402
from launch.model import build_model, count_params  # noqa: E402
from launch.optim import build_optimizer, build_scheduler  # noqa: E402
from launch.schema import activation_every  # noqa: E402
from zero_adam import ZeroAdamW  # noqa: E402
from zero_adam.comm import CollectiveError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    p.add_argument("--check", action="store_true", help="validate the config (and data) and exit")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. optim.lr=3e-4 train.steps=50")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("zero_adam").setLevel(logging.ERROR)  # skipped steps are reported by the run log
    rt, clean = None, False
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            load_corpus(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)
            print(f"{args.config}: config OK")
            return 0
        rt = runtime.init(cfg.train.collective_timeout_s, cfg.train.deterministic)
        check_world(cfg, rt.world_size)
        rt = runtime.with_tp(rt, cfg.parallel.tp)
        corpus = load_corpus(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)
        train(cfg, rt, corpus)
        clean = True
        return 0
    except (ConfigError, DataError) as e:
        if rt is None or rt.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except CollectiveError as e:  # a peer died or hung: say so on every rank, exit; torchrun ends the job
        print(f"error: rank {rt.rank if rt else '?'}: {e}", file=sys.stderr)
        return 3
    finally:
        runtime.shutdown(clean)


@dataclass
class Run:
    """Everything one training run holds; each piece was built from its own config section."""
    cfg: Config
    rt: runtime.Runtime
    corpus: Corpus
    model: torch.nn.Module
    opt: ZeroAdamW
    sched: Any
    log: RunLog
    out_dir: Path
    ckpt_dir: Path
    n_micro: int
    window: dict[str, Any] = field(default_factory=lambda: {"loss_sum": 0.0, "steps": 0})


def build(cfg: Config, rt: runtime.Runtime, corpus: Corpus) -> tuple[Run, int]:
    """Model, optimizer, schedule and log; resumed from a checkpoint when one applies."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, activation_every(t.activation_checkpointing)).to(rt.device)
    if rt.mesh is not None:
        tensor_parallel.parallelize(model, rt.mesh["tp"])
    opt = build_optimizer(model, cfg.optim, rt.group, mesh=rt.mesh)
    sched = build_scheduler(opt, cfg.schedule, t.steps)
    out_dir = Path(cfg.logging.out_dir.format(name=cfg.name))
    ckpt_dir = checkpointing.directory(cfg.checkpoint, cfg.name)
    say = (lambda text: print(text, flush=True)) if rt.is_main else (lambda text: None)
    source = checkpointing.resume_from(cfg.checkpoint, ckpt_dir, say)
    start, window = 0, None
    if source is not None:
        extra = checkpointing.restore(source, model, opt, sched)
        start, window = int(extra["step"]), extra["window"]
    log = RunLog(cfg.logging, out_dir, main=rt.is_main, total_steps=t.steps, start_step=start,
                 resume_at=start if source is not None else None)
    run = Run(cfg, rt, corpus, model, opt, sched, log, out_dir, ckpt_dir,
              t.global_batch // (t.micro_batch * rt.dp_size))
    if window:
        run.window = window
    log.info(f"{cfg.name}: {count_params(model):,} params on {rt.world_size} x {rt.device.type} "
             f"({rt.backend}{f', {rt.dp_size} data-parallel x {rt.tp} tensor-parallel' if rt.tp > 1 else ''}"
             f"), ZeRO stage {cfg.optim.stage}, {len(opt.buckets)} buckets; "
             f"{corpus.description}; {run.n_micro} micro-step(s) of {t.micro_batch} x {t.seq_len} per rank"
             + (f"; resumed from {source} at step {start}" if source is not None else ""))
    return run, start


def train_step(run: Run, step: int) -> None:
    """One optimizer step: n_micro forward/backward passes (all but the last in no_sync)."""
    t, rt, opt = run.cfg.train, run.rt, run.opt
    loss_sum = torch.zeros(())
    for k in range(run.n_micro):
        lo, hi = rows_of(k, rt.dp_rank, t.micro_batch, rt.dp_size)
        x, y = batch(run.corpus.train, seed=t.seed, step=step, global_batch=t.global_batch, lo=lo, hi=hi,
                     seq_len=t.seq_len)
        with opt.no_sync() if k < run.n_micro - 1 else contextlib.nullcontext():
            logits = run.model(x.to(rt.device)).float()
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(rt.device).flatten()) / run.n_micro
            opt.scale_loss(loss).backward()
        loss_sum += loss.detach().cpu()
    opt.step()
    run.sched.step()
    opt.zero_grad()
    if opt.last_step_skipped:
        run.log.info(f"step {step + 1}: optimizer step skipped, non-finite gradient (loss scale now "
                     f"{opt.loss_scale:g}, {opt.skipped_steps} skipped so far)")
    run.window["loss_sum"] += float(loss_sum)
    run.window["steps"] += 1


def log_window(run: Run, done: int, lr: float, started: float) -> None:
    """Record the mean loss (over ranks and steps) of the window since the last log line."""
    w, t = run.window, run.cfg.train
    elapsed = time.perf_counter() - started
    mean_loss = float(runtime.all_mean(torch.tensor(w["loss_sum"] / w["steps"]), run.rt))
    run.log.record({"step": done, "loss": mean_loss, "lr": lr, "grad_norm": run.opt.last_grad_norm,
                    "tokens_per_s": t.global_batch * t.seq_len * w["steps"] / elapsed,
                    "mem_bytes": run.opt.memory_report()["total"], "skipped_steps": run.opt.skipped_steps,
                    "loss_scale": run.opt.loss_scale})
    run.window = {"loss_sum": 0.0, "steps": 0}


def train(cfg: Config, rt: runtime.Runtime, corpus: Corpus) -> dict:
    t, c = cfg.train, cfg.checkpoint
    run, start = build(cfg, rt, corpus)
    stop = t.stop_at or t.steps
    if start == 0:
        run.log.record({"step": 0, "val_loss": evaluate(run.model, corpus, cfg, rt)})
    started = window_start = time.perf_counter()
    for step in range(start, stop):
        lr = run.sched.get_last_lr()[0]
        train_step(run, step)
        run.log.advance()
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            log_window(run, done, lr, window_start)
            window_start = time.perf_counter()
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            run.log.record({"step": done, "val_loss": evaluate(run.model, corpus, cfg, rt)})
        if (c.every and done % c.every == 0) or (c.final and done in (stop, t.steps)):
            # the partial logging window is saved once, so agree on it across ranks first
            local = torch.tensor(run.window["loss_sum"], dtype=torch.float64)
            run.window["loss_sum"] = float(runtime.all_mean(local, rt))
            checkpointing.save(run.ckpt_dir, done, run.model, run.opt, run.sched, run.window, c.keep,
                               rt.is_main)
    return summarize(run, start, stop, time.perf_counter() - started)


def summarize(run: Run, start: int, stop: int, wall: float) -> dict:
    t = run.cfg.train
    vals = [r["val_loss"] for r in run.log.history() if r.get("val_loss") is not None]
    summary = {"steps": stop - start, "seconds": wall,
               "tokens_per_s": t.global_batch * t.seq_len * (stop - start) / max(wall, 1e-9),
               "first_val_loss": vals[0] if vals else None, "last_val_loss": vals[-1] if vals else None,
               "mem_bytes": run.opt.memory_report()}
    run.log.close()
    plot = run.log.plot(run.cfg.name)
    if not run.rt.is_main:
        return summary
    if stop == start:
        run.log.info(f"nothing to train: the run is already at step {start} of {t.steps} "
                     "(raise train.steps, or start a new run with checkpoint.resume=none and another "
                     "checkpoint.dir and logging.out_dir)")
    drop = f" ({1 - vals[-1] / vals[0]:.0%} lower)" if len(vals) > 1 else ""
    val = f"validation loss {vals[0]:.3f} -> {vals[-1]:.3f}{drop}" if vals else "no validation loss recorded"
    run.log.info(f"done: steps {start}-{stop} in {wall:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s; "
                 f"{val}; optimizer-held bytes per rank "
                 f"{summary['mem_bytes']['total']:,}; metrics in {run.out_dir / 'metrics.jsonl'}"
                 + (f", plot {plot}" if plot else ""))
    return summary


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, cfg: Config, rt: runtime.Runtime) -> float:
    """Mean validation loss over fixed batches (the same ones at every evaluation), over all ranks."""
    t = cfg.train
    rows = t.global_batch // rt.dp_size
    total = torch.zeros(())
    for i in range(t.eval_batches):
        x, y = batch(corpus.val, seed=t.seed + 1_000_003, step=i, global_batch=t.global_batch,
                     lo=rt.dp_rank * rows, hi=(rt.dp_rank + 1) * rows, seq_len=t.seq_len)
        logits = model(x.to(rt.device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.to(rt.device).flatten()).cpu()
    return float(runtime.all_mean(total / t.eval_batches, rt))


if __name__ == "__main__":
    sys.exit(main())
