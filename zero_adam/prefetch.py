"""Overlap the parameter all-gather with the next forward, without ever reading stale weights.

``step()`` launches each bucket's all-gather asynchronously, in the order the forward first uses
the buckets, and a forward pre-hook waits for a bucket just before a module whose own parameters
live in it runs. The order is *recorded*, not assumed: the first step after enabling gathers
synchronously and watches which module calls touch which buckets; parameters that got a gradient
without any module call touching them (used directly by another module's code) are marked
"eager" and waited for before the first module runs. Rank 0's record is used by every rank, so
collectives stay in one order. A gradient arriving for a parameter whose gather was never waited
for raises instead of training on stale weights (``check_grad``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .comm import Comm, Pending


class GatherPrefetch:
    def __init__(self, buckets: Sequence[Any], comm: Comm) -> None:
        self.buckets = list(buckets)
        self.comm = comm
        self.bucket_of = {id(p): bi for bi, fb in enumerate(self.buckets) for p in fb.params}
        self.order: list[int] | None = None        # bucket launch order, once recorded
        self.eager: set[int] = set()
        self.pending: dict[int, Pending] = {}
        self._first_call = True
        self._recording: list[int] | None = None
        self._touched: set[int] = set()
        self._modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._hook = None

    # -- called by the optimizer ---------------------------------------------------------------
    def launch(self, gather: Callable[[int], Pending]) -> None:
        """Launch every bucket's gather; wait now while the forward order is still unknown."""
        if self.order is None:
            for p in [gather(bi) for bi in range(len(self.buckets))]:
                p.wait()
            self._recording, self._touched = [], set()
            self._arm()
            return
        self.pending = {bi: gather(bi) for bi in self.order}
        self._first_call = True
        self._arm()

    def finish_recording(self, got_grad: set[int]) -> None:
        """At the next step: fix the order from what the forward touched (rank 0 decides)."""
        if self._recording is None:
            return
        seen = list(dict.fromkeys(self._recording))
        order = seen + [bi for bi in range(len(self.buckets)) if bi not in seen]
        eager = sorted({bi for bi in got_grad if bi not in self._touched})
        decided = self.comm.gather_objects((order, eager))
        self.order, self.eager = decided[0][0], {bi for _, e in decided for bi in e}
        self._recording = None
        self._disarm()

    def wait_all(self) -> None:
        for bi in list(self.pending):
            self._wait(bi)
        self._disarm()

    def check_grad(self, bi: int, name: str) -> None:
        if bi in self.pending:
            raise RuntimeError(
                f"parameter {name} received a gradient although its all-gather was never waited "
                "for: the forward used it outside the forward of the module that owns it, so it "
                "read last step's weights. Create ZeroAdamW with overlap_gather=False for this model")

    # -- the forward pre-hook ------------------------------------------------------------------
    def _arm(self) -> None:
        if self._hook is None:
            self._hook = nn.modules.module.register_module_forward_pre_hook(self._pre_forward)

    def _disarm(self) -> None:
        if self._hook is not None and not self.pending and self._recording is None:
            self._hook.remove()
            self._hook = None

    def _direct_buckets(self, module: nn.Module) -> tuple[int, ...]:
        found = self._modules.get(module)
        if found is None:
            found = tuple(dict.fromkeys(self.bucket_of[id(p)] for p in module._parameters.values()
                                        if p is not None and id(p) in self.bucket_of))
            self._modules[module] = found
        return found

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        mine = self._direct_buckets(module)
        if self._recording is not None:
            self._recording.extend(mine)
            self._touched.update(mine)
            return
        if self._first_call:
            self._first_call = False
            for bi in sorted(self.eager):
                self._wait(bi)
        for bi in mine:
            self._wait(bi)
        if not self.pending:
            self._disarm()

    def _wait(self, bi: int) -> None:
        p = self.pending.pop(bi, None)
        if p is not None:
            p.wait()
