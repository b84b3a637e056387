"""ZeroAdamW in a Hugging Face Accelerate training loop.

    accelerator = Accelerator(gradient_accumulation_steps=2)      # Accelerator(cpu=True) on CPU
    model = build_model().to(accelerator.device)                  # on its device first, not wrapped
    opt = ZeroAdamW(model.parameters(), lr=3e-4)
    model, opt, scheduler, loader = prepare(accelerator, model, opt, scheduler, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); scheduler.step(); opt.zero_grad()
    accelerator.save_state("ckpt")                                # and load_state("ckpt")

``prepare`` returns what ``accelerator.prepare`` would, except that the model is not wrapped in
DDP (ZeroAdamW reduces gradients itself; mixed-precision autocast and ``torch.compile`` are applied
as Accelerate applies them) and the optimizer's state is saved by
``zero_adam.checkpoint`` (every rank its shard, loadable on any world size) instead of
Accelerate's main-process ``optimizer.bin``. ``accumulate(model)`` maps onto ``opt.no_sync()``,
``clip_grad_norm_`` onto ZeroAdamW's global norm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import checkpoint
from ..optimizer import ZeroAdamW

SUBDIR = "zero_adam"


def prepare(accelerator: Any, model: nn.Module, optimizer: ZeroAdamW, *objects: Any) -> tuple:
    """``accelerator.prepare(model, optimizer, *objects)`` for a ZeroAdamW-trained model."""
    from accelerate.optimizer import AcceleratedOptimizer

    if not isinstance(optimizer, ZeroAdamW):
        raise TypeError(f"prepare() takes a ZeroAdamW, got {type(optimizer).__name__}; for other "
                        "optimizers use accelerator.prepare")
    want = accelerator.device
    devices = {p.device for p in model.parameters()}
    if any(d.type != want.type or (d.type != "cpu" and d.index != want.index) for d in devices):
        raise ValueError(f"the model's parameters are on {sorted(map(str, devices))} but the accelerator "
                         f"runs on {accelerator.device}: move the model with model.to(accelerator.device) "
                         "*before* creating ZeroAdamW (it binds the parameters in place)")
    # Accelerate's own preparation without its DDP wrap: mixed-precision autocast (bf16=True) and
    # torch.compile when configured; the parameters stay where ZeroAdamW bound them.
    prepared = accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
    for m in {id(model): model, id(prepared): prepared}.values():
        m.no_sync = optimizer.no_sync           # what accelerator.no_sync/accumulate look for
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=None)

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0):
        return optimizer.clip_grad_norm_(max_norm, norm_type)

    accelerator.clip_grad_norm_ = clip_grad_norm_
    def save_hook(models: list, weights: list, output_dir: str) -> None:
        checkpoint.save(Path(output_dir) / SUBDIR, model, optimizer)
        # parameters are views into shared bucket buffers, which safetensors refuses to write:
        # hand Accelerate independent copies of the weights it is about to save
        for i, w in enumerate(weights):
            weights[i] = {k: v.detach().clone() if hasattr(v, "detach") else v for k, v in w.items()}

    accelerator.register_save_state_pre_hook(save_hook)
    def load_hook(models: list, input_dir: str) -> None:
        checkpoint.load(Path(input_dir) / SUBDIR, model, optimizer)  # restores the weights too, so
        models[:] = [m for m in models if m is not model]           # Accelerate skips this model

    accelerator.register_load_state_pre_hook(load_hook)
    rest = accelerator.prepare(*objects) if objects else ()
    rest = rest if isinstance(rest, tuple) else (rest,)
    return (prepared, wrapped, *rest)
