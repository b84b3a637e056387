"""Overlap the parameter all-gather with the next forward, without ever reading stale weights.

``step()`` launches each bucket's all-gather asynchronously, in the order the forward first uses
the buckets, and a forward pre-hook waits for a bucket just before a module whose own parameters
live in it runs. The order is *recorded*, not assumed: the first step after enabling gathers
synchronously and watches which module calls touch which buckets; buckets with parameters that got
a gradient without any module call touching them are "eager" (waited for before the first module
runs). Rank 0's record is used by every rank, so collectives stay in one order.

The order is only a schedule. Correctness is per parameter, in train and eval mode alike: while any
gather is in flight a ``TorchFunctionMode`` (``_ReadGuard``) looks at the arguments of every torch
call, and a call that reads (or writes) a parameter whose bucket is still being gathered waits for
that bucket first: a parent module calling ``F.linear(x, self.child.weight)``, an EMA update, a
``state_dict()``, a DTensor parameter's ``full_tensor()`` or ``to_local()`` (its local shard is
watched too: ``to_local()`` reads only that). The guard leaves the mode stack once the last
gather has been waited for.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .comm import Comm, Pending
from .dtensor import local


class _ReadGuard(TorchFunctionMode):
    """Waits for the gather of any parameter a torch call is about to touch."""

    def __init__(self, prefetch: GatherPrefetch) -> None:
        super().__init__()
        self._prefetch = weakref.ref(prefetch)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        pf = self._prefetch()
        if pf is not None and pf.pending:
            pf.wait_for(args)
            if kwargs:
                pf.wait_for(tuple(kwargs.values()))
        return func(*args, **(kwargs or {}))


class GatherPrefetch:
    def __init__(self, buckets: Sequence[Any], comm: Comm) -> None:
        self.buckets: list[Any] = []
        self.bucket_of: dict[int, tuple[int, ...]] = {}   # id(param) -> its buckets (chunks: several)
        self.comm = comm
        self.order: list[int] | None = None        # bucket launch order, once recorded
        self.eager: set[int] = set()
        self.pending: dict[int, Pending] = {}
        self._first_call = True
        self._recording: list[int] | None = None
        self._touched: set[int] = set()
        self._modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._hook = None
        self._guard = _ReadGuard(self)
        self._guard_on = False
        self.add_buckets(buckets)

    def add_buckets(self, buckets: Sequence[Any]) -> None:
        """New buckets (``add_param_group``): record the forward order again on the next step."""
        for fb in buckets:
            bi = len(self.buckets)
            self.buckets.append(fb)
            for p in fb.params:   # a DTensor's local shard too (to_local() reads only that)
                for key in dict.fromkeys((id(p), id(local(p)))):
                    self.bucket_of[key] = self.bucket_of.get(key, ()) + (bi,)
        self.wait_all()
        self.order, self._recording = None, None
        self._modules = weakref.WeakKeyDictionary()

    # -- called by the optimizer ---------------------------------------------------------------
    def launch(self, gather: Callable[[int], Pending], prepare: Callable[[int], None] | None = None) -> None:
        """Launch every bucket's gather in forward order, ``prepare(bi)`` (its update) just
        before it; wait now while that order is still unknown (the caller prepares first then)."""
        if self.order is None:
            assert prepare is None, "the forward order is not recorded yet: update before launch()"
            for p in [gather(bi) for bi in range(len(self.buckets))]:
                p.wait()
            self._recording, self._touched = [], set()
            self._arm()
            return
        self.pending = {}
        for bi in self.order:
            if prepare is not None:
                prepare(bi)
            self.pending[bi] = gather(bi)
        self._first_call = True
        self._arm()
        self._push_guard()

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

    def wait_for(self, values: tuple) -> None:
        """Wait for the buckets of any parameter among ``values`` (and one level of lists)."""
        for v in values:
            for item in (v if isinstance(v, (list, tuple)) else (v,)):
                for bi in self.bucket_of.get(id(item), ()):
                    if bi in self.pending:
                        self._wait(bi)

    def check_grad(self, bi: int, name: str) -> None:
        if bi in self.pending:
            raise RuntimeError(
                f"parameter {name} received a gradient although its all-gather was never waited "
                "for: it was read through a path the read guard cannot see, so it read last "
                "step's weights. Create ZeroAdamW with overlap_gather=False for this model")

    def close(self) -> None:
        """Finish every gather and remove the hooks (``ZeroAdamW.close`` / its finalizer)."""
        self.wait_all()
        self._recording = None
        self._disarm()

    # -- hooks ---------------------------------------------------------------------------------
    def _arm(self) -> None:
        if self._hook is None:
            self._hook = nn.modules.module.register_module_forward_pre_hook(self._pre_forward)

    def _disarm(self) -> None:
        if not self.pending:
            self._pop_guard()
            if self._hook is not None and self._recording is None:
                self._hook.remove()
                self._hook = None

    def _push_guard(self) -> None:
        if self.pending and not self._guard_on:
            torch.overrides._push_mode(self._guard)
            self._guard_on = True

    def _pop_guard(self) -> None:
        """Leave the mode stack if the guard is on top; otherwise it stays (inert: nothing is
        pending) until a later wait finds it on top. Modes must be popped in stack order."""
        if self._guard_on and torch.overrides._get_current_function_mode() is self._guard:
            torch.overrides._pop_mode()
            self._guard_on = False

    def _direct_buckets(self, module: nn.Module) -> tuple[int, ...]:
        found = self._modules.get(module)
        if found is None:
            found = tuple(dict.fromkeys(bi for p in module._parameters.values() if p is not None
                                        for bi in self.bucket_of.get(id(p), ())))
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
        if not self.pending:
            self._pop_guard()
