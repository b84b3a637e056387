"""When does a backward pass end? At the end of the *outermost* autograd graph task.

A post-accumulate-grad hook can fire inside a nested graph task: reentrant activation
checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, DeepSpeed's and Megatron's
``CheckpointFunction``) runs a fresh ``torch.autograd.backward`` inside a custom Function's backward,
once per checkpointed segment. A callback queued from such a hook runs when that *segment* ends,
while the outer backward still has segments (and gradients) to deliver. ``BackwardWatch`` queues
its end callback on the outermost task instead:

* a hook that fires with no custom Function's ``backward`` on the Python stack runs in the
  outermost task: queue the callback right there;
* otherwise the oldest such Function node on the stack executes in the outermost task; a pre-hook
  on the nodes it feeds runs in that task after it, and queues the callback from there.

If neither ever fires (the nested segment was the last thing the outer task ran), the pass stays
open and the optimizer closes it at ``step()``: rounds merge, which costs overlap, never exactness.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction

_APPLY = BackwardCFunction.apply.__code__


def _outermost_function_node() -> Any:
    """The oldest custom-Function node whose ``backward`` is on this thread's stack (None: the
    caller runs in the outermost graph task)."""
    frame, node = sys._getframe(2), None
    while frame is not None:
        if frame.f_code is _APPLY:
            node = frame.f_locals.get("self")
        frame = frame.f_back
    return node


class BackwardWatch:
    """Tracks one backward pass at a time; calls ``on_end`` when its outermost task ends."""

    def __init__(self, on_end: Callable[[], None]) -> None:
        self._on_end = on_end
        self.active = False        # a backward pass is running (or was never seen to end)
        self.nested_seen = False   # some gradient of this pass arrived in a nested graph task
        self._queued = False       # the end callback sits on the outermost task
        self._armed: set[int] = set()
        self._prehooks: list[Any] = []

    def saw_gradient(self) -> bool:
        """Call from every gradient hook. True when this gradient starts a new backward pass."""
        started = not self.active
        self.active = True
        if not self._queued:
            node = _outermost_function_node()
            if node is None:
                self._queue()
            else:
                self.nested_seen = True
                self._arm(node)
        return started

    def close(self) -> None:
        """Forget the running pass (``step()`` closes a pass whose end was never observed)."""
        self.active = self._queued = False
        self._drop_prehooks()

    # -- internals -----------------------------------------------------------------------------
    def _queue(self) -> None:
        self._queued = True
        self._drop_prehooks()
        torch.autograd.Variable._execution_engine.queue_callback(self._ended)

    def _arm(self, node: Any) -> None:
        if id(node) in self._armed:
            return
        self._armed.add(id(node))
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None:
                self._prehooks.append(nxt.register_prehook(self._in_outer_task))

    def _in_outer_task(self, grad_outputs: Any) -> None:
        if self.active and not self._queued and _outermost_function_node() is None:
            self._queue()

    def _drop_prehooks(self) -> None:
        for h in self._prehooks:
            h.remove()
        self._prehooks.clear()
        self._armed.clear()

    def _ended(self) -> None:
        self.active = self._queued = False
        self._on_end()
