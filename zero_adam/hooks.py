"""Gradient synchronisation: per-parameter hooks, bucket states, ``no_sync`` and in-order launches.

A post-accumulate-grad hook on each parameter adds its gradient into its bucket's buffer and frees
``param.grad``. Arrivals are counted *per slot and per backward pass* (a pass ends with its
outermost graph task, ``zero_adam.backward``): a weight used in several reentrant-checkpointed
segments delivers its gradient once per segment, and all of it must be summed before the bucket is
reduced. A bucket is launched early only when every slot has had as many arrivals as in the
previous passes, in plan order (every rank must issue the same collectives in the same order). The
first pass knows no counts: with one full gradient buffer per bucket anyway ('local' accumulation)
it launches everything at its end; stage 2's default ('shard') assumes one arrival per slot, so its
first backward never holds more than ``max_inflight`` full buffers, and a surprise becomes a late
window (below) once. Each pass reduces every bucket exactly once, with
zeros for parameters that got no gradient (DDP's and Megatron's rule).

A gradient that arrives after its bucket was launched in the same pass (a pattern that changed)
opens a new local *window*, reduced later and added to the shard: never lost, only more traffic.
``late_mask``/``flush`` let ``step()`` agree across ranks on which windows are still open.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from .backward import BackwardWatch
from .comm import Comm, Pending
from .dtensor import local_grad
from .flat import FlatBucket


class BucketState(enum.Enum):
    IDLE = "idle"            # no gradient in the current local window
    FILLING = "filling"      # gradients are being accumulated into the full buffer
    REDUCING = "reducing"    # the reduction is in flight
    REDUCED = "reduced"      # the reduced shard has been taken into the gradient shard


_ALLOWED = {
    BucketState.IDLE: {BucketState.FILLING, BucketState.REDUCING},
    BucketState.FILLING: {BucketState.REDUCING},
    BucketState.REDUCING: {BucketState.REDUCED},
    BucketState.REDUCED: {BucketState.IDLE},
}


class _Track:
    """Bookkeeping of one bucket between two optimizer steps."""

    def __init__(self, n_slots: int, assume_once: bool) -> None:
        self.state = BucketState.IDLE
        self.written = [False] * n_slots     # slot has a gradient in the current local window
        self.arrivals = [0] * n_slots        # gradients per slot in the current backward pass
        # arrivals per pass, learned from earlier passes (None: unknown, launch at the pass end)
        self.expected: list[int] | None = [1] * n_slots if assume_once else None
        self.missing = n_slots               # slots short of their expected arrivals this pass
        self.pending: Pending | None = None
        self.launched_in = -1                # the pass that launched its last reduction
        self.reduced_once = False            # the gradient shard holds a reduction this step
        self.direct = False                  # the reduction in flight writes the gradient shard itself

    def to(self, new: BucketState) -> None:
        if new not in _ALLOWED[self.state]:
            raise AssertionError(f"bucket state {self.state.value} -> {new.value} is not allowed")
        self.state = new

    def arrive(self, si: int) -> None:
        self.arrivals[si] += 1
        if self.expected is not None and self.arrivals[si] == self.expected[si]:
            self.missing -= 1

    def new_pass(self) -> None:
        self.arrivals = [0] * len(self.arrivals)
        self.missing = len(self.arrivals)

    def learn(self) -> None:
        seen = [max(1, a) for a in self.arrivals]
        self.expected = seen if self.expected is None else [max(a, b) for a, b in zip(self.expected, seen)]

    def complete(self) -> bool:
        """Every slot has had its usual number of arrivals in this pass."""
        return self.state is BucketState.FILLING and self.expected is not None and self.missing == 0


def _hook(sync_ref: weakref.ref, targets: list[tuple[int, int]]) -> Callable[[torch.Tensor], None]:
    """The hook holds the GradSync weakly: a dropped optimizer never keeps receiving gradients.
    ``targets``: the (bucket, slot) pairs of the parameter (several for one cut into chunks)."""
    def hook(param: torch.Tensor) -> None:
        sync = sync_ref()
        if sync is not None:
            sync._on_grad(targets, param)
    return hook


class GradSync:
    """Owns the gradient path from ``param.grad`` to each bucket's gradient shard."""

    def __init__(self, buckets: Sequence[FlatBucket], comm: Comm, *, accumulate: str,
                 release_full: bool, max_inflight: int | None = None,
                 on_grad: Callable[[int, int], None] | None = None) -> None:
        self.buckets: list[FlatBucket] = []
        self.tracks: list[_Track] = []
        self.comm = comm
        self.accumulate = accumulate
        self.release_full = release_full
        self.max_inflight = max_inflight     # stage 2: finish older reductions to bound memory
        self.on_grad = on_grad
        self.touched: set[int] = set()      # buckets that received a gradient since reset()
        self.handles: list = []             # hook handles (removed by close() / the finalizer)
        self._inflight: list[int] = []
        self._deferred: dict[int, tuple[int, torch.Tensor]] = {}   # chunk bucket -> (slot, gradient)
        self._next = 0                # next bucket to launch in the current pass
        self._pass = 0                # backward passes seen (one round of reductions each)
        self._no_sync_depth = 0
        self.watch = BackwardWatch(self._end_pass)
        self.add_buckets(buckets)

    def add_buckets(self, buckets: Sequence[FlatBucket]) -> None:
        """Hook the parameters of new buckets (``add_param_group``); they join from the next pass."""
        ref = weakref.ref(self)
        targets: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
        for fb in buckets:
            bi = len(self.buckets)
            self.buckets.append(fb)
            self.tracks.append(_Track(len(fb.bucket.slots), assume_once=self.accumulate == "shard"))
            for si, p in enumerate(fb.params):
                targets.setdefault(id(p), (p, []))[1].append((bi, si))
        for p, where in targets.values():
            self.handles.append(p.register_post_accumulate_grad_hook(_hook(ref, where)))

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
        """Close the running pass, reduce everything not yet reduced (zeros where no gradient
        came) and wait for it all. Late windows stay open: see ``late_mask``."""
        if self.watch.active:
            self.watch.close()
            self._end_pass()
        self._launch_rest()
        for bi in range(len(self.buckets)):
            if self.tracks[bi].state is BucketState.REDUCING:
                self._settle(bi)

    def late_mask(self) -> list[int]:
        """1 for each bucket holding gradient that no reduction has covered yet."""
        return [int(t.state is BucketState.FILLING) for t in self.tracks]

    def flush(self, mask: Sequence[float]) -> None:
        """Reduce the buckets that any rank reported in ``late_mask`` (summed), in plan order."""
        for bi, flag in enumerate(mask):
            if flag:
                self._launch(bi)
        for bi, flag in enumerate(mask):
            if flag and self.tracks[bi].state is BucketState.REDUCING:
                self._settle(bi)

    def reset(self) -> None:
        """Start a new step: forget all gradients (waiting for any collective still in flight)."""
        for bi, t in enumerate(self.tracks):
            if t.pending is not None:
                t.pending.wait()
                t.pending = None
            fb = self.buckets[bi]
            if self.release_full:
                fb.release_full_grad()
            fb.restore_alias()
            t.state, t.reduced_once, t.launched_in = BucketState.IDLE, False, -1
            t.written = [False] * len(t.written)
        self.touched.clear()
        self._inflight.clear()
        self._deferred.clear()
        self._next = 0

    def close(self) -> None:
        remove_hooks(self.handles)
        self.watch.close()

    # -- hooks ---------------------------------------------------------------------------------
    def _on_grad(self, targets: list[tuple[int, int]], param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        grad = local_grad(param, grad)
        if grad.layout != torch.strided:
            raise ValueError(f"{self.buckets[targets[0][0]].keys[targets[0][1]]} received a sparse "
                             "gradient; ZeroAdamW needs dense gradients (use nn.Embedding(sparse=False))")
        if self.watch.saw_gradient():
            self._begin_pass()
        for bi, si in targets:   # chunk by chunk: each may launch before the next takes a buffer
            self._deliver(bi, si, grad)
        param.grad = None

    def _deliver(self, bi: int, si: int, grad: torch.Tensor) -> None:
        if self.on_grad is not None:
            self.on_grad(bi, si)
        self.touched.add(bi)
        t, fb = self.tracks[bi], self.buckets[bi]
        if t.state in (BucketState.REDUCING, BucketState.REDUCED):
            self._open_window(bi)
        if fb.chunk and self._launching() and self._next < bi and not t.written[si]:
            # a chunk that cannot be reduced yet (an earlier bucket is still filling): keep
            # autograd's gradient instead of filling a buffer, so that the chunks of one large
            # parameter never all hold buffers at once
            self._deferred[bi] = (si, grad)
        else:
            self._materialize(bi)
            fb.put_grad(si, grad, first=not t.written[si])
        t.written[si] = True
        t.arrive(si)
        if t.state is BucketState.IDLE:
            t.to(BucketState.FILLING)
        if self._launching():
            while self._next < len(self.buckets) and self.tracks[self._next].complete():
                self._launch(self._next)
                self._next += 1

    def _begin_pass(self) -> None:
        self._pass += 1
        self._next = 0
        for t in self.tracks:
            t.new_pass()

    def _end_pass(self) -> None:
        for t in self.tracks:
            t.learn()
        if self._launching():
            self._launch_rest()

    # -- internals -----------------------------------------------------------------------------
    def _launching(self) -> bool:
        """Reduce during this backward? Always in 'shard' mode; outside no_sync in 'local' mode."""
        return self.accumulate == "shard" or not self.in_no_sync

    def _launch_rest(self) -> None:
        while self._next < len(self.buckets):
            if self.tracks[self._next].launched_in != self._pass:
                self._launch(self._next)
            self._next += 1

    def _materialize(self, bi: int) -> None:
        """Copy a deferred chunk gradient into the bucket's buffer (before it is reduced)."""
        held = self._deferred.pop(bi, None)
        if held is not None:
            self.buckets[bi].put_grad(held[0], held[1], first=True)

    def _launch(self, bi: int) -> None:
        t, fb = self.tracks[bi], self.buckets[bi]
        if t.state in (BucketState.REDUCING, BucketState.REDUCED):
            self._open_window(bi)
        self._materialize(bi)
        missing = [i for i, w in enumerate(t.written) if not w]
        if missing:
            fb.zero_slots(missing)
        t.to(BucketState.REDUCING)
        t.launched_in = self._pass
        full = fb.full_grad_buffer()
        # the step's first reduction of the bucket may land straight in its gradient shard
        t.direct = not t.reduced_once and fb.takes_reduced_directly(full)
        t.pending = self.comm.reduce_mean(full, fb.lo, fb.hi, what=f"gradient reduction of bucket {bi}",
                                          out=fb.grad_shard if t.direct else None)
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
        if not t.direct:
            fb.take_reduced(first=not t.reduced_once)
        t.reduced_once = True
        if self.release_full:
            fb.release_full_grad()
        t.to(BucketState.REDUCED)

    def _open_window(self, bi: int) -> None:
        """A reduced bucket receives more gradient before step(): start a new local window (stage
        1 first moves its reduced shard out of the gradient buffer it shares)."""
        t, fb = self.tracks[bi], self.buckets[bi]
        if t.state is BucketState.REDUCING:
            self._settle(bi)
        fb.split_alias()
        t.to(BucketState.IDLE)
        t.written = [False] * len(t.written)


def remove_hooks(handles: list) -> None:
    """Remove gradient hooks (also run by the optimizer's finalizer: holds no optimizer reference)."""
    for h in handles:
        h.remove()
    handles.clear()
