"""Export a zero-adam checkpoint as one file of full FP32 weights (and a plain AdamW state dict).

    python -m zero_adam.consolidate CKPT OUT.safetensors [--optimizer OUT_OPTIM.pt] [--dtype bfloat16]

The weights load with ``model.load_state_dict(safetensors.torch.load_file(OUT))``. With
``--optimizer``, the moments and step go into a ``torch.optim.AdamW`` state dict, so a user can
leave zero-adam without losing optimizer state (build AdamW with ``adamw_param_groups``). Both are
streamed one tensor at a time: peak memory is about the largest tensor, not the model. Needs no
GPU and no process group; existing outputs are never overwritten unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from .ckpt_format import (
    CheckpointError,
    check_files,
    parse_shard_key,
    quiet_single_process,
    read_meta,
    to_dtype,
)
from .stream_io import fake, write_safetensors, write_torch


class Checkpoint:
    """Read-only, one-tensor-at-a-time access to a checkpoint from a single process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        problems = check_files(self.path, self.meta)
        if problems:
            raise CheckpointError(f"{self.path} is damaged: " + "; ".join(problems))
        self.saved = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        self.pieces: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        for key in self.saved:
            parsed = parse_shard_key(key)
            if parsed:
                kind, name, lo, hi = parsed
                self.pieces.setdefault((kind, name), []).append((lo, hi, key))

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of trainable parameter ``name`` (its TP-joined shape, for a TP shard)."""
        info = self.meta["params"][name]
        shape = list(info["shape"])
        if "tp_dim" in info:
            shape[info["tp_dim"]] *= int(self.meta["tp_size"])
        return tuple(shape)

    def has(self, kind: str, name: str) -> bool:
        if "tp_dim" in self.meta["params"][name]:
            name = f"{name}@tp0"
        return (kind, name) in self.pieces

    def tensor(self, kind: str, name: str) -> torch.Tensor:
        """The full tensor of ``kind`` ("param", "exp_avg", ...) for parameter ``name``; the
        pieces of a tensor-parallel parameter are joined along its split dimension."""
        info = self.meta["params"][name]
        if "tp_dim" not in info:
            return self._flat(kind, name, tuple(info["shape"]))
        parts = [self._flat(kind, f"{name}@tp{r}", tuple(info["shape"]))
                 for r in range(int(self.meta["tp_size"]))]
        return torch.cat(parts, dim=info["tp_dim"])

    def _flat(self, kind: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        pieces = sorted(self.pieces.get((kind, name), []))
        if not pieces:
            raise CheckpointError(f"{self.path} has no {kind} for {name}")
        flat = torch.empty(_numel(shape), dtype=self.saved[pieces[0][2]].properties.dtype)
        covered = 0
        for lo, hi, _ in pieces:
            if lo != covered:
                raise CheckpointError(f"{name} {kind}: elements {covered}-{lo} are missing")
            covered = hi
        if covered != flat.numel():
            raise CheckpointError(f"{name} {kind}: elements {covered}-{flat.numel()} are missing")
        with quiet_single_process():
            dcp.load({key: flat[lo:hi] for lo, hi, key in pieces},
                     storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return flat.view(shape)

    def full(self, name: str) -> torch.Tensor:
        info = self.meta["full"][name]
        out = torch.empty(tuple(info["shape"]), dtype=to_dtype(info["dtype"]))
        with quiet_single_process():
            dcp.load({f"full/{name}": out}, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return out

    def step(self, name: str | None = None) -> float:
        """The AdamW step count (of parameter ``name``, which may differ: ``param_steps``)."""
        return float(self.meta.get("param_steps", {}).get(name, self.meta["step"]))


def export_weights(ckpt: Checkpoint, out: Path, dtype: torch.dtype | None = None) -> int:
    """Write every entry of the model's state dict; trainable params from their FP32 masters."""
    entries, params = [], ckpt.meta["params"]
    aliases = ckpt.meta.get("aliases", {})
    masters = {}
    for (kind, key), found in ckpt.pieces.items():
        if kind == "param":
            masters[key.partition("@tp")[0]] = ckpt.saved[found[0][2]].properties.dtype
    for name in params:
        entries.append((name, ckpt.shape(name), dtype or masters[name]))
    for alias, name in aliases.items():  # tied weights: every name the model's state_dict has
        entries.append((alias, ckpt.shape(name), dtype or masters[name]))
    for name, info in ckpt.meta["full"].items():
        entries.append((name, tuple(info["shape"]), to_dtype(info["dtype"])))

    def produce(name: str) -> torch.Tensor:
        name = aliases.get(name, name)
        t = ckpt.tensor("param", name) if name in params else ckpt.full(name)
        return t.to(dtype) if dtype is not None and name in params else t

    write_safetensors(out, entries, produce, metadata={"format": "pt", "source": "zero-adam"})
    return len(entries)


def export_adamw(ckpt: Checkpoint, out: Path) -> int:
    """A ``torch.optim.AdamW`` state dict: params indexed in param-group order, as AdamW does."""
    groups, state, order, where = [], {}, [], {}
    index = 0
    for g in ckpt.meta["param_groups"]:
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in g["hyper"].items()}
        ids = list(range(index, index + len(g["params"])))
        groups.append({**hyper, "params": ids, "param_names": list(g["params"])})
        for i, name in zip(ids, g["params"]):
            shape = ckpt.shape(name)
            entry = {"step": fake((), torch.float32)}
            for kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if ckpt.has(kind, name):
                    entry[kind] = fake(shape, torch.float32)
            state[i] = entry
            for kind in entry:
                order.append((i, kind))
                where[(i, kind)] = name
        index += len(g["params"])

    def produce(path: tuple[Any, ...]) -> torch.Tensor:
        i, kind = path
        if kind == "step":
            return torch.tensor(ckpt.step(where[path]), dtype=torch.float32)
        return ckpt.tensor(kind, where[path]).float()

    write_torch(out, {"state": state, "param_groups": groups}, order, produce)
    return len(state)


def adamw_param_groups(model: nn.Module, adamw_state: dict[str, Any]) -> list[dict[str, Any]]:
    """Param groups for ``torch.optim.AdamW`` matching an exported state dict (by parameter name)."""
    named = dict(model.named_parameters())
    missing = [n for g in adamw_state["param_groups"] for n in g["param_names"] if n not in named]
    if missing:
        raise ValueError(f"the model has no parameters named {missing[:5]}")
    return [{**{k: v for k, v in g.items() if k not in ("params", "param_names")},
             "params": [named[n] for n in g["param_names"]]} for g in adamw_state["param_groups"]]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zero_adam.consolidate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory written by zero_adam.checkpoint.save")
    p.add_argument("out", help="output .safetensors file of full weights")
    p.add_argument("--optimizer", metavar="OUT.pt", help="also write a torch.optim.AdamW state dict")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast trainable weights (default: the FP32 master's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    dtype = to_dtype(args.dtype) if args.dtype else None
    jobs = [(Path(args.out), lambda t: export_weights(ckpt, t, dtype))]
    if args.optimizer:
        jobs.append((Path(args.optimizer), lambda t: export_adamw(ckpt, t)))
    try:
        for out, _ in jobs:
            if out.exists() and not args.overwrite:
                raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
            if not out.parent.is_dir():
                raise CheckpointError(f"output directory {out.parent} does not exist")
        ckpt = Checkpoint(args.checkpoint)
        for out, write in jobs:
            tmp = out.with_name(out.name + ".partial")
            try:
                n = write(tmp)
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
            print(f"wrote {out} ({n} tensors, {out.stat().st_size:,} bytes)")
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
