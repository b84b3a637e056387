"""The local AdamW update on flat shards, and the gradient-norm helpers. No ``torch.distributed``.

The update is torch's own fused AdamW kernel (``torch._fused_adamw_``), called exactly the way
``torch.optim.AdamW(fused=True)`` calls it, so a shard sees bit-for-bit the arithmetic a plain
AdamW would apply to the same elements. On CPU it streams at memory bandwidth (DESIGN.md §4);
calling it on a few large flat shards instead of hundreds of parameters removes the per-tensor
overhead as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def adamw_(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: Tensors,
    *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool = False, max_exp_avg_sqs: Tensors = (), maximize: bool = False,
) -> None:
    """One AdamW step, in place, over lists of equally-shaped flat tensors.

    ``steps`` are float32 scalar tensors (torch's fused convention); they are incremented here.
    """
    if not params:
        return
    if amsgrad and len(max_exp_avg_sqs) != len(params):
        raise ValueError("amsgrad needs one max_exp_avg_sq tensor per param")
    torch._foreach_add_(list(steps), 1)
    torch._fused_adamw_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        list(steps), amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=eps, maximize=maximize, grad_scale=None, found_inf=None,
    )


def sum_of_squares(tensors: Tensors) -> torch.Tensor:
    """Sum of squared elements of all ``tensors`` as one float32 scalar (on their device).

    Each rank contributes the squares of its own shard; one all-reduce of this scalar then gives
    the squared norm of the full averaged gradient (padding is zero and adds nothing).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(list(tensors), 2)
    return torch.stack([n.float() for n in norms]).square().sum()
