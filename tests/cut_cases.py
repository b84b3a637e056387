"""Parameters cut into chunk buckets, the way user code breaks optimizers (spawned by
tests/test_cut_params.py at world size 3): a weight used four times in one backward, reentrant
checkpointing, freezing and unfreezing mid-run, the optimizer re-created on the same model;
single-process torch.optim.AdamW on the global batch is the reference at every step."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zero_adam import ZeroAdamW


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(97, 23)      # 2,231 elements: cut (262-element buckets)
        self.shared = torch.nn.Linear(23, 23)       # 552: cut, used four times
        self.head = torch.nn.Linear(23, 97)         # 2,231: cut

    def forward(self, x: torch.Tensor, reentrant: bool) -> torch.Tensor:
        h = self.emb(x)
        for _ in range(3):
            block = lambda t: torch.tanh(self.shared(t))  # noqa: E731
            h = checkpoint(block, h, use_reentrant=True) if reentrant else block(h)
        return self.head(h + 0.1 * self.shared(h))


def run(stage: int, reentrant: bool) -> float:
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)

    def build():
        return ZeroAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, stage=stage, bucket_mb=0.001)
    opt = build()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    assert len(opt.plan.split_params()) == 3
    worst = 0.0
    for step in range(8):
        if step in (3, 5):                          # freeze, then unfreeze, the embedding
            for m in (model, ref):
                m.emb.weight.requires_grad_(step == 5)
        if step == 6:                               # both optimizers re-created (fresh moments)
            opt.close()
            opt = build()
            ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        x = torch.randint(0, 97, (2 * ws, 5), generator=torch.Generator().manual_seed(step))
        mine = x[2 * rank:2 * rank + 2]
        F.cross_entropy(model(mine, reentrant).flatten(0, 1), mine.flatten()).backward()
        opt.step()
        opt.zero_grad()
        F.cross_entropy(ref(x, reentrant).flatten(0, 1), x.flatten()).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        pairs = zip(model.parameters(), ref.parameters())
        worst = max(worst, max((p - q).abs().max().item() for p, q in pairs))
    opt.close()
    return worst


def all_cases() -> dict:
    import warnings
    warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
    return {f"s{s}-reentrant{r}": run(s, r) for s in (1, 2) for r in (False, True)}
