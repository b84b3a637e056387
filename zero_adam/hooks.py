"""Gradient synchronisation: per-parameter hooks, bucket states, ``no_sync`` and in-order launches.

A post-accumulate-grad hook on each parameter moves its gradient into its bucket's buffer and frees
``param.grad``. When a bucket has all of its gradients for this backward, its reduction is launched
asynchronously, *in plan order*: collectives on one process group must be issued in the same order
on every rank, and a parameter that gets no gradient on one rank must not reorder (or hang) them.
So a bucket waits for its predecessors, and an end-of-backward callback launches whatever is left,
with zeros for parameters that got no gradient (what DDP's and Megatron's users see; plain AdamW
would skip such a parameter instead).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence

import torch

from .comm import Comm, Pending
from .dtensor import local_grad
from .flat import FlatBucket


class BucketState(enum.Enum):
    IDLE = "idle"            # no gradient in the current local window
    FILLING = "filling"      # gradients are being accumulated into the full buffer
    REDUCING = "reducing"    # the reduction is in flight
    REDUCED = "reduced"      # the reduced shard has been taken into the FP32 gradient shard


_ALLOWED = {
    BucketState.IDLE: {BucketState.FILLING, BucketState.REDUCING},
    BucketState.FILLING: {BucketState.REDUCING},
    BucketState.REDUCING: {BucketState.REDUCED},
    BucketState.REDUCED: {BucketState.IDLE},
}


class _Track:
    """Bookkeeping of one bucket between two optimizer steps."""

    def __init__(self, n_slots: int) -> None:
        self.state = BucketState.IDLE
        self.written = [False] * n_slots     # slot has a gradient in the current local window
        self.arrived = 0                     # gradients that arrived in the current backward
        self.pending: Pending | None = None
        self.launched_in = -1                # the round (backward) that launched its reduction
        self.reduced_once = False            # the FP32 grad shard holds a reduction this step

    def to(self, new: BucketState) -> None:
        if new not in _ALLOWED[self.state]:
            raise AssertionError(f"bucket state {self.state.value} -> {new.value} is not allowed")
        self.state = new


class GradSync:
    """Owns the gradient path from ``param.grad`` to each bucket's FP32 gradient shard."""

    def __init__(self, buckets: Sequence[FlatBucket], comm: Comm, *, accumulate: str,
                 release_full: bool, max_inflight: int | None = None,
                 on_grad: Callable[[int, int], None] | None = None) -> None:
        self.buckets = list(buckets)
        self.comm = comm
        self.accumulate = accumulate
        self.release_full = release_full
        self.max_inflight = max_inflight     # stage 2: finish older reductions to bound memory
        self.on_grad = on_grad
        self.touched: set[int] = set()      # buckets that received a gradient since reset()
        self._inflight: list[int] = []
        self.tracks = [_Track(len(b.bucket.slots)) for b in self.buckets]
        self._next = 0                # next bucket to launch in the current round
        self._round = 0               # one round of reductions per backward (or per step)
        self._no_sync_depth = 0
        self._in_backward = False
        self._handles = []
        for bi, fb in enumerate(self.buckets):
            for si, p in enumerate(fb.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(bi, si)))

    # -- public --------------------------------------------------------------------------------
    @property
    def in_no_sync(self) -> bool:
        return self._no_sync_depth > 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1

    def finish(self) -> None:
        """Reduce everything not yet reduced (zeros where no gradient came) and wait for it all."""
        self._launch_rest()
        for bi in range(len(self.buckets)):
            if self.tracks[bi].state is BucketState.REDUCING:
                self._settle(bi)

    def reset(self) -> None:
        """Start a new step: forget all gradients (waiting for any collective still in flight)."""
        for bi, t in enumerate(self.tracks):
            if t.pending is not None:
                t.pending.wait()
                t.pending = None
            if self.release_full:
                self.buckets[bi].release_full_grad()
            t.state, t.written, t.arrived, t.reduced_once = (
                BucketState.IDLE, [False] * len(t.written), 0, False)
            t.launched_in = -1
        self.touched.clear()
        self._inflight.clear()
        self._round += 1
        self._next = 0
        self._in_backward = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ---------------------------------------------------------------------------------
    def _hook(self, bi: int, si: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._on_grad(bi, si, param)
        return hook

    def _on_grad(self, bi: int, si: int, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        grad = local_grad(param, grad)
        if grad.layout != torch.strided:
            raise ValueError(f"{self.buckets[bi].bucket.slots[si]} received a sparse gradient; "
                             "ZeroAdamW needs dense gradients (use nn.Embedding(sparse=False))")
        if self.on_grad is not None:
            self.on_grad(bi, si)
        if not self._in_backward:
            self._begin_backward()
        self.touched.add(bi)
        t = self.tracks[bi]
        if t.state in (BucketState.REDUCING, BucketState.REDUCED):
            self._open_window(bi)
        self.buckets[bi].put_grad(si, grad, first=not t.written[si])
        param.grad = None
        t.written[si] = True
        t.arrived += 1
        if t.state is BucketState.IDLE:
            t.to(BucketState.FILLING)
        if self._launching():
            while self._next < len(self.buckets) and self._complete(self._next):
                self._launch(self._next)
                self._next += 1

    def _begin_backward(self) -> None:
        self._in_backward = True
        self._round += 1
        self._next = 0
        for t in self.tracks:
            t.arrived = 0
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self._in_backward = False
        if self._launching():
            self._launch_rest()

    # -- internals -----------------------------------------------------------------------------
    def _launching(self) -> bool:
        """Reduce during this backward? Always in 'shard' mode; outside no_sync in 'local' mode."""
        return self.accumulate == "shard" or not self.in_no_sync

    def _complete(self, bi: int) -> bool:
        t = self.tracks[bi]
        return t.state is BucketState.FILLING and t.arrived == len(t.written)

    def _launch_rest(self) -> None:
        while self._next < len(self.buckets):
            if self.tracks[self._next].launched_in != self._round:
                self._launch(self._next)
            self._next += 1

    def _launch(self, bi: int) -> None:
        t, fb = self.tracks[bi], self.buckets[bi]
        if t.state in (BucketState.REDUCING, BucketState.REDUCED):
            self._open_window(bi)
        missing = [i for i, w in enumerate(t.written) if not w]
        if missing:
            fb.zero_slots(missing)
        t.to(BucketState.REDUCING)
        t.launched_in = self._round
        t.pending = self.comm.reduce_mean(fb.full_grad_buffer(), fb.lo, fb.hi,
                                          what=f"gradient reduction of bucket {bi}")
        self._inflight.append(bi)
        while self.max_inflight is not None and len(self._inflight) > self.max_inflight:
            oldest = self._inflight[0]
            if self.tracks[oldest].state is BucketState.REDUCING:
                self._settle(oldest)
            else:
                self._inflight.pop(0)

    def _settle(self, bi: int) -> None:
        t, fb = self.tracks[bi], self.buckets[bi]
        assert t.pending is not None
        t.pending.wait()
        t.pending = None
        if bi in self._inflight:
            self._inflight.remove(bi)
        fb.take_reduced(first=not t.reduced_once)
        t.reduced_once = True
        if self.release_full:
            fb.release_full_grad()
        t.to(BucketState.REDUCED)

    def _open_window(self, bi: int) -> None:
        """A reduced bucket receives more gradient before step(): start a new local window."""
        t, fb = self.tracks[bi], self.buckets[bi]
        if fb.grad_shard_aliases_full:
            raise RuntimeError(
                "a second backward reached a bucket that was already reduced this step. Stage 1 "
                "reduces its gradient buffer once per step: wrap every backward except the last "
                "in `with opt.no_sync():`, or call opt.step() before the next backward")
        if t.state is BucketState.REDUCING:
            self._settle(bi)
        t.to(BucketState.IDLE)
        t.written = [False] * len(t.written)
