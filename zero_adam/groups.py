"""Param groups after construction: frozen parameters, unfreezing and ``add_param_group``.

A parameter that is frozen (``requires_grad=False``) when ``ZeroAdamW`` is built gets no bucket:
sharding state for it would cost 12/N bytes per element for nothing. Unfreezing it later is
therefore refused with an error naming it (at ``step()``, on every rank, before any update) rather
than silently never training it. Progressive unfreezing has a supported path instead:
``opt.add_param_group({"params": [...]})`` after ``requires_grad_(True)`` builds new buckets for
the group, as ``torch.optim.AdamW`` and ``ZeroRedundancyOptimizer`` allow. A frozen parameter that
sits in an existing group moves to the new one.
"""

from __future__ import annotations

from typing import Any

import torch

from . import lifetime, models, validate
from .plan import extend_plan, trainable_specs


class GroupGrowth:
    """Mixed into ``ZeroAdamW`` (uses its ``param_groups``, ``plan``, ``buckets``, ``_sync``, ...)."""

    def _frozen_in_groups(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every parameter in a group that has no bucket because it was frozen."""
        out = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not p.requires_grad:
                    out.append((names[i] if names else f"param_groups.{gi}.params.{i}", p))
        return out

    def _unfrozen_outside(self) -> list[str]:
        """Parameters without a bucket that require a gradient now (they would never train)."""
        return [n for n, p in self._excluded if p.requires_grad]

    def unfrozen_error(self, names: list[str]) -> RuntimeError:
        return RuntimeError(
            f"{len(names)} parameter(s) require grad but were frozen when ZeroAdamW was created, so "
            f"it holds no shard for them and they would never train: {names[:10]}. After unfreezing, "
            "add them with opt.add_param_group({'params': [...]}) (they leave their old group), or "
            "create the optimizer after unfreezing")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``; after construction it builds new buckets."""
        if getattr(self, "_constructing", True):
            super().add_param_group(param_group)
            return
        self._check_open("add_param_group()")
        if self._sync.watch.active or self._sync.touched:
            raise RuntimeError("add_param_group() between backward and step(): call it after "
                               "opt.step() (or opt.zero_grad()), before the next backward")
        self.wait_params()
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        self._release_frozen(group["params"])
        super().add_param_group(group)
        gi = len(self.param_groups) - 1
        validate.check_hyperparams(self.param_groups[gi], where=f"param group {gi}")
        self._grow(gi)

    def _release_frozen(self, params: list) -> None:
        """Frozen parameters of existing groups that the new group takes over leave their group."""
        wanted = {id(p[1] if isinstance(p, tuple) else p) for p in params}
        moving = {id(p) for _, p in self._excluded if id(p) in wanted}
        if not moving:
            return
        for g in self.param_groups:
            keep = [i for i, p in enumerate(g["params"]) if id(p) not in moving]
            g["params"] = [g["params"][i] for i in keep]
            if "param_names" in g:
                g["param_names"] = [g["param_names"][i] for i in keep]
        self._excluded = [(n, p) for n, p in self._excluded if id(p) not in moving]

    def _grow(self, gi: int) -> None:
        group = self.param_groups[gi]
        tensors, specs = trainable_specs([group], self.options.param_dtype, first_group=gi)
        frozen = [p for p in group["params"] if not p.requires_grad]
        self._excluded += [(f"param_groups.{gi}.params.{i}", p)
                           for i, p in enumerate(group["params"]) if not p.requires_grad]
        if not tensors:
            return
        names = [s.key for s in specs]
        validate.check_params(tensors, names)
        clash = sorted({s.key for s in specs} & {s.key for s in self.plan.params})
        if clash:
            raise ValueError(f"parameter names {clash[:5]} are already in the optimizer; name "
                             "the new group's parameters uniquely")
        first = len(self.plan.buckets)
        self.plan = extend_plan(self.plan, specs, bucket_numel=self.options.bucket_numel)
        validate.check_ranks_agree(self.comm, self._consistency_lines(), self._device)
        lifetime.claim(tensors, names, self)
        self._owned += [id(p) for p in tensors]
        if self.options.param_dtype is not None:
            models.cast_(frozen, self.options.param_dtype)
        self._broadcast_from_rank0([*tensors, *frozen])
        by_index = dict(zip(range(len(self.plan.params) - len(tensors), len(self.plan.params)), tensors))
        new = self._make_buckets(self.plan.buckets[first:], by_index)
        self.buckets.extend(new)
        self._sync.add_buckets(new)
        if self._prefetch is not None:
            self._prefetch.add_buckets(new)
