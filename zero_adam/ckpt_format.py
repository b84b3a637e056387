"""On-disk format of a zero-adam checkpoint (no ``torch.distributed`` here).

A checkpoint is a directory written by ``torch.distributed.checkpoint`` plus ``zero_adam.json``:

* every tensor is a plain DCP entry. A rank's piece of a trainable parameter's state is keyed
  ``shard/<kind>/<lo>-<hi>/<name>``: elements ``[lo, hi)`` of the flattened parameter, for kind
  ``param`` (the FP32 master: the authoritative weight), ``exp_avg``, ``exp_avg_sq`` and
  ``max_exp_avg_sq``. Any world size reads the pieces overlapping its own ranges, so a checkpoint
  saved by N ranks loads on M ranks (and across stages) with no converter.
* frozen parameters and buffers are ``full/<name>``; the step count ``optim/step``; tensors in the
  user's ``extra`` are ``extra/<path>``.
* ``zero_adam.json`` holds everything else, as JSON (nothing is unpickled on load): names, shapes,
  dtypes, param-group hyperparameters, the user's ``extra``, and the size and CRC-32 of every data
  file. It is written last: a directory without it is an incomplete save.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FORMAT = "zero-adam/1"
META = "zero_adam.json"
KINDS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class CheckpointError(Exception):
    """A checkpoint that cannot be saved or loaded, with what to do about it."""


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process call even with ``no_dist=True``; that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def shard_key(kind: str, name: str, lo: int, hi: int) -> str:
    return f"shard/{kind}/{lo}-{hi}/{name}"


def parse_shard_key(key: str) -> tuple[str, str, int, int] | None:
    """(kind, name, lo, hi) of a ``shard/`` key, else None."""
    parts = key.split("/", 3)
    if len(parts) != 4 or parts[0] != "shard":
        return None
    lo, _, hi = parts[2].partition("-")
    return parts[1], parts[3], int(lo), int(hi)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint metadata")
    return dtype


# -- user "extra": JSON plus tensors -------------------------------------------------------------
def split_extra(extra: Any, path: str = "extra") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in ``extra`` by a reference; refuse what JSON cannot hold faithfully."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[where] = x.detach()
            return {"__tensor__": where}
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, str)]
            if bad:
                raise CheckpointError(f"{where}: dict keys must be strings to be saved, got {bad[:3]}")
            return {k: walk(v, f"{where}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        raise CheckpointError(f"{where}: a {type(x).__name__} cannot be saved safely (only tensors, "
                              "numbers, strings, bools, None, lists and string-keyed dicts); "
                              "convert it first")

    return walk(extra, path), tensors


def join_extra(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__float__"}:
            return float(tree["__float__"])
        return {k: join_extra(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_extra(v, tensors) for v in tree]
    return tree


# -- metadata file and data-file integrity -------------------------------------------------------
def file_digest(path: Path) -> dict[str, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``zero_adam.json`` durably (it marks the checkpoint complete)."""
    target = directory / META
    with open(target, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"no checkpoint at {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory")
    if not (directory / META).is_file() or not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory} is incomplete (no {META} or .metadata): the save that "
                              "wrote it did not finish. Load an earlier checkpoint")
    try:
        meta = json.loads((directory / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / META} is corrupt ({e}); load an earlier checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a {FORMAT} checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else '?'})")
    return meta


def check_files(directory: Path, meta: dict[str, Any], names: list[str] | None = None,
                crc: bool = True) -> list[str]:
    """Problems with the data files (missing, truncated, corrupt); ``names`` limits which to hash."""
    problems = []
    for name, want in sorted(meta["files"].items()):
        if names is not None and name not in names:
            continue
        f = directory / name
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, expected {want['size']} (truncated?)")
        elif crc and file_digest(f)["crc32"] != want["crc32"]:
            problems.append(f"{name}: CRC-32 mismatch (corrupt)")
    return problems


def is_complete(directory: Path) -> bool:
    """Cheap check used to pick the newest usable checkpoint: metadata present, sizes right."""
    try:
        meta = read_meta(directory)
    except CheckpointError:
        return False
    return not check_files(Path(directory), meta, crc=False)
