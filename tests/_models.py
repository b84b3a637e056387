"""A small model with awkward sizes (17x257, a 1-element parameter) and a seeded data stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IN, HIDDEN, OUT = 17, 257, 33


class Net(nn.Module):
    def __init__(self, hidden: int = HIDDEN, unused: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, OUT)
        self.scale = nn.Parameter(torch.ones(1))
        if unused:
            self.spare = nn.Parameter(torch.randn(5, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.norm(self.inp(x)))) * self.scale


def make_model(seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw)


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, IN, generator=g), torch.randn(size, OUT, generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x.to(dtype)).float(), y)


def named_groups(model: nn.Module, wd: float = 0.1) -> list[dict]:
    """Two groups by the usual rule: no weight decay for parameters with dim < 2."""
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_decay(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.9 ** step
