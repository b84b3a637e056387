"""The methods compared, each built from the same model and the same hyperparameters.

Each builder returns a ``Method``: ``step(x, y)`` runs forward, backward and the optimizer step
and returns the loss; ``state_bytes()`` is this rank's optimizer state (master copies and
moments) as the method itself allocates it.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import comm_count

LR, BETAS, WD, CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0  # every method clips the global norm at 1.0


@dataclass
class Method:
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    state_bytes: Callable[[], int]
    finish: Callable[[], None] = lambda: None   # complete communication still in flight after step()
    describe: Callable[[], dict] = dict         # settings worth reporting (zero-adam's collectives)


def _loss(model, x, y):
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def _tensor_bytes(tensors) -> int:
    out = 0
    for t in tensors:
        if hasattr(t, "to_local"):
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            out += t.numel() * t.element_size()
    return out


def _torch_state_bytes(opt) -> int:
    return _tensor_bytes(v for s in opt.state.values() for v in s.values())


def zero_adam(model, stage: int, **kw) -> Method:
    from zero_adam import ZeroAdamW
    opt = ZeroAdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, stage=stage,
                    max_grad_norm=CLIP, **kw)

    def step(x, y):
        with comm_count.phase("forward"):
            loss = _loss(model, x, y)
        with comm_count.phase("backward"):
            loss.backward()
        with comm_count.phase("step"):
            opt.step()
            opt.zero_grad()
        return loss

    def state_bytes():
        r = opt.memory_report()
        return r["master"] + r["exp_avg"] + r["exp_avg_sq"]

    def describe():
        return {"gradients": opt.comm.reduce_collective, "parameters": opt.comm.gather_collective,
                "overlap_gather": opt._prefetch is not None, "buckets": len(opt.buckets)}
    return Method(step, state_bytes, opt.wait_params, describe)


def _ddp_wrap(model, device):
    """DDP with its all-reduce counted (a comm hook equal to the default)."""
    ids = [device.index] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    wrapped.register_comm_hook(None, comm_count.ddp_hook)
    return wrapped


def _clipped_step(forward, model, opt) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The plain torch loop every non-zero-adam baseline shares: backward, clip, step, zero."""
    def step(x, y):
        with comm_count.phase("forward"):
            loss = _loss(forward, x, y)
        with comm_count.phase("backward"):
            loss.backward()
        with comm_count.phase("step"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    return step


def floor(model) -> Method:
    """The no-communication floor: DDP's loop without DDP (forward, backward, local clip, fused
    AdamW over the full model). No method that averages gradients can be faster."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    return Method(_clipped_step(model, model, opt), lambda: _torch_state_bytes(opt))


def ddp(model, device) -> Method:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    return Method(_clipped_step(_ddp_wrap(model, device), model, opt), lambda: _torch_state_bytes(opt))


def torch_zero(model, device) -> Method:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR,
                                  betas=BETAS, weight_decay=WD, fused=True)
    return Method(_clipped_step(_ddp_wrap(model, device), model, opt), lambda: _torch_state_bytes(opt.optim))


def deepspeed_zero(model, stage: int, micro_batch: int) -> Method:
    import deepspeed
    config = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 25_000_000, "allgather_bucket_size": 25_000_000,
                              "reduce_scatter": True},
        "gradient_clipping": CLIP, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                dist_init_required=False)

    def step(x, y):
        with comm_count.phase("forward"):
            loss = _loss(engine, x, y)
        with comm_count.phase("backward"):
            engine.backward(loss)
        with comm_count.phase("step"):
            engine.step()
        return loss

    def state_bytes():
        inner = _torch_state_bytes(ds_opt.optimizer)
        masters = _tensor_bytes(getattr(ds_opt, "single_partition_of_fp32_groups", []))
        return inner + masters
    return Method(step, state_bytes)


def fsdp2(model) -> Method:
    from torch.distributed.fsdp import fully_shard
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                            foreach=True)
    return Method(_clipped_step(model, model, opt), lambda: _torch_state_bytes(opt))


VARIANTS = {  # named option sets after a colon: zero-adam-2:no-overlap
    "no-overlap": {"overlap_gather": False},
    "overlap": {"overlap_gather": True},
    "rs-ag": {"reduce_collective": "reduce_scatter", "gather_collective": "all_gather"},
    "ar-ar": {"reduce_collective": "all_reduce", "gather_collective": "all_reduce"},
}


def zero_adam_options(variant: str) -> dict:
    """``""``: the library's defaults (nothing passed); a name from ``VARIANTS``; or explicit
    options, ``key=value`` separated by ``+`` (``bucket_mb=50+overlap_gather=False``)."""
    if not variant:
        return {}
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    out = {}
    for item in variant.split("+"):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"zero-adam variant {item!r}: use one of {sorted(VARIANTS)} or key=value")
        out[key] = ast.literal_eval(value) if value[:1].isdigit() or value in ("True", "False", "None") \
            else value
    return out


def build(name: str, model, device, micro_batch: int) -> Method:
    """``zero-adam-<stage>`` is ``ZeroAdamW(params, stage=...)`` with the library's defaults (only
    the shared hyperparameters and clipping passed); ``zero-adam-2:<variant>`` changes options
    (``zero_adam_options``). ``floor``: every rank trains alone, no collective at all."""
    if name.startswith("zero-adam-"):
        stage, _, variant = name.removeprefix("zero-adam-").partition(":")
        return zero_adam(model, int(stage), **zero_adam_options(variant))
    if name == "floor":
        return floor(model)
    if name == "ddp":
        return ddp(model, device)
    if name == "torch-zero":
        return torch_zero(model, device)
    if name in ("deepspeed-1", "deepspeed-2"):
        return deepspeed_zero(model, int(name[-1]), micro_batch)
    if name == "fsdp2":
        return fsdp2(model)
    raise ValueError(f"unknown method {name}")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
