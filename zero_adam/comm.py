"""The only module that calls ``torch.distributed`` collectives.

It hides three things from the rest of the library:

* **No process group / one rank**: every operation is then a local no-op returning a completed
  handle, so the optimizer runs one code path on 1 or N ranks.
* **Which collective implements a reduction or a gather**: semantics are fixed ("average the
  bucket over the group; my shard receives the result", "every rank receives every shard"), the
  collective is chosen per backend by measurement (``bench/collectives.py``). NCCL: reduce-scatter
  and all-gather. gloo: direct point-to-point exchanges (``zero_adam.exchange``), about 2x faster
  than gloo's all-reduce, reduce-scatter and all-gather here, and moving the minimum, (N-1)/N of
  the bucket per rank in each direction, as NCCL's do. ``all_reduce`` remains selectable.
* **Asynchrony**: operations return a :class:`Pending` whose ``wait()`` also runs the small local
  finishing work (e.g. a division), exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .exchange import Exchange

_REDUCE_CHOICES = ("auto", "reduce_scatter", "all_reduce", "exchange")
_GATHER_CHOICES = ("auto", "all_gather", "all_reduce", "exchange")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or issued other collectives."""


class Pending:
    """An in-flight collective plus the local work that completes it."""

    __slots__ = ("_work", "_finish", "done", "_fail")

    def __init__(self, work: Any = None, finish: Callable[[], None] | None = None,
                 fail: Callable[[Exception], CollectiveError] | None = None) -> None:
        self._work, self._finish, self.done, self._fail = work, finish, False, fail

    def finish_transfer(self) -> None:
        """Complete the backend's part now; the local work that completes it runs at ``wait()``."""
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as e:
                raise (self._fail(e) if self._fail else e) from e
            self._work = None  # do not keep the backend's work object alive past its use

    def wait(self) -> None:
        if self.done:
            return
        self.finish_transfer()
        if self._finish is not None:
            self._finish()
        self.done = True


@dataclass
class Traffic:
    """What this rank handed to collectives, by purpose: payload bytes (not wire bytes) and calls.

    ``reduce``: gradient reductions; ``gather``: parameter all-gathers; ``other``: scalars and
    start-up broadcasts.
    """

    bytes: dict[str, int] = field(default_factory=lambda: {"reduce": 0, "gather": 0, "other": 0})
    calls: dict[str, int] = field(default_factory=lambda: {"reduce": 0, "gather": 0, "other": 0})

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1


class Comm:
    """A data-parallel process group seen as rank, world size and a few async operations."""

    def __init__(
        self, process_group: Any = None, *, reduce_collective: str = "auto",
        gather_collective: str = "auto",
    ) -> None:
        if reduce_collective not in _REDUCE_CHOICES:
            raise ValueError(f"reduce_collective must be one of {_REDUCE_CHOICES}, got {reduce_collective!r}")
        if gather_collective not in _GATHER_CHOICES:
            raise ValueError(f"gather_collective must be one of {_GATHER_CHOICES}, got {gather_collective!r}")
        initialized = dist.is_available() and dist.is_initialized()
        if process_group is not None and not initialized:
            raise ValueError("a process_group was given but torch.distributed is not initialized; "
                             "call torch.distributed.init_process_group first")
        self.group = process_group if initialized else None
        if initialized:
            self.group = process_group if process_group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
            self.backend = str(dist.get_backend(self.group))
        else:
            self.rank, self.world_size, self.backend = 0, 1, "none"
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process_group; "
                             "create the optimizer only on the group's ranks")
        gloo = self.backend == "gloo"
        self.reduce_collective = (("exchange" if gloo else "reduce_scatter")
                                  if reduce_collective == "auto" else reduce_collective)
        self.gather_collective = (("exchange" if gloo else "all_gather")
                                  if gather_collective == "auto" else gather_collective)
        self.exchange = Exchange(self.group, self.rank, self.world_size) if initialized else None
        self._avg = self.backend in ("gloo", "nccl")
        self._device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self.traffic = Traffic()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _launched(self, pending: Pending) -> Pending:
        """Every asynchronous operation passes here. While ``torch.profiler`` records on a gloo
        group its transfer completes before the launching call returns: torch 2.13's gloo work
        created under the profiler and waited after the profiler stopped crashes the process when
        the profile is freed (``free(): invalid pointer`` / SIGSEGV; reproduced with plain
        ``isend``/``irecv``), and profiler windows close right after ``step()`` or a backward,
        with overlapped gathers or reductions in flight. Profiled steps on gloo do not overlap."""
        if self.backend == "gloo" and torch._C._autograd._profiler_enabled():
            pending.finish_transfer()
        return pending

    def _failure(self, what: str) -> Callable[[Exception], CollectiveError]:
        def fail(e: Exception) -> CollectiveError:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            return CollectiveError(
                f"{what} failed on rank {self.rank} of {self.world_size} ({self.backend}): {first}. "
                "Another rank probably died, hung past the process group's timeout, or ran different "
                "collectives. Stop every rank and restart from the last complete checkpoint.")
        return fail

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise self._failure(what)(e) from e

    def reduce_mean(self, full: torch.Tensor, lo: int, hi: int, what: str = "gradient reduction",
                    out: torch.Tensor | None = None) -> Pending:
        """Average ``full`` over the group so that ``full[lo:hi]`` holds this rank's mean shard
        (or ``out``, a tensor of the shard's size and dtype, when given).

        The rest of ``full`` is left in an unspecified state (it may hold the whole mean).
        """
        if out is not None and (out.numel() != hi - lo or out.dtype != full.dtype):
            raise ValueError(f"reduce_mean: out has {out.numel()} {out.dtype} elements, the shard "
                             f"{hi - lo} {full.dtype}")
        if not self.distributed:
            return Pending(None, None if out is None else (lambda: out.copy_(full[lo:hi])))
        op = dist.ReduceOp.AVG if self._avg else dist.ReduceOp.SUM
        shard = full[lo:hi]
        self.traffic.add("reduce", full.numel() * full.element_size())
        what = f"{what} ({self.reduce_collective} of {full.numel() * full.element_size():,} bytes)"
        if self.reduce_collective == "exchange":
            def pending(works: Any, finish: Callable[[], None]) -> Pending:
                return self._launched(Pending(works, finish, self._failure(what)))
            return self._call(what, self.exchange.reduce, full, lo, hi, pending, out)
        if self.reduce_collective == "all_reduce":
            work = self._call(what, dist.all_reduce, full, op=op, group=self.group, async_op=True)
        else:
            work = self._call(what, dist.reduce_scatter_single, shard, full, op=op, group=self.group,
                              async_op=True)
        def finish() -> None:
            if not self._avg:
                shard.div_(self.world_size)
            if out is not None:
                out.copy_(shard)
        return self._launched(Pending(work, finish, self._failure(what)))

    def all_gather(self, full: torch.Tensor, lo: int, hi: int, what: str = "parameter all-gather") -> Pending:
        """Fill ``full`` in place from every rank's ``full[lo:hi]`` (equal-sized shards)."""
        if not self.distributed:
            return Pending()
        self.traffic.add("gather", full.numel() * full.element_size())
        if self.gather_collective == "all_reduce":
            # Disjoint shards summed into zeros: exact (x + 0 == x), and faster than gloo's all_gather.
            full[:lo].zero_()
            full[hi:].zero_()
        what = f"{what} ({self.gather_collective} of {full.numel() * full.element_size():,} bytes)"
        if self.gather_collective == "all_reduce":
            work = self._call(what, dist.all_reduce, full, group=self.group, async_op=True)
        elif self.gather_collective == "exchange":
            work = self._call(what, self.exchange.gather, full, lo, hi)
        else:
            work = self._call(what, dist.all_gather_single, full, full[lo:hi], group=self.group,
                              async_op=True)
        return self._launched(Pending(work, None, self._failure(what)))

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over the group, in place (blocking)."""
        if self.distributed:
            self.traffic.add("other", t.numel() * t.element_size())
            self._call("gradient-norm all-reduce", dist.all_reduce, t, group=self.group)
        return t

    def barrier(self) -> None:
        """Wait for every rank (a one-element all-reduce: works on every backend and device)."""
        if self.distributed:
            self._call("barrier", dist.all_reduce, torch.zeros(1, device=self._device), group=self.group)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``t`` with group rank ``src``'s value (blocking; used once at start-up)."""
        if self.distributed:
            self.traffic.add("other", t.numel() * t.element_size())
            self._call("start-up broadcast of parameters", dist.broadcast, t,
                       src=dist.get_global_rank(self.group, src), group=self.group)

    def agree(self, digest: int, device: torch.device) -> bool:
        """True when every rank passed the same 63-bit ``digest`` (one small all-reduce)."""
        if not self.distributed:
            return True
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
        self._call("plan check across ranks", dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]) == digest and int(t[1]) == -digest

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled; only used to explain an error)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._call("all_gather_object", dist.all_gather_object, out, obj, group=self.group)
        return out
