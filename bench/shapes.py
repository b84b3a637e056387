"""The benchmark's model shapes, both about 16-17M FP32 parameters, vocabulary 4096, 128 tokens.

* ``llama``: the launcher's Llama (RMSNorm, rotary attention with grouped KV heads, SwiGLU),
  4 layers of width 512 (16.0M parameters).
* ``gpt``: a GPT-2-style decoder built from ``nn.MultiheadAttention`` (LayerNorm, learned positions,
  GELU MLP 4x, untied head), 4 layers of width 512 (16.8M parameters). ``nn.MultiheadAttention``
  reads ``out_proj.weight`` from its own forward through ``F.multi_head_attention_forward``, not by
  calling the ``out_proj`` module: the pattern an overlapped all-gather must not read stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.config import ModelConfig  # noqa: E402
from launch.model import Llama  # noqa: E402

VOCAB, SEQ = 4096, 128
LLAMA = ModelConfig(vocab_size=VOCAB, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408,
                    max_seq_len=SEQ)


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 512, layers: int = 4, heads: int = 8,
                 seq: int = SEQ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1), persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        """What FSDP2 wraps one by one (the name the Llama uses)."""
        return self.blocks

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln(x))


def build(name: str) -> nn.Module:
    if name == "llama":
        return Llama(LLAMA)
    if name == "gpt":
        return GPT()
    raise ValueError(f"unknown model {name!r}: use llama or gpt")
