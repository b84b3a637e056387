"""A Hugging Face ``transformers`` causal LM trained with Accelerate: zero-adam or plain DDP.

    torchrun --standalone --nproc-per-node=2 launch/hf_example.py --mode zero   # Accelerate + ZeroAdamW
    torchrun --standalone --nproc-per-node=2 launch/hf_example.py --mode ddp    # Accelerate + DDP + AdamW

The same loop either way; only the preparation differs (see ``build``). The model is a small
``LlamaConfig`` built from scratch (no weights downloaded); the data is this interpreter's standard
library as bytes. Gradient accumulation, clipping, an LR schedule and ``save_state``/``load_state``
are on. With ``--out`` rank 0 writes the loss of every micro-step as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from launch.config import DataConfig, OptimConfig  # noqa: E402
from launch.data import batch, load_corpus  # noqa: E402
from launch.optim import param_groups  # noqa: E402


def build(mode: str, accelerator, a: argparse.Namespace):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=a.seq_len,
                      tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(accelerator.device)
    groups = [{**g, "params": [p for _, p in g["params"]]} for g in param_groups(model, OptimConfig())]
    if mode == "zero":
        from zero_adam import ZeroAdamW
        from zero_adam.integrations.accelerate import prepare
        opt = ZeroAdamW(groups, lr=a.lr, betas=(0.9, 0.95), stage=a.stage)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        model, opt, sched = prepare(accelerator, model, opt, sched)
    else:
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        model, opt, sched = accelerator.prepare(model, opt, sched)
    return model, opt, sched


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["zero", "ddp"], default="zero")
    p.add_argument("--stage", type=int, choices=[1, 2], default=2, help="ZeroAdamW stage (--mode zero)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-at", type=int, help="accelerator.save_state(--state-dir) after this step")
    p.add_argument("--resume-at", type=int, help="accelerator.load_state(--state-dir), continue at this step")
    p.add_argument("--state-dir", default="runs/hf_example/state")
    p.add_argument("--out", help="write the losses as JSON (rank 0)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="Accelerate's autocast (the FP32 weights and optimizer stay FP32)")
    a = p.parse_args(argv)
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=a.accum,
                              mixed_precision=a.mixed_precision)
    model, opt, sched = build(a.mode, accelerator, a)
    corpus = load_corpus(DataConfig(max_bytes=1_000_000), a.seq_len, 256)
    world, rank = accelerator.num_processes, accelerator.process_index
    start = 0
    if a.resume_at is not None:
        accelerator.load_state(a.state_dir)
        start = a.resume_at
    losses = []
    for step in range(start, a.steps):
        for micro in range(a.accum):
            lo = (micro * world + rank) * a.micro_batch
            x, _ = batch(corpus.train, seed=0, step=step, global_batch=a.micro_batch * world * a.accum,
                         lo=lo, hi=lo + a.micro_batch, seq_len=a.seq_len)
            x = x.to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=x, labels=x).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
        if a.save_at is not None and step + 1 == a.save_at:
            accelerator.save_state(a.state_dir)
    if a.out and accelerator.is_main_process:
        Path(a.out).write_text(json.dumps({"mode": a.mode, "start": start, "losses": losses}))
    elif accelerator.is_main_process:
        print(f"{a.mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {a.steps - start} steps")
    # Release DDP's reducer while the process group is alive and idle: destroyed at interpreter exit
    # instead, it can deadlock joining a gloo thread that waits for the GIL (torch 2.13, seen here).
    accelerator.wait_for_everyone()
    del model, opt, sched
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
