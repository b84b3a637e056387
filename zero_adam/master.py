"""Where one bucket shard's master weights live: three interchangeable stores.

* ``OwnMaster``: FP32 (or wider) parameters are their own master; nothing extra.
* ``Fp32Master``: a separate FP32 shard for 16-bit parameters (4 bytes/element), on the device or,
  with CPU offload, in (pinned) host memory.
* ``RemainderMaster``: bf16 parameters plus an int16 remainder (2 bytes/element) that together
  are the FP32 master bit for bit (``kernel.split_bf16``/``join_bf16``).

All three publish the same bf16 rounding (``kernel.round_to_bf16``), so the 2-byte and 4-byte
masters train bit-identically. ``read()`` returns the master in FP32; ``write(t)`` stores an updated
one and makes the parameter shard its rounding.
"""

from __future__ import annotations

import torch

from .kernel import join_bf16, round_to_bf16, split_bf16


def cast_param(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The parameter value for a master value (bf16: the shared rounding rule)."""
    return round_to_bf16(master) if dtype == torch.bfloat16 and master.dtype == torch.float32 \
        else master.to(dtype)


class OwnMaster:
    kind = "own"

    def __init__(self, param_shard: torch.Tensor) -> None:
        self.param_shard = param_shard

    @property
    def tensor(self) -> torch.Tensor | None:
        return self.param_shard

    def read(self) -> torch.Tensor:
        return self.param_shard

    def write(self, t: torch.Tensor) -> None:
        if t is not self.param_shard:
            self.param_shard.copy_(t)

    def publish(self) -> None:
        pass

    def nbytes(self) -> int:
        return 0


class Fp32Master:
    kind = "fp32"

    def __init__(self, param_shard: torch.Tensor, initial: torch.Tensor, device: torch.device) -> None:
        self.param_shard = param_shard
        pin = device.type == "cpu" and param_shard.device.type == "cuda"
        dtype = torch.float32 if param_shard.dtype in (torch.float16, torch.bfloat16) else param_shard.dtype
        self.master = torch.empty(initial.numel(), dtype=dtype, device=device, pin_memory=pin)
        self.master.copy_(initial)
        # offloaded: the cast parameter goes through a pinned buffer, so its upload is asynchronous
        self.staging = None
        if pin and param_shard.dtype != dtype:
            self.staging = torch.empty(initial.numel(), dtype=param_shard.dtype, pin_memory=True)

    @property
    def tensor(self) -> torch.Tensor | None:
        return self.master

    def read(self) -> torch.Tensor:
        return self.master

    def write(self, t: torch.Tensor) -> None:
        if t is not self.master:
            self.master.copy_(t)
        self.publish()

    def publish(self) -> None:
        value = cast_param(self.master, self.param_shard.dtype)
        if self.staging is not None:
            value = self.staging.copy_(value)
        self.param_shard.copy_(value, non_blocking=value.is_pinned())

    def nbytes(self) -> int:
        return self.master.numel() * self.master.element_size()


class RemainderMaster:
    kind = "remainder"

    def __init__(self, param_shard: torch.Tensor, initial: torch.Tensor) -> None:
        if param_shard.dtype != torch.bfloat16:
            raise ValueError("master='remainder' needs bf16 parameters")
        self.param_shard = param_shard
        self.remainder = torch.empty(initial.numel(), dtype=torch.int16, device=param_shard.device)
        self.write(initial.to(param_shard.device, torch.float32))

    @property
    def tensor(self) -> torch.Tensor | None:
        return None  # the FP32 master exists only while it is being updated

    def read(self) -> torch.Tensor:
        return join_bf16(self.param_shard, self.remainder)

    def write(self, t: torch.Tensor) -> None:
        hi, rem = split_bf16(t.contiguous())
        self.param_shard.copy_(hi)
        self.remainder.copy_(rem)

    def publish(self) -> None:
        pass

    def nbytes(self) -> int:
        return self.remainder.numel() * self.remainder.element_size()


def make_store(param_shard: torch.Tensor, initial: torch.Tensor | None, *, mode: str,
               offloaded: bool):
    """The store for a shard; ``initial`` holds the FP32 starting values (None for own masters).
    An offloaded master is always a separate host tensor (on a CPU-only machine too)."""
    wide = param_shard.dtype not in (torch.float16, torch.bfloat16)
    if wide and not offloaded:
        return OwnMaster(param_shard)
    if mode == "remainder" and not offloaded:
        return RemainderMaster(param_shard, initial)
    return Fp32Master(param_shard, initial, torch.device("cpu") if offloaded else param_shard.device)
