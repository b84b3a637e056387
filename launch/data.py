"""Training data: a corpus of token ids, split into train/validation, and deterministic batches.

The default corpus needs no download: the running interpreter's own standard-library sources,
read as bytes (a byte-level language model, vocabulary 256). A text file works the same way; a
binary file of token ids (``uint16``/``uint32``, as nanoGPT writes them) is memory-mapped.

Batches are a pure function of (seed, step): the *global* batch of a step is the same whatever the
world size, and rank r of N reads rows ``[r*b, (r+1)*b)`` of each micro-batch. That is what makes
runs on different world sizes comparable and a resumed run continue exactly.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launch.config import DataConfig


class DataError(Exception):
    """A data source that cannot be used, with what to do about it."""


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    description: str


def load_corpus(cfg: DataConfig, seq_len: int, vocab_size: int) -> Corpus:
    if cfg.source == "stdlib":
        tokens, what = _stdlib_bytes(cfg.max_bytes), "standard-library sources"
    elif cfg.source == "text":
        tokens, what = _text_bytes(Path(cfg.path)), f"text file {cfg.path}"
    else:
        tokens, what = _token_file(Path(cfg.path), cfg.token_dtype), f"token file {cfg.path}"
    n_val = max(seq_len + 1, int(len(tokens) * cfg.val_fraction))
    if len(tokens) < 2 * (seq_len + 1) or len(tokens) - n_val < seq_len + 1:
        raise DataError(f"{what} holds {len(tokens):,} tokens: too short for train.seq_len={seq_len} "
                        f"with a validation split of {cfg.val_fraction}; use a larger file or a "
                        "shorter train.seq_len")
    if cfg.source == "tokens":
        top = int(tokens[: min(len(tokens), 1 << 24)].max())
        if top >= vocab_size:
            raise DataError(f"{what} holds token id {top}, but model.vocab_size={vocab_size}; "
                            "raise model.vocab_size or check data.token_dtype")
    split = len(tokens) - n_val
    return Corpus(tokens[:split], tokens[split:],
                  f"{what}: {split:,} train / {n_val:,} validation tokens")


def _stdlib_bytes(max_bytes: int) -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts:
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise DataError(f"found no Python sources under {root}; set data.source=text and data.path")
    return np.frombuffer(b"\n".join(chunks)[:max_bytes], dtype=np.uint8)


def _text_bytes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file")
    data = path.read_bytes()
    if not data:
        raise DataError(f"data.path={path}: the file is empty")
    return np.frombuffer(data, dtype=np.uint8)


def _token_file(path: Path, dtype: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data.path={path}: the file is empty")
    if size % itemsize:
        raise DataError(f"data.path={path}: {size} bytes is not a whole number of {dtype} tokens; "
                        "check data.token_dtype")
    return np.memmap(path, dtype=dtype, mode="r")


def rows_of(micro: int, rank: int, rows: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a step's global batch that ``rank`` trains on in micro-step ``micro``."""
    lo = (micro * world_size + rank) * rows
    return lo, lo + rows


def batch(tokens: np.ndarray, *, seed: int, step: int, global_batch: int, lo: int, hi: int,
          seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[lo, hi)`` of step ``step``'s global batch, as (inputs, targets) of int64 token ids.

    The global batch is ``global_batch`` windows whose starts are drawn from a generator seeded by
    (seed, step) alone, so it does not depend on the world size or on how it is split.
    """
    gen = np.random.default_rng([seed, step])
    starts = gen.integers(0, len(tokens) - seq_len - 1, size=global_batch)[lo:hi]
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]
