"""Write a safetensors file or a ``torch.save`` file one tensor at a time.

Consolidating a 70B checkpoint must not need the whole model in RAM. Both writers lay out the file
first from shapes and dtypes alone, then fill each tensor's bytes as it is produced, so peak memory
is one tensor. The safetensors layout is the published format (8-byte header length, JSON header,
raw little-endian data); the torch one is produced by ``torch.save`` itself under
``torch.serialization.skip_data`` and then filled in place.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

Entry = tuple[str, tuple[int, ...], torch.dtype]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, entries: Iterable[Entry], produce: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` (name, shape, dtype) to ``path``, calling ``produce(name)`` one at a time."""
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, announced {shape} {dtype}")
            f.write(_raw(t))
            del t
        f.flush()
        os.fsync(f.fileno())


def write_torch(path: Path, skeleton: Any, order: list[tuple[Any, ...]],
                produce: Callable[[tuple[Any, ...]], torch.Tensor]) -> None:
    """``torch.save`` a nested structure whose tensors are filled one at a time.

    ``skeleton`` holds fake tensors (no memory) of the right shapes and dtypes; ``order`` lists the
    path of every tensor in the order ``pickle`` meets them (dict insertion order), which is the
    order of the storage records ``torch.save`` writes. Each record is then filled with
    ``produce(path)``, its size checked against the tensor's.
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # records are filled after the zip is written
    try:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, path)
    finally:
        torch.serialization.set_crc32_options(previous)
    with zipfile.ZipFile(path) as z, open(path, "r+b") as f:
        prefix = z.namelist()[0].split("/")[0]
        for i, where in enumerate(order):
            info = z.getinfo(f"{prefix}/data/{i}")
            t = produce(where)
            if info.file_size != t.numel() * t.element_size():
                raise RuntimeError(f"storage {i} holds {info.file_size} bytes, tensor {where} has "
                                   f"{t.numel() * t.element_size()}: unexpected torch.save layout")
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            f.write(_raw(t))
        f.flush()
        os.fsync(f.fileno())


def fake(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor with shape and dtype but no storage (for ``write_torch``'s skeleton)."""
    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype)
