"""Data: deterministic, world-size independent batches; every source; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.config import DataConfig
from launch.data import DataError, batch, load_corpus, rows_of


def test_stdlib_corpus_needs_no_download():
    c = load_corpus(DataConfig(max_bytes=200_000), seq_len=64, vocab_size=256)
    assert len(c.train) + len(c.val) == 200_000 and len(c.val) == 10_000
    assert c.train.dtype == np.uint8


def test_global_batch_is_split_disjointly_and_independent_of_world_size():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(seed=3, step=5, seq_len=16)
    whole, _ = batch(tokens, global_batch=12, lo=0, hi=12, **kw)
    for world, rows in ((1, 12), (2, 6), (3, 2), (4, 3)):
        n_micro = 12 // (rows * world)
        parts = {}
        for micro in range(n_micro):
            for rank in range(world):
                lo, hi = rows_of(micro, rank, rows, world)
                parts[lo] = batch(tokens, global_batch=12, lo=lo, hi=hi, **kw)[0]
        assert torch.equal(torch.cat([parts[k] for k in sorted(parts)]), whole), world
    x, y = batch(tokens, global_batch=12, lo=0, hi=12, **kw)
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are inputs shifted by one"
    again, _ = batch(tokens, global_batch=12, lo=0, hi=12, **kw)
    assert torch.equal(again, whole)
    other, _ = batch(tokens, global_batch=12, lo=0, hi=12, seed=3, step=6, seq_len=16)
    assert not torch.equal(other, whole)


def test_text_and_token_files(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"hello world, " * 500)
    c = load_corpus(DataConfig(source="text", path=str(text)), seq_len=32, vocab_size=256)
    assert bytes(c.train[:5]) == b"hello"
    toks = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint32).tofile(toks)
    c = load_corpus(DataConfig(source="tokens", path=str(toks), token_dtype="uint32"), seq_len=32,
                    vocab_size=8000)
    assert isinstance(c.train, np.memmap) and int(c.train[-1]) == len(c.train) - 1


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"short text"), "too short for train.seq_len=32"),
])
def test_bad_text_files(tmp_path, setup, match):
    path = tmp_path / "data.txt"
    setup(path)
    with pytest.raises(DataError, match=match):
        load_corpus(DataConfig(source="text", path=str(path)), seq_len=32, vocab_size=256)


def test_bad_token_files(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a whole number of uint16"):
        load_corpus(DataConfig(source="tokens", path=str(path)), seq_len=4, vocab_size=300)
    np.full(1000, 999, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match="token id 999, but model.vocab_size=300"):
        load_corpus(DataConfig(source="tokens", path=str(path)), seq_len=4, vocab_size=300)
