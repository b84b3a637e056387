"""A compact Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied embeddings.

Sized entirely by ``ModelConfig``; builds on any device including ``meta`` (the planner counts a
70B model's parameters without allocating them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launch.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of a (batch, heads, seq, head_dim) tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """``checkpoint_every=K`` recomputes every K-th block's activations in backward instead of
    keeping them (non-reentrant ``torch.utils.checkpoint``: same gradients, less memory)."""

    def __init__(self, cfg: ModelConfig, checkpoint_every: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.checkpoint_every = checkpoint_every
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.head.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/Llama-style init: N(0, std), residual projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        k = self.checkpoint_every
        for i, layer in enumerate(self.layers):
            if k and i % k == 0 and torch.is_grad_enabled():
                x = checkpoint(layer, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = layer(x, self.rope_cos, self.rope_sin)
        return self.head(self.norm(x))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM built from a config class by name; forward returns logits."""

    def __init__(self, cfg: ModelConfig, checkpoint_every: int = 0) -> None:
        super().__init__()
        from launch.config import ConfigError
        try:
            import transformers
        except ImportError:
            raise ConfigError("model.hf_config", [f"model.hf_config={cfg.hf_config}: needs transformers "
                                                  "(pip install 'zero-adam[hf]')"]) from None
        cls = getattr(transformers, cfg.hf_config, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)):
            raise ConfigError("model.hf_config", [f"model.hf_config={cfg.hf_config}: transformers has no "
                                                  "config class of that name (e.g. LlamaConfig, GPT2Config)"])
        known = set(cls().to_dict())
        unknown = sorted(set(cfg.hf_fields) - known)
        if unknown:
            import difflib
            hints = [f"model.hf_fields.{k}: {cfg.hf_config} has no such field" + (
                f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                for k in unknown]
            raise ConfigError("model.hf_fields", hints)
        fields = {"vocab_size": cfg.vocab_size, **cfg.hf_fields}
        for positions in ("max_position_embeddings", "n_positions"):
            if positions in known:
                fields.setdefault(positions, cfg.max_seq_len)
        self.inner = transformers.AutoModelForCausalLM.from_config(cls(**fields))
        if checkpoint_every:  # every block (the schema refuses every:K for transformers models)
            self.inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=tokens).logits


def build_model(cfg: ModelConfig, checkpoint_every: int = 0) -> nn.Module:
    """The built-in Llama, or a ``transformers`` model when ``model.hf_config`` is set;
    ``checkpoint_every``: activation checkpointing of every K-th block (0: none)."""
    return (HFCausalLM if cfg.hf_config else Llama)(cfg, checkpoint_every)
