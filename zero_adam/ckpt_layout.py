"""Which rank writes and reads which piece of a checkpoint, under data and tensor parallelism.

Data parallelism splits each bucket into N shards; a rank's piece of a parameter is keyed by its
element range, so any N reads any N'. Tensor parallelism adds a coordinate: a TP-sharded
parameter (a ``DTensor`` with a ``Shard`` placement) holds a different local tensor on each TP
rank, so its pieces are keyed ``<name>@tp<r>`` (elements of TP rank r's local tensor). TP-replicated
parameters (norm weights) keep the plain name: every TP rank writes the same bytes under the same
key and DCP stores them once. A checkpoint is therefore read back at any DP size with the same TP
degree; ``zero_adam.consolidate`` joins the TP pieces into full tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

from .ckpt_format import CheckpointError, parse_shard_key, shard_key
from .comm import Comm
from .dtensor import shard_dim


def tp_name(name: str, tp_rank: int) -> str:
    return f"{name}@tp{tp_rank}"


def span_comm(optimizer: Any) -> Comm:
    """The processes that save and load one checkpoint together: the DP group, times the TP group
    when parameters are tensor-parallel (every process of the DP x TP mesh)."""
    tp = optimizer._tp
    if tp is None or not tp.distributed:
        return optimizer.comm
    if dist.get_world_size() == optimizer.comm.world_size * tp.world_size:
        return Comm(dist.group.WORLD)
    mesh = getattr(optimizer, "mesh", None)
    if mesh is None:
        raise CheckpointError("this DP x TP job does not span every process; build ZeroAdamW with "
                              "mesh= (the DP x TP DeviceMesh) so that checkpoints know their ranks")
    return Comm(mesh._flatten().get_group())


def tp_info(optimizer: Any) -> tuple[int, int, dict[int, int]]:
    """(TP rank, TP size, {plan param index: the dimension split across TP ranks})."""
    tp = optimizer._tp
    dims = {s.param: shard_dim(p) for fb in optimizer.buckets for s, p in zip(fb.bucket.slots, fb.params)
            if optimizer.plan.params[s.param].tp_sharded}
    return (tp.rank, tp.world_size, dims) if tp is not None else (0, 1, dims)


def piece_names(optimizer: Any, names: list[str]) -> list[str]:
    """The name each parameter's pieces are keyed under on this rank."""
    tp_rank, _, dims = tp_info(optimizer)
    return [tp_name(n, tp_rank) if i in dims else n for i, n in enumerate(names)]


def views(fb: Any, master: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"param": master, "exp_avg": fb.exp_avg, "exp_avg_sq": fb.exp_avg_sq}
    if fb.max_exp_avg_sq is not None:
        out["max_exp_avg_sq"] = fb.max_exp_avg_sq
    return out


def local_pieces(optimizer: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """This rank's pieces of every trainable parameter's master and moments, by key."""
    out: dict[str, torch.Tensor] = {}
    comm, plan, keyed = optimizer.comm, optimizer.plan, piece_names(optimizer, names)
    for fb in optimizer.buckets:
        for pc in plan.pieces(fb.bucket, comm.rank, comm.world_size):
            n = pc.param_hi - pc.param_lo
            for kind, t in views(fb, fb.read_master()).items():
                key = shard_key(kind, keyed[pc.param], pc.param_lo, pc.param_hi)
                out[key] = t[pc.shard_lo:pc.shard_lo + n]
    return out


def plan_reads(optimizer: Any, names: list[str], saved: dict[str, Any], masters: list[torch.Tensor]):
    """Which saved pieces this rank reads, and where each overlap goes: (request, copies)."""
    pieces: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for key in saved:
        parsed = parse_shard_key(key)
        if parsed:
            kind, name, lo, hi = parsed
            pieces.setdefault((kind, name), []).append((lo, hi, key))
    request: dict[str, torch.Tensor] = {}
    copies = []
    comm, keyed = optimizer.comm, piece_names(optimizer, names)
    for fb, master in zip(optimizer.buckets, masters):
        for pc in optimizer.plan.pieces(fb.bucket, comm.rank, comm.world_size):
            for kind, dst in views(fb, master).items():
                got = 0
                for lo, hi, key in pieces.get((kind, keyed[pc.param]), []):
                    s, e = max(pc.param_lo, lo), min(pc.param_hi, hi)
                    if s >= e:
                        continue
                    if key not in request:
                        request[key] = torch.empty(hi - lo, dtype=saved[key].properties.dtype,
                                                   device=dst.device)
                    at = pc.shard_lo + s - pc.param_lo
                    copies.append((key, s - lo, e - lo, dst[at:at + e - s]))
                    got += e - s
                if got == pc.param_hi - pc.param_lo:
                    continue
                if kind == "max_exp_avg_sq":
                    warnings.warn("amsgrad is on but the checkpoint has no max_exp_avg_sq: starting "
                                  "it from zeros", stacklevel=4)
                    continue
                raise CheckpointError(f"the checkpoint lacks {kind} elements {pc.param_lo}-"
                                      f"{pc.param_hi} of {keyed[pc.param]}; it is damaged or "
                                      "from another model")
    return request, copies


def check_tp(meta: dict[str, Any], optimizer: Any, names: list[str]) -> None:
    """Refuse, before anything is read, a checkpoint saved with another tensor-parallel layout."""
    _, tp_size, dims = tp_info(optimizer)
    saved_tp = int(meta.get("tp_size", 1))
    if saved_tp != tp_size:
        raise CheckpointError(
            f"the checkpoint was saved with tensor parallelism {saved_tp} (x {meta['world_size']} "
            f"data-parallel), this job runs tensor parallelism {tp_size}. Resume at TP={saved_tp} "
            "(any data-parallel size works), or export full weights with `python -m "
            "zero_adam.consolidate CKPT OUT.safetensors` and start from those")
    differ = [n for i, n in enumerate(names) if n in meta["params"]
              and meta["params"][n].get("tp_dim") != dims.get(i)]
    if differ:
        raise CheckpointError(f"parameters split differently across TP ranks than when saved: "
                              f"{differ[:5]}; use the same tensor-parallel plan")


def tp_dims(optimizer: Any, names: list[str]) -> dict[str, int]:
    """{name: dimension split across TP ranks} for the TP-sharded parameters (``tp_dim`` in the
    checkpoint's parameter table; with ``tp_size`` it rebuilds the full shape)."""
    return {names[i]: d for i, d in tp_info(optimizer)[2].items()}
