"""ZeroAdamW inside Hugging Face ``transformers.Trainer``.

    from zero_adam.integrations.transformers import ZeroAdamTrainer    # instead of Trainer
    trainer = ZeroAdamTrainer(model=model, args=args, train_dataset=ds, zero_adam={"stage": 2})
    trainer.train()                                   # torchrun --nproc-per-node=N train.py

Everything else is Trainer's own. What differs, and why:

- The optimizer is a ``ZeroAdamW`` built from ``TrainingArguments`` exactly as Trainer builds its
  AdamW (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``; ``weight_decay`` on every parameter
  but biases and norms, Trainer's ``get_decay_parameter_names``); the scheduler is Trainer's.
- The model is not wrapped in DDP (ZeroAdamW reduces gradients itself): Trainer's
  ``accelerator.prepare(model, optimizer)`` goes through ``zero_adam.integrations.accelerate.prepare``,
  so gradient accumulation maps onto ``opt.no_sync()`` and clipping onto ZeroAdamW's global norm,
  which Trainer logs as ``grad_norm``.
- ``checkpoint-N/zero_adam`` holds the optimizer (every rank writes its shard through
  ``zero_adam.checkpoint``) instead of rank 0's ``optimizer.pt``, which would hold rank 0's shard
  only; ``train(resume_from_checkpoint=...)`` restores it on any number of processes. A plain
  Trainer checkpoint (``optimizer.pt`` of a DDP + AdamW run) is joined too.
- ``save_model()`` / ``save_pretrained`` are untouched: a normal Hugging Face checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .. import checkpoint, interop
from ..optimizer import ZeroAdamW
from . import accelerate as zero_accelerate

log = logging.get_logger(__name__)
SUBDIR = "zero_adam"
OPTIMIZER_NAME = "optimizer.pt"   # transformers.trainer's names for a plain Trainer's files
SCHEDULER_NAME = "scheduler.pt"
ADAMW = ("adamw_torch", "adamw_torch_fused")
FROM_ARGS = {"lr": "learning_rate", "betas": "adam_beta1/adam_beta2", "eps": "adam_epsilon",
             "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm"}


def optimizer_from_args(model: nn.Module, args: Any, decay_parameters: Collection[str],
                        **options: Any) -> ZeroAdamW:
    """The ZeroAdamW that Trainer's AdamW would be: two groups, ``decay_parameters`` with
    ``args.weight_decay`` and the other trainable parameters without. ``options`` go to
    ZeroAdamW (``stage``, ``bucket_mb``, ``param_dtype``, ``overlap_gather``...)."""
    clash = sorted(k for k in options if k in FROM_ARGS)
    if clash:
        raise ValueError(f"zero_adam={{{', '.join(clash)}: ...}}: these come from TrainingArguments "
                         f"({', '.join(FROM_ARGS[k] for k in clash)}); set them there")
    decay = set(decay_parameters)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return ZeroAdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **options)


def check_args(args: Any) -> None:
    """Refuse the TrainingArguments that would silently bypass ZeroAdamW, with what to do."""
    problems = []
    optim = getattr(args.optim, "value", args.optim)
    if optim not in ADAMW:
        problems.append(f"optim={optim!r}: ZeroAdamTrainer trains with ZeroAdamW (AdamW); use "
                        f"optim='adamw_torch_fused' (the default) or plain Trainer")
    if args.fp16:
        problems.append("fp16=True: Accelerate's GradScaler unscales param.grad, which ZeroAdamW keeps "
                        "in its own buffers; use bf16=True, or ZeroAdamW's fp16 (param_dtype=float16, "
                        "loss_scale='dynamic') in your own loop")
    if args.deepspeed or args.fsdp:
        problems.append("deepspeed/fsdp: ZeroAdamW shards the optimizer itself; drop those arguments")
    if args.n_gpu > 1:
        problems.append(f"{args.n_gpu} GPUs in one process (DataParallel): launch one process per GPU "
                        "with torchrun --nproc-per-node=N")
    if problems:
        raise ValueError("ZeroAdamTrainer cannot run with these TrainingArguments:\n  "
                         + "\n  ".join(problems))


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest ``checkpoint-N`` in ``output_dir`` whose Trainer state and optimizer state (ours,
    or a plain Trainer's ``optimizer.pt``) were written to the end."""
    found = [(int(m.group(1)), d) for d in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", d.name)) and d.is_dir()]
    for _, d in sorted(found, reverse=True):
        ours = d / SUBDIR
        usable = checkpoint.is_complete(ours) if ours.exists() else (d / OPTIMIZER_NAME).is_file()
        if usable and (d / "trainer_state.json").is_file():
            return str(d)
        log.warning(f"{d} is incomplete (cut short while saving?): skipped for an older checkpoint")
    raise ValueError(f"no complete checkpoint-N in {output_dir} to resume from "
                     f"({len(found)} incomplete); start without resume_from_checkpoint")


def _zero(optimizer: Any) -> ZeroAdamW | None:
    """The ZeroAdamW under Accelerate's wrapper, if that is what ``optimizer`` is."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, ZeroAdamW) else None


class ZeroAdamTrainer(Trainer):
    """``transformers.Trainer`` training with ``ZeroAdamW``; ``zero_adam`` holds ZeroAdamW's own
    options (``{"stage": 1}``, ``{"param_dtype": torch.bfloat16}``...). Launch with torchrun."""

    def __init__(self, *args: Any, zero_adam: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.zero_adam_options = dict(zero_adam or {})
        self._zero_prepared: tuple | None = None
        super().__init__(*args, **kwargs)
        check_args(self.args)
        if self.optimizer is not None and _zero(self.optimizer) is None:
            raise TypeError(f"optimizers=({type(self.optimizer).__name__}, ...): ZeroAdamTrainer needs a "
                            "ZeroAdamW, or none (it builds one from TrainingArguments)")

    @property
    def zero_optimizer(self) -> ZeroAdamW:
        opt = _zero(self.optimizer)
        if opt is None:
            raise RuntimeError("no ZeroAdamW yet: it is created when train() starts")
        return opt

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``resume_from_checkpoint=True`` takes the newest *complete* ``checkpoint-N`` (Trainer takes
        the newest folder, even one a crash cut short while saving): a damaged one is skipped."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = optimizer_from_args(model, self.args, self.get_decay_parameter_names(model),
                                                 **self.zero_adam_options)
        return self.optimizer

    def create_accelerator_and_postprocess(self) -> None:
        """Route Trainer's ``accelerator.prepare(model, optimizer)`` around DDP (see the module doc)."""
        super().create_accelerator_and_postprocess()
        original = self.accelerator.prepare

        def prepare(*objects: Any, device_placement: Any = None) -> Any:
            opt = _zero(self.optimizer)
            ours = len(objects) >= 2 and objects[0] is self.model and _zero(objects[1]) is opt
            if opt is None or not ours:
                return original(*objects, device_placement=device_placement)
            if self._zero_prepared is None or self._zero_prepared[1].optimizer is not opt:
                self._zero_prepared = zero_accelerate.prepare(self.accelerator, self.model, opt)
            rest = original(*objects[2:]) if len(objects) > 2 else ()
            return (*self._zero_prepared, *(rest if isinstance(rest, tuple) else (rest,)))

        self.accelerator.prepare = prepare

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Every rank writes its shard; rank 0 the scheduler (a plain Trainer file)."""
        checkpoint.save(Path(output_dir) / SUBDIR, self.model, self.zero_optimizer)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, resume_from: str | None) -> None:
        """Restore the optimizer saved on any number of processes (or a plain Trainer's AdamW)."""
        if resume_from is None:
            return
        folder, opt = Path(resume_from), self.zero_optimizer
        if (folder / SUBDIR).is_dir():
            checkpoint.load(folder / SUBDIR, self.model, opt)
        elif (folder / OPTIMIZER_NAME).is_file():   # a DDP + AdamW Trainer run continues sharded
            state = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            interop.load_adamw_state_dict(self.model, opt, state)
        else:
            raise FileNotFoundError(f"{folder} holds no optimizer state ({SUBDIR}/ or {OPTIMIZER_NAME}): "
                                    "resuming would restart AdamW's moments. Resume from a checkpoint "
                                    "saved without save_only_model, or start a new run")
        if (folder / SCHEDULER_NAME).is_file():
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))
