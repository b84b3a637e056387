"""The gradient before the update: global norm (over DP and TP), clipping, loss scaling, and
what to do with a non-finite gradient. Mixed into ``ZeroAdamW``; the decision itself is the pure
``scaler.decide``."""

from __future__ import annotations

import logging
import math

import torch

from . import kernel
from .scaler import decide

log = logging.getLogger("zero_adam")


class GradientPolicy:
    """Uses ``ZeroAdamW``'s ``buckets``, ``comm``, ``_tp``, ``_scaler``, ``_sync``, ``options``, ``plan``."""

    _clipped: tuple[float, int] | None = None

    def _local_sq(self) -> torch.Tensor:
        """This rank's share of the squared norm of the full averaged gradient: TP-sharded pieces
        summed over the TP group, TP-replicated ones counted once."""
        sq = kernel.sum_of_squares([fb.grad_shard for fb in self.buckets if not fb.bucket.tp_sharded])
        sharded = [fb.grad_shard for fb in self.buckets if fb.bucket.tp_sharded]
        if sharded:
            tp_sq = kernel.sum_of_squares(sharded)
            sq = sq + (self._tp.all_reduce_sum(tp_sq) if self._tp is not None else tp_sq)
        return sq

    def _grad_stats(self) -> tuple[float, int]:
        """(global gradient norm, buckets that got any gradient on any rank), with one all-reduce
        of a small vector that also carries what every rank must agree on before an update:
        gradient windows still open (reduced now, then counted again) and parameters unfrozen
        outside the optimizer (an error on every rank)."""
        while True:
            sq = self._local_sq()
            late = self._sync.late_mask()
            bad = self._unfrozen_outside()
            info = torch.tensor([len(self._sync.touched), len(bad), *late], dtype=torch.float64)
            vec = self.comm.all_reduce_sum(torch.cat([sq.double().reshape(1), info.to(sq.device)]))
            stats = vec.tolist()
            if any(stats[3:]):
                self._sync.flush(stats[3:])
                continue
            if stats[2]:
                names = sorted(set().union(*self.comm.gather_objects(set(bad))))
                self._sync.reset()
                raise self.unfrozen_error(names)
            return math.sqrt(stats[0]), int(stats[1])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the global gradient norm now and return it (before clipping), like
        ``torch.nn.utils.clip_grad_norm_`` over the whole model; the next ``step()`` uses the clipped
        gradient. For loops (Accelerate, Lightning) that clip between backward and step."""
        if norm_type != 2.0:
            raise ValueError(f"norm_type={norm_type}: ZeroAdamW clips the 2-norm only")
        if self._sync.in_no_sync:
            raise RuntimeError("clip_grad_norm_ inside no_sync(): clip after the last micro-step")
        self._sync.finish()
        scaled, touched = self._grad_stats()
        norm = scaled / self.loss_scale
        if math.isfinite(norm):
            coef = min(max_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                torch._foreach_mul_([fb.grad_shard for fb in self.buckets], coef)
        self._clipped = (scaled, touched)
        return torch.tensor(norm)

    def _prepare_grads(self, clipped: tuple[float, int] | None = None) -> bool:
        """Global norm, overflow/non-finite policy, unscaling and clipping; False: no update."""
        self._clipped = None
        scaled_norm, touched = self._grad_stats() if clipped is None else clipped
        if touched == 0:
            return self._nothing_to_do()
        if not math.isfinite(scaled_norm) and self._scaler is None and self.options.nonfinite == "raise":
            self._raise_nonfinite()
        d = decide(scaled_norm, scaler=self._scaler,
                   max_grad_norm=self.options.max_grad_norm if clipped is None else None)
        self.last_grad_norm, self.last_step_skipped = d.norm, d.skip
        if d.skip:
            self.skipped_steps += 1
            log.warning("zero_adam: step skipped (%d so far, %d updates done): non-finite gradient "
                        "(norm %s)%s", self.skipped_steps, int(self.buckets[0].step), d.norm,
                        f"; loss scale now {self._scaler.scale:g}" if self._scaler else "")
            self._sync.reset()
            return False
        if d.multiplier != 1.0:
            torch._foreach_mul_([fb.grad_shard for fb in self.buckets], d.multiplier)
        return True

    def _nothing_to_do(self) -> bool:
        """No rank got any gradient since the last step: like torch.optim.AdamW, change nothing."""
        if not self._warned_no_grad:
            self._warned_no_grad = True
            log.warning("zero_adam: step() with no gradient since the last step on any rank: "
                        "nothing was updated (no weight decay, no momentum), as torch.optim.AdamW does")
        self.last_grad_norm, self.last_step_skipped = 0.0, True
        self._sync.reset()
        return False

    def _raise_nonfinite(self) -> None:
        mine = set()
        for fb in self.buckets:
            for pc in self.plan.pieces(fb.bucket, self.comm.rank, self.comm.world_size):
                n = pc.param_hi - pc.param_lo
                if not bool(torch.isfinite(fb.grad_shard[pc.shard_lo:pc.shard_lo + n]).all()):
                    mine.add(self.plan.params[pc.param].key)
        names = sorted(set().union(*self.comm.gather_objects(mine)))
        self._sync.reset()
        raise RuntimeError(f"non-finite gradient at optimizer step {int(self.buckets[0].step) + 1} in "
                           f"{len(names)} parameter(s): {names[:20]} (nonfinite='raise'; use 'skip' to "
                           "skip such steps, or check the loss and the learning rate)")

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale (fp16); backward this instead of ``loss``."""
        return loss if self._scaler is None else loss * self._scaler.scale

    @property
    def loss_scale(self) -> float:
        return 1.0 if self._scaler is None else self._scaler.scale

