"""Activation memory of the launcher's Llama per rank, counted from the model's own autograd graph.

Nothing is assumed about which tensors backward keeps: one transformer block and the output head
are run on the ``meta`` device (no memory, any size, 70B included) under a saved-tensor hook that
records every distinct storage autograd saves. Attention is counted as a fused (flash) kernel keeps
it on a GPU: q, k, v, the output and the per-row log-sum-exp, never the s x s score matrix. With
tensor parallelism the block is the TP-local one (heads, KV heads and FFN columns / T); the residual
stream and the logits are replicated (the head gathers the vocabulary), as ``launch/tp.py`` does.

Per rank, for one micro-batch (the peak is ``blocks + max(recompute, head)``):

* ``blocks``: what the stored blocks keep: a full block's saved set, or, for a checkpointed block
  (``train.activation_checkpointing``), only its input;
* ``recompute``: one checkpointed block's full saved set, rebuilt during its backward;
* ``head``: what the final norm, the logits and the loss keep, plus the two FP32 logit-sized
  gradients that exist together when backward passes through log-softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from launch.config import ModelConfig


@dataclass(frozen=True)
class Activations:
    blocks: int
    recompute: int
    head: int

    @property
    def total(self) -> int:
        """Backward runs the head first (every stored block alive), then recomputes blocks one at a
        time after the head's tensors are gone: the peak is the larger of the two phases."""
        return self.blocks + max(self.recompute, self.head)

    def as_dict(self) -> dict[str, int]:
        return {"blocks": self.blocks, "recompute": self.recompute, "head": self.head, "total": self.total}


class _FlashAttention(TorchFunctionMode):
    """Stands in for scaled_dot_product_attention: records what a fused kernel saves."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        q, k, v = args[:3]
        out = q * 1.0   # same shape and dtype; multiplying by a number saves nothing
        for t in (q, k, v, out):
            self.record(t)
        b, h, s, _ = q.shape
        self.record(torch.empty(b, h, s, dtype=torch.float32, device="meta"))  # log-sum-exp
        return out


def _saved_bytes(fn, *inputs: torch.Tensor, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn(*inputs)`` on meta."""
    seen: dict[int, int] = {}
    alive: list[torch.Tensor] = []   # a freed storage's address could be reused by the next one
    skip = {t.untyped_storage()._cdata for t in exclude}

    def record(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        alive.append(t)
        if st._cdata not in skip:
            seen[st._cdata] = st.nbytes()
        return t

    with saved_tensors_hooks(record, lambda t: t), _FlashAttention(record):
        fn(*inputs)
    return sum(seen.values())


def activation_bytes(cfg: ModelConfig, *, micro_batch: int, seq_len: int, tp: int = 1,
                     checkpoint_every: int = 0, dtype: torch.dtype = torch.float32) -> Activations:
    """Peak activation bytes of one rank for one micro-batch of the built-in Llama."""
    from launch.model import Block, RMSNorm, rope_tables
    kv = cfg.n_kv_heads or cfg.n_heads
    local = cfg.model_copy(update={"n_heads": cfg.n_heads // tp, "n_kv_heads": kv // tp,
                                   "ffn_dim": cfg.ffn_dim // tp})
    with torch.device("meta"):
        block = Block(local).to(dtype)
        _resize_attention(block, cfg, tp, dtype)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, seq_len, cfg.rope_theta)
        x = torch.empty(micro_batch, seq_len, cfg.dim, dtype=dtype, requires_grad=True)
        norm = RMSNorm(cfg.dim, cfg.norm_eps).to(dtype)
        head = torch.empty(cfg.vocab_size, cfg.dim, dtype=dtype, requires_grad=True)
    weights = tuple(block.parameters()) + tuple(norm.parameters()) + (head,)
    full_block = _saved_bytes(lambda t: block(t, cos, sin), x, exclude=weights)
    block_input = x.numel() * x.element_size()
    n_ckpt = math.ceil(cfg.n_layers / checkpoint_every) if checkpoint_every else 0
    blocks = n_ckpt * block_input + (cfg.n_layers - n_ckpt) * full_block
    recompute = full_block if n_ckpt else 0

    def loss(t: torch.Tensor) -> torch.Tensor:
        logits = F.linear(norm(t), head).float()
        return F.cross_entropy(logits.flatten(0, 1), torch.zeros(t.shape[0] * t.shape[1], dtype=torch.long,
                                                                 device="meta"))
    head_bytes = _saved_bytes(loss, x, exclude=weights)
    # backward of log-softmax allocates its FP32 result while the incoming FP32 gradient is alive
    grad_logits = 2 * micro_batch * seq_len * cfg.vocab_size * 4
    return Activations(blocks, recompute, head_bytes + grad_logits)


def _resize_attention(block, cfg: ModelConfig, tp: int, dtype: torch.dtype) -> None:
    """Give the TP-local attention the full model's head size (the local config would derive a
    larger one from dim / (n_heads / tp))."""
    att = block.attn
    d = cfg.dim // cfg.n_heads
    att.head_dim = d
    kv = (cfg.n_kv_heads or cfg.n_heads) // tp
    att.wq = torch.nn.Linear(cfg.dim, att.n_heads * d, bias=False, dtype=dtype)
    att.wk = torch.nn.Linear(cfg.dim, kv * d, bias=False, dtype=dtype)
    att.wv = torch.nn.Linear(cfg.dim, kv * d, bias=False, dtype=dtype)
    att.wo = torch.nn.Linear(att.n_heads * d, cfg.dim, bias=False, dtype=dtype)
