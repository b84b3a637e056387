"""Reduce-scatter and all-gather as direct point-to-point exchanges (gloo).

gloo's own ``reduce_scatter`` and ``all_gather`` are slower than its ``all_reduce``, which moves
twice the bytes. A direct exchange is faster than all three on these machines (``python
bench/collectives.py``): each rank sends every other rank the part that rank owns and receives
the parts it owns itself, with ``isend``/``irecv`` straight from and into the flat buffers. Per
rank it moves (N-1)/N of the bucket in each direction, the minimum (a ring does the same).

* gather: each rank's shard goes to every other rank and lands in place; no copy, no arithmetic.
* reduce: each rank sends shard j of its gradient buffer to rank j and receives the other ranks'
  contributions to its own shard into a receive buffer, then adds them in rank order and divides
  by N (straight into the caller's gradient shard when it gives one). The receive buffers
  ((N-1)/N of a bucket each) are reused and bounded: at most ``max_reducing`` reductions are in
  flight (the optimizer's ``max_inflight``); a further one first finishes the oldest. With one,
  the backward would stop at every bucket until the previous exchange completed (measured ~5%
  slower on 2 CPU ranks).

Shards are equal and in rank order, as the plan lays them out. Every rank issues its operations in
the same order (the library's rule for collectives), so a counter gives both ends of each transfer
the same tag.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .flat import BufferPool

RECV_BUFFERS = 2   # default reductions in flight at once, each holding one receive buffer
_TAGS = 1 << 20    # tags cycle through this range: far more than the operations ever in flight


class Works:
    """Several point-to-point transfers, waited for as one."""

    __slots__ = ("works",)

    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class Exchange:
    def __init__(self, group: Any, rank: int, world_size: int, max_reducing: int = RECV_BUFFERS) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.peers = [dist.get_global_rank(group, j) for j in range(world_size)]
        self._tag = 0
        self._pool = BufferPool()                # receive buffers not in use
        self._reducing: deque = deque()          # (pending, buffer) of reductions in flight
        self.max_reducing = max_reducing

    def _next_tag(self) -> int:
        tag, self._tag = self._tag, (self._tag + 1) % _TAGS
        return tag

    def _split(self, full: torch.Tensor, lo: int, hi: int) -> int:
        size = hi - lo
        if lo != self.rank * size or full.numel() != size * self.world_size:
            raise AssertionError(f"an exchange needs equal shards in rank order: [{lo}, {hi}) "
                                 f"of {full.numel()}")
        return size

    def gather(self, full: torch.Tensor, lo: int, hi: int) -> Works:
        """Send ``full[lo:hi]`` to every other rank; receive each rank's shard into its place."""
        size, tag = self._split(full, lo, hi), self._next_tag()
        works = []
        for j, peer in enumerate(self.peers):
            if j != self.rank:
                works.append(dist.isend(full[lo:hi], peer, group=self.group, tag=tag))
                works.append(dist.irecv(full[j * size:(j + 1) * size], peer, group=self.group, tag=tag))
        return Works(works)

    def reduce(self, full: torch.Tensor, lo: int, hi: int,
               start: Callable[[Works, Callable[[], None]], Any], out: torch.Tensor | None = None) -> Any:
        """Start the reduction of ``full`` into ``full[lo:hi]`` (the mean over ranks), or into
        ``out`` (same size and dtype: the sum is written there directly, one pass less).

        ``start(works, finish)`` wraps the transfers and the local finishing work into the
        caller's pending object, which is returned; ``finish`` (run once, by its ``wait``) adds
        the received contributions, divides by N and frees the receive buffer.
        """
        while len(self._reducing) >= self.max_reducing:
            self._reducing[0][0].wait()
        size, tag = self._split(full, lo, hi), self._next_tag()
        recv = self._pool.take((self.world_size - 1) * size, full.dtype, full.device)
        works, k = [], 0
        for j, peer in enumerate(self.peers):
            if j != self.rank:
                works.append(dist.isend(full[j * size:(j + 1) * size], peer, group=self.group, tag=tag))
                works.append(dist.irecv(recv[k * size:(k + 1) * size], peer, group=self.group, tag=tag))
                k += 1
        mine = full[lo:hi]
        dest = mine if out is None else out

        def finish() -> None:
            for i in range(self.world_size - 1):   # rank order of the others, as before
                torch.add(mine if i == 0 else dest, recv[i * size:(i + 1) * size], out=dest)
            dest.div_(self.world_size)
            self._reducing.remove(entry)
            self._pool.give(entry[1])
        pending = start(Works(works), finish)
        entry = (pending, recv if recv._base is None else recv._base)
        self._reducing.append(entry)
        return pending

    def nbytes(self) -> int:
        """Receive buffers held now, free or in use."""
        return self._pool.nbytes() + sum(buf.numel() * buf.element_size() for _, buf in self._reducing)
