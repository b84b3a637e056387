"""Sharded, world-size independent, crash-safe checkpoints of a model and its ``ZeroAdamW``.

``save`` has every rank write only its own pieces, in parallel, through
``torch.distributed.checkpoint``, into ``<path>.partial``; rank 0 then writes ``zero_adam.json``
(sizes and CRC-32 of every file) and renames the directory into place. A process killed mid-save
leaves the previous checkpoint untouched. ``load`` verifies the files (each rank hashes a share),
checks the model against the saved names and shapes, reads only the pieces overlapping this rank's
shards, and restores parameters, FP32 masters, moments, step and hyperparameters. The format is
described in :mod:`zero_adam.ckpt_format`.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from . import ckpt_layout, update
from .ckpt_format import (
    FORMAT,
    CheckpointError,
    check_files,
    dtype_name,
    file_digest,
    is_complete,
    join_extra,
    quiet_single_process,
    read_meta,
    split_extra,
    write_meta,
)
from .optimizer import ZeroAdamW

__all__ = ["save", "load", "latest", "is_complete", "CheckpointError"]


def save(path: str | os.PathLike, model: nn.Module, optimizer: ZeroAdamW, extra: Any = None) -> Path:
    """Write a checkpoint of ``model`` and ``optimizer`` (call on every rank, after ``step()``)."""
    path, comm = Path(path), ckpt_layout.span_comm(optimizer)
    optimizer.wait_params()
    names = _names(model, optimizer)
    tree, extra_tensors = split_extra(extra if extra is not None else {})
    state = _local_state(model, optimizer, names)
    state.update({"optim/step": optimizer.buckets[0].step, **extra_tensors})
    tmp = path.parent / f"{path.name}.partial"
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    with quiet_single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
                 process_group=comm.group, no_dist=comm.group is None)
    files = sorted(f.name for f in tmp.iterdir())
    mine = {f: file_digest(tmp / f) for i, f in enumerate(files) if i % comm.world_size == comm.rank}
    digests = {k: v for part in comm.gather_objects(mine) for k, v in part.items()}
    if comm.rank == 0:
        write_meta(tmp, _meta(model, optimizer, names, tree, digests))
        _publish(tmp, path)
    comm.barrier()
    return path


def load(path: str | os.PathLike, model: nn.Module, optimizer: ZeroAdamW) -> Any:
    """Restore a checkpoint saved on any world size and stage; return the saved ``extra``."""
    path, comm = Path(path), ckpt_layout.span_comm(optimizer)
    meta = read_meta(path)
    files = sorted(meta["files"])
    share = [f for i, f in enumerate(files) if i % comm.world_size == comm.rank]
    problems = [p for part in comm.gather_objects(check_files(path, meta, share)) for p in part]
    if problems:
        raise CheckpointError(f"{path} is damaged: " + "; ".join(problems) +
                              ". Load an earlier checkpoint (zero_adam.checkpoint.latest skips it)")
    names = _names(model, optimizer)
    ckpt_layout.check_tp(meta, optimizer, names)
    _check_compatible(meta, model, optimizer, names)
    reader = dcp.FileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    # loaded into (in place for persistent masters, a temporary for remainder ones), then written back
    masters = [fb.master if fb.master is not None else fb.read_master() for fb in optimizer.buckets]
    request, copies = ckpt_layout.plan_reads(optimizer, names, saved, masters)
    full = _full_entries(model, optimizer)
    for name, t in full.items():
        request[f"full/{name}"] = torch.empty_like(t)
    request["optim/step"] = torch.empty((), dtype=torch.float32)
    for key, md in saved.items():
        if key.startswith("extra/"):
            request[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    with quiet_single_process():
        dcp.load(request, storage_reader=reader, process_group=comm.group, no_dist=comm.group is None)
    with torch.no_grad():
        for key, lo, hi, dst in copies:
            dst.copy_(request[key][lo:hi])
        for name, t in full.items():
            t.copy_(request[f"full/{name}"])
        step, per_param = float(request["optim/step"]), meta.get("param_steps", {})
        for fb, m in zip(optimizer.buckets, masters):
            update.set_param_steps(fb, [per_param.get(names[s.param], step) for s in fb.bucket.slots])
            fb.write_master(m)
    _restore_groups(meta, optimizer, names)
    optimizer.load_scaler_state(meta.get("scaler"))
    optimizer.reload_params()
    return join_extra(meta["extra"], {k: v for k, v in request.items() if k.startswith("extra/")})


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directly under ``directory`` (by the number in its name)."""
    root = Path(directory)
    if not root.is_dir():
        return None
    candidates = []
    for d in root.iterdir():
        m = re.search(r"(\d+)$", d.name)
        if d.is_dir() and m and is_complete(d):
            candidates.append((int(m.group(1)), d))
    return max(candidates)[1] if candidates else None


# -- helpers -----------------------------------------------------------------------------------
def _names(model: nn.Module, optimizer: ZeroAdamW) -> list[str]:
    """The model's name for each parameter of the optimizer's plan (by identity)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [""] * len(optimizer.plan.params)
    for fb in optimizer.buckets:
        for slot, p in zip(fb.bucket.slots, fb.params):
            if id(p) not in by_id:
                raise CheckpointError(f"optimizer parameter {optimizer.plan.params[slot.param].key} "
                                      "is not a parameter of the model passed in; pass the model "
                                      "whose parameters the optimizer was built from")
            names[slot.param] = by_id[id(p)]
    return names


def _local_state(model: nn.Module, optimizer: ZeroAdamW, names: list[str]) -> dict[str, torch.Tensor]:
    out = ckpt_layout.local_pieces(optimizer, names)
    for name, t in _full_entries(model, optimizer).items():
        out[f"full/{name}"] = t.detach()
    return out


def _full_entries(model: nn.Module, optimizer: ZeroAdamW) -> dict[str, torch.Tensor]:
    """Everything in ``model.state_dict()`` the optimizer does not shard: frozen params, buffers."""
    ours = {id(p) for fb in optimizer.buckets for p in fb.params}
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if id(t) not in ours}


def _meta(model: nn.Module, optimizer: ZeroAdamW, names: list[str], tree: Any,
          digests: dict[str, dict[str, int]]) -> dict[str, Any]:
    specs = optimizer.plan.params
    groups = []
    for gi, g in enumerate(optimizer.param_groups):
        hyper = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items()
                 if k not in ("params", "param_names")}
        members = [names[i] for i, s in enumerate(specs) if s.group == gi]
        groups.append({"hyper": hyper, "params": members})
    full = _full_entries(model, optimizer)
    dims = ckpt_layout.tp_dims(optimizer, names)
    return {
        "format": FORMAT, "world_size": optimizer.comm.world_size, "stage": optimizer.options.stage,
        "step": float(optimizer.buckets[0].step),
        # parameters whose AdamW step differs (frozen for a while, or added by add_param_group)
        "param_steps": {names[s.param]: st for fb in optimizer.buckets
                        for s, st in zip(fb.bucket.slots, update.param_steps(fb))
                        if st != float(optimizer.buckets[0].step)},
        "params": {names[i]: {"shape": list(s.shape), "dtype": dtype_name(s.dtype),
                              **({"tp_dim": dims[names[i]]} if names[i] in dims else {})}
                   for i, s in enumerate(specs)},
        # a TP-sharded parameter's "shape" is one TP rank's; its full shape has tp_size x at tp_dim
        **({"tp_size": optimizer._tp.world_size} if dims else {}),
        # other names of a trained tensor (tied weights): the export writes it under each
        "aliases": _aliases(model, optimizer, names),
        "full": {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in full.items()},
        "param_groups": groups, "extra": tree, "files": digests, "scaler": optimizer.scaler_state(),
    }


def _aliases(model: nn.Module, optimizer: ZeroAdamW, names: list[str]) -> dict[str, str]:
    """{other state-dict name: the name it is saved under} for tensors the model registers twice."""
    by_id = {id(p): names[s.param] for fb in optimizer.buckets for s, p in zip(fb.bucket.slots, fb.params)}
    return {n: by_id[id(t)] for n, t in model.state_dict(keep_vars=True).items()
            if id(t) in by_id and by_id[id(t)] != n}


def _publish(tmp: Path, path: Path) -> None:
    """Atomically move a finished save into place (keeping the old one until the new one is there)."""
    old = path.parent / f"{path.name}.old"
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_compatible(meta: dict[str, Any], model: nn.Module, optimizer: ZeroAdamW,
                      names: list[str]) -> None:
    ours = {n: list(s.shape) for n, s in zip(names, optimizer.plan.params)}
    ours_full = {n: list(t.shape) for n, t in _full_entries(model, optimizer).items()}
    problems = []
    pairs = (("trainable", ours, meta["params"]), ("frozen/buffer", ours_full, meta["full"]))
    for label, mine, theirs in pairs:
        missing = sorted(set(mine) - set(theirs))
        unexpected = sorted(set(theirs) - set(mine))
        shapes = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n]["shape"])
        if missing:
            problems.append(f"{label} entries missing from the checkpoint: {missing[:8]}")
        if unexpected:
            problems.append(f"unexpected {label} entries in the checkpoint: {unexpected[:8]}")
        for n in shapes[:8]:
            problems.append(f"{n}: shape {theirs[n]['shape']} in the checkpoint, {mine[n]} in the model")
    if problems:
        raise CheckpointError("the checkpoint does not match this model (or which parameters are "
                              "trainable):\n  " + "\n  ".join(problems))


def _restore_groups(meta: dict[str, Any], optimizer: ZeroAdamW, names: list[str]) -> None:
    saved = meta["param_groups"]
    current = [[names[i] for i, s in enumerate(optimizer.plan.params) if s.group == gi]
               for gi in range(len(optimizer.param_groups))]
    if [g["params"] for g in saved] != current:
        warnings.warn("the checkpoint's param groups hold different parameters than this "
                      "optimizer's; keeping the current hyperparameters (lr, weight decay, ...)",
                      stacklevel=3)
        return
    for group, g in zip(optimizer.param_groups, saved):
        for k, v in g["hyper"].items():
            group[k] = tuple(v) if k == "betas" else v
