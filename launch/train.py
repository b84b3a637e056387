"""Train a Llama-style model with ZeroAdamW from a YAML config.

    torchrun --standalone --nproc-per-node=2 launch/train.py --config configs/tiny.yaml optim.lr=3e-3
    python launch/train.py --config configs/tiny.yaml          # one process, same code path
    python launch/train.py --config configs/tiny.yaml --check  # validate the config and exit

A bad config, data file or override exits with status 2 and a short message (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `launch` and `zero_adam` from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from launch import runtime  # noqa: E402
from launch.config import Config, ConfigError, check_world, load_config  # noqa: E402
from launch.data import Corpus, DataError, batch, load_corpus, rows_of  # noqa: E402
from launch.logs import RunLog  # noqa: E402
from launch.model import Llama, count_params  # noqa: E402
from launch.optim import build_optimizer, build_scheduler  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    p.add_argument("--check", action="store_true", help="validate the config (and data) and exit")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. optim.lr=3e-4 train.steps=50")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rt = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            load_corpus(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)
            print(f"{args.config}: config OK")
            return 0
        rt = runtime.init()
        check_world(cfg, rt.world_size)
        corpus = load_corpus(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)
        train(cfg, rt, corpus)
        return 0
    except (ConfigError, DataError) as e:
        if rt is None or rt.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        runtime.shutdown()


def train(cfg: Config, rt: runtime.Runtime, corpus: Corpus) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    model = Llama(cfg.model).to(rt.device)
    opt = build_optimizer(model, cfg.optim, rt.group)
    sched = build_scheduler(opt, cfg.schedule, t.steps)
    n_micro = t.global_batch // (t.micro_batch * rt.world_size)
    out_dir = Path(cfg.logging.out_dir.format(name=cfg.name))
    log = RunLog(cfg.logging, out_dir, main=rt.is_main, total_steps=t.steps)
    log.info(f"{cfg.name}: {count_params(model):,} params on {rt.world_size} x {rt.device.type} "
             f"({rt.backend}), ZeRO stage {cfg.optim.stage}, {len(opt.buckets)} buckets; "
             f"{corpus.description}; {n_micro} micro-step(s) of {t.micro_batch} x {t.seq_len} per rank")
    first_val = last_val = evaluate(model, corpus, cfg, rt)
    log.record({"step": 0, "val_loss": first_val})
    tokens_per_step = t.global_batch * t.seq_len
    started = window_start = time.perf_counter()
    loss_sum, window_steps = torch.zeros(()), 0
    for step in range(t.steps):
        for k in range(n_micro):
            lo, hi = rows_of(k, rt.rank, t.micro_batch, rt.world_size)
            x, y = batch(corpus.train, seed=t.seed, step=step, global_batch=t.global_batch, lo=lo, hi=hi,
                         seq_len=t.seq_len)
            with opt.no_sync() if k < n_micro - 1 else contextlib.nullcontext():
                loss = F.cross_entropy(model(x.to(rt.device)).float().flatten(0, 1),
                                       y.to(rt.device).flatten()) / n_micro
                loss.backward()
            loss_sum += loss.detach().cpu()
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        opt.zero_grad()
        window_steps += 1
        log.advance()
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - window_start
            mean_loss = float(runtime.all_mean(loss_sum / window_steps, rt))
            log.record({"step": done, "loss": mean_loss, "lr": lr, "grad_norm": opt.last_grad_norm,
                        "tokens_per_s": tokens_per_step * window_steps / elapsed,
                        "mem_bytes": opt.memory_report()["total"]})
            loss_sum, window_start, window_steps = torch.zeros(()), time.perf_counter(), 0
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            last_val = evaluate(model, corpus, cfg, rt)
            log.record({"step": done, "val_loss": last_val})
    wall = time.perf_counter() - started
    summary = {"steps": t.steps, "seconds": wall, "tokens_per_s": tokens_per_step * t.steps / wall,
               "first_val_loss": first_val, "last_val_loss": last_val,
               "val_drop": 1 - last_val / first_val, "mem_bytes": opt.memory_report()}
    log.close()
    plot = log.plot(cfg.name)
    log.info(f"done: {t.steps} steps in {wall:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s; "
             f"validation loss {first_val:.3f} -> {last_val:.3f} ({summary['val_drop']:.0%} lower); "
             f"optimizer-held bytes per rank {summary['mem_bytes']['total']:,}; "
             f"metrics in {out_dir / 'metrics.jsonl'}" + (f", plot {plot}" if plot else ""))
    return summary


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, cfg: Config, rt: runtime.Runtime) -> float:
    """Mean validation loss over fixed batches (the same ones at every evaluation), over all ranks."""
    t = cfg.train
    rows = t.global_batch // rt.world_size
    total = torch.zeros(())
    for i in range(t.eval_batches):
        x, y = batch(corpus.val, seed=t.seed + 1_000_003, step=i, global_batch=t.global_batch,
                     lo=rt.rank * rows, hi=(rt.rank + 1) * rows, seq_len=t.seq_len)
        logits = model(x.to(rt.device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.to(rt.device).flatten()).cpu()
    return float(runtime.all_mean(total / t.eval_batches, rt))


if __name__ == "__main__":
    sys.exit(main())
