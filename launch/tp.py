"""Tensor parallelism for the Llama model: one plan, used by the runtime and by the planner.

Megatron-style: attention heads and FFN columns are split across the TP ranks (q/k/v and w1/w3
column-wise, wo and w2 row-wise), the embedding and the output head by vocabulary; RMSNorm weights
are replicated. ``local_shape`` gives a parameter's shape on one TP rank without building
anything, so the planner can size a 70B model on the ``meta`` device.
"""

from __future__ import annotations

from torch import nn

from launch.config import ModelConfig

# suffix of a parameter name -> the dimension split across TP ranks
SPLIT_DIM = {
    "attn.wq.weight": 0, "attn.wk.weight": 0, "attn.wv.weight": 0, "attn.wo.weight": 1,
    "ffn.w1.weight": 0, "ffn.w3.weight": 0, "ffn.w2.weight": 1,
    "embed.weight": 0, "head.weight": 0,
}


def check(cfg: ModelConfig, tp: int) -> list[str]:
    """Why this model cannot be split ``tp`` ways (empty: it can)."""
    kv = cfg.n_kv_heads or cfg.n_heads
    out = []
    for what, n in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", kv),
                    ("model.ffn_dim", cfg.ffn_dim), ("model.vocab_size", cfg.vocab_size)):
        if n % tp:
            out.append(f"--tp {tp}: {what}={n} is not divisible by {tp}")
    return out


def local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[tuple[int, ...], bool]:
    """A parameter's shape on one TP rank, and whether it is split (else replicated)."""
    for suffix, dim in SPLIT_DIM.items():
        if name.endswith(suffix) and tp > 1:
            out = list(shape)
            out[dim] //= tp
            return tuple(out), True
    return tuple(shape), False


def parallelize(model: nn.Module, mesh) -> nn.Module:
    """Apply the plan with torch's ``parallelize_module`` on a 1-D TP ``mesh``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    for layer in model.layers:
        parallelize_module(layer, mesh, {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(), "ffn.w1": ColwiseParallel(), "ffn.w3": ColwiseParallel(),
            "ffn.w2": RowwiseParallel()})
        layer.attn.n_heads //= mesh.size()
        layer.attn.n_kv //= mesh.size()
    parallelize_module(model, mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Replicate()),
    })
    return model
