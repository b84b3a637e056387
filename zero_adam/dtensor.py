"""Tensor-parallel parameters (``DTensor``s from ``parallelize_module``), seen from ZeroAdamW.

ZeroAdamW shards each TP rank's *local* tensor over the data-parallel group: the local shard
becomes a view into a bucket buffer and its local gradient is what gets reduced. A parameter is
"TP-sharded" when any placement is ``Shard`` (its local pieces are disjoint across TP ranks) and
"TP-replicated" otherwise (plain tensors such as norm weights, or ``Replicate`` DTensors): for the
global gradient norm the former are summed over the TP group, the latter counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor, Shard = (), ()


def is_dtensor(t: torch.Tensor) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (the DTensor's local shard, or ``t`` itself)."""
    return t._local_tensor if is_dtensor(t) else t


def local_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient as laid out like ``param`` on this rank (autograd may hand a DTensor gradient
    over with other placements, e.g. replicated or partial: redistribute it first)."""
    if is_dtensor(grad):
        if tuple(grad.placements) != tuple(param.placements):
            grad = grad.redistribute(param.device_mesh, param.placements)
        return grad._local_tensor
    return grad


def tp_sharded(t: torch.Tensor) -> bool:
    return is_dtensor(t) and any(isinstance(p, Shard) for p in t.placements)


def shard_dim(t: torch.Tensor) -> int | None:
    """The tensor dimension split across the (1-D) TP mesh, None if ``t`` is not split."""
    if not is_dtensor(t):
        return None
    dims = [p.dim for p in t.placements if isinstance(p, Shard)]
    return dims[0] if dims else None


def rebind(param: torch.Tensor, view: torch.Tensor) -> None:
    """Make ``view`` the storage of ``param`` (of its local shard, for a DTensor)."""
    if is_dtensor(param):
        local = view.view(param._local_tensor.shape)
        if local.dtype != param.dtype:   # param_dtype: the DTensor's own dtype must say so too
            new = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                     shape=param.shape, stride=param.stride())
            param.data = new
            param._spec = new._spec
        param._local_tensor = local
    else:
        param.data = view.view(param.shape)


def tp_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group the TP-sharded parameters are split over (None without any)."""
    meshes = {id(p.device_mesh): p.device_mesh for p in params if tp_sharded(p)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("tensor-parallel parameters live on different device meshes; ZeroAdamW "
                         "supports one tensor-parallel mesh")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(f"tensor-parallel parameters must live on a 1-D mesh, got {mesh.ndim}-D "
                         "(pass the TP sub-mesh, e.g. mesh['tp'], to parallelize_module)")
    return mesh.get_group()
