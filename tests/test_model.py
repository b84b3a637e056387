"""The Llama-style model: shapes, causality, grouped-query attention, RoPE."""

from __future__ import annotations

import torch

from launch.config import ModelConfig
from launch.model import Llama, apply_rope, rope_tables

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)


def test_shapes_and_untied_embeddings():
    m = Llama(CFG)
    assert m(torch.randint(0, 64, (3, 10))).shape == (3, 10, 64)
    assert m.embed.weight.data_ptr() != m.head.weight.data_ptr()
    assert m.layers[0].attn.wk.weight.shape == (2 * 8, 32), "grouped-query: fewer kv heads"


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    m = Llama(CFG)
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64
    assert torch.allclose(m(x)[0, :8], m(y)[0, :8], atol=1e-6)
    assert not torch.allclose(m(x)[0, 8:], m(y)[0, 8:])


def test_rope_preserves_norm_and_relative_position():
    cos, sin = rope_tables(8, 16, 10000.0)
    q = torch.randn(1, 1, 16, 8)
    r = apply_rope(q, cos, sin)
    assert torch.allclose(r.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    same = torch.randn(8).expand(1, 1, 16, 8)
    rs = apply_rope(same, cos, sin)
    d1 = rs[0, 0, 3] @ rs[0, 0, 5]
    d2 = rs[0, 0, 9] @ rs[0, 0, 11]
    assert torch.allclose(d1, d2, atol=1e-4), "dot product depends only on the offset"
