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
    """Sum of squared elements of all ``tensors`` as one float32 scalar (float64 when any shard is
    float64), on their device.

    Each rank contributes the squares of its own shard; one all-reduce of this scalar then gives
    the squared norm of the full averaged gradient (padding is zero and adds nothing).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if all(t.dtype == wide for t in tensors):
        norms = torch._foreach_norm(list(tensors), 2)
    else:  # accumulate 16-bit shards in FP32 (FP64 when any shard is FP64)
        norms = [torch.linalg.vector_norm(t, 2, dtype=wide) for t in tensors]
    return torch.stack([n.to(wide) for n in norms]).square().sum()


def split_bf16(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 ``master`` -> (bf16 value, int16 remainder) with ``join_bf16`` giving ``master`` back exactly.

    The bf16 value is the FP32 value rounded at its 16th bit, ties away from zero (the rule Apex
    uses): with round-half-to-even, an even bf16 value is reached from 65,537 FP32 values, one more
    than 16 bits can tell apart. It differs from ``master.bfloat16()`` only on exact ties.
    """
    bits = master.view(torch.int32)
    rem = (bits << 16) >> 16                      # low 16 bits, as a signed number in [-2^15, 2^15)
    hi = (bits - rem) >> 16                       # high bits, rounded up when rem < 0
    return hi.to(torch.int16).view(torch.bfloat16), rem.to(torch.int16)


def join_bf16(value: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The FP32 master whose ``split_bf16`` is (``value``, ``remainder``)."""
    bits = (value.view(torch.int16).to(torch.int32) << 16) + remainder.to(torch.int32)
    return bits.view(torch.float32)


def round_to_bf16(master: torch.Tensor) -> torch.Tensor:
    """The bf16 parameter for an FP32 master: the same rounding in both master modes, so that a
    2-byte (remainder) master and a 4-byte one train bit-identically."""
    return split_bf16(master)[0]
