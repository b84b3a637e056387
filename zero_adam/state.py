"""``state_dict`` / ``load_state_dict`` of ``ZeroAdamW``: this rank's shards, same layout only.

Kept apart from the optimizer's training path; ``zero_adam.checkpoint`` is the world-size
independent format built on top of the same shards.
"""

from __future__ import annotations

from typing import Any

import torch


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it owns its storage, else a copy: what ``torch.save`` writes is then ``t``'s
    bytes, not the bytes of the buffer it views."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0:
        return t
    return t.detach().clone()


def compact_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every view copied out: ZeroAdamW makes parameters views into
    bucket buffers, so ``torch.save`` of a single parameter (or of a state dict filtered to a few)
    would write whole buckets. A full ``model.state_dict()`` costs nothing extra (each bucket is
    written once); use this when saving a part, or handing tensors to code that keeps them."""
    return {k: compact(v) for k, v in module.state_dict().items()}


class ShardedState:
    """Mixed into ``ZeroAdamW`` (uses its ``buckets``, ``comm``, ``plan``, ``_scaler``, ``_sync``)."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards (same world size only; ``zero_adam.checkpoint`` reshards).

        1/N of the optimizer state: a tensor that is a view into a larger buffer (the FP32
        "master" of FP32 parameters is this rank's slice of the whole parameter buffer) is copied
        out, since ``torch.save`` writes a view's entire storage."""
        self.wait_params()
        out = super().state_dict()
        out["state"] = {fb.bucket.index: {**{k: compact(v) for k, v in fb.state_tensors().items()},
                                          "master": compact(fb.read_master()), "lag": list(fb.lag)}
                        for fb in self.buckets}
        out["zero_adam"] = {"world_size": self.comm.world_size, "rank": self.comm.rank,
                            "fingerprint": self.plan.fingerprint(), "stage": self.options.stage,
                            "scaler": self.scaler_state()}
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict.get("zero_adam")
        if meta is None:
            raise ValueError("this state dict was not saved by ZeroAdamW; to start from a "
                             "torch.optim.AdamW state use zero_adam.checkpoint")
        mine = (self.comm.world_size, self.comm.rank, self.plan.fingerprint())
        theirs = (meta["world_size"], meta["rank"], meta["fingerprint"])
        if mine != theirs:
            raise ValueError(f"state dict was saved by rank {theirs[1]} of {theirs[0]} with plan "
                             f"{theirs[2]}; this is rank {mine[1]} of {mine[0]} with plan "
                             f"{mine[2]}. ZeroAdamW.state_dict() only reloads on the same layout; "
                             "use zero_adam.checkpoint.save/load to change the world size")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        for fb in self.buckets:
            saved = state_dict["state"][fb.bucket.index]
            for name, t in fb.state_tensors().items():
                t.copy_(saved[name])
            fb.write_master(saved["master"].to(fb.read_master().device))
            fb.lag = list(saved.get("lag", [0] * len(fb.lag)))
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        self.load_scaler_state(meta.get("scaler"))
        self.reload_params()

    def scaler_state(self) -> dict[str, Any] | None:
        return None if self._scaler is None else self._scaler.state_dict()

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if self._scaler is not None and state is not None:
            self._scaler.load_state_dict(state)

    @torch.no_grad()
    def reload_params(self) -> None:
        """Make the model's parameters the cast of the (just loaded) master shards, on every rank."""
        self.wait_params()
        self._sync.reset()
        for fb in self.buckets:
            fb.publish_master()
        for p in [self.comm.all_gather(fb.param_buffer, fb.lo, fb.hi) for fb in self.buckets]:
            p.wait()
