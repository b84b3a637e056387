"""A Hugging Face ``Trainer`` script that trains with zero-adam; ``--plain`` runs the same script
with plain ``Trainer`` (DDP + AdamW) for comparison.

    torchrun --standalone --nproc-per-node=2 launch/hf_trainer.py                # ZeroAdamTrainer
    torchrun --standalone --nproc-per-node=2 launch/hf_trainer.py --plain        # Trainer, DDP + AdamW
    torchrun --standalone --nproc-per-node=1 launch/hf_trainer.py --accum 4 --resume
                                 # continue the newest checkpoint-N on 1 process (same global batch)

Against a plain Trainer script three lines change (marked ``# zero-adam``): the import, the class,
and launching with torchrun. The model is a small random GPT-2 (tied embeddings) or Llama built from
a config (nothing downloaded); the data is this interpreter's standard library as bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers as hf  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from launch.config import DataConfig  # noqa: E402
from launch.data import load_corpus  # noqa: E402
from zero_adam.integrations.transformers import ZeroAdamTrainer  # noqa: E402  # zero-adam (1/3)


def build_model(kind: str, seq_len: int) -> hf.PreTrainedModel:
    """A byte-level model (vocabulary 256), dropout off so runs on any process count compare."""
    torch.manual_seed(0)
    if kind == "gpt2":
        return hf.GPT2LMHeadModel(hf.GPT2Config(
            vocab_size=256, n_positions=seq_len, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=False))


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive windows of ``seq_len`` bytes as causal-LM examples (labels = inputs)."""

    def __init__(self, seq_len: int, max_bytes: int = 400_000) -> None:
        corpus = load_corpus(DataConfig(max_bytes=max_bytes), seq_len, 256)
        tokens = torch.from_numpy(corpus.train.astype("int64"))
        self.rows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def make_trainer(a: argparse.Namespace) -> Trainer:
    args = TrainingArguments(
        output_dir=a.output_dir, use_cpu=not torch.cuda.is_available(), seed=0, report_to=[],
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum, max_steps=a.steps,
        learning_rate=a.lr, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_steps=a.save_steps,
        disable_tqdm=True)
    model, data = build_model(a.model, a.seq_len), ByteWindows(a.seq_len)
    if a.plain:
        return Trainer(model=model, args=args, train_dataset=data)
    return ZeroAdamTrainer(model=model, args=args, train_dataset=data,        # zero-adam (2/3)
                           zero_adam={"stage": a.stage})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--plain", action="store_true", help="plain Trainer (DDP + torch AdamW) instead")
    p.add_argument("--stage", type=int, choices=[1, 2], default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--output-dir", default="runs/hf_trainer")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the newest checkpoint-N in --output-dir, or from this folder")
    p.add_argument("--losses", help="write Trainer's log history as JSON (rank 0)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    trainer = make_trainer(a)                                                  # zero-adam (3/3): torchrun
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(f"{a.output_dir}/final")       # a normal Hugging Face folder: from_pretrained loads it
    history = [r for r in trainer.state.log_history if "loss" in r]
    if trainer.is_world_process_zero():
        if a.losses:
            Path(a.losses).write_text(json.dumps(history))
        print(f"loss {history[0]['loss']:.4f} (step {history[0]['step']}) -> {history[-1]['loss']:.4f} "
              f"(step {history[-1]['step']}); model in {a.output_dir}/final")
    # DDP's reducer and ZeroAdamW's hooks go while the process group is alive and idle: left to
    # interpreter exit, a gloo teardown can abort the process (torch 2.13, seen here)
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    del trainer
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
