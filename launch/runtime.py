"""Where this process runs: device, backend and process group, from torchrun's environment.

CUDA + NCCL when GPUs are present (device from ``LOCAL_RANK``), CPU + gloo otherwise. A plain
``python launch/train.py`` (no ``RANK`` in the environment) runs one process with no process group:
ZeroAdamW then takes its one-rank path, the same code.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any = None
    tp: int = 1
    mesh: Any = None   # a ("dp", "tp") DeviceMesh when tp > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this process belongs to (ranks r*tp ... r*tp+tp-1 share one)."""
        return self.rank // self.tp


def with_tp(rt: Runtime, tp: int) -> Runtime:
    """Split the world into a (world/tp) x tp ``DeviceMesh``: "tp" varies fastest, so the ranks of
    one tensor-parallel group are neighbours (on one node, where the bandwidth is)."""
    if tp == 1:
        return rt
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(rt.device.type, (rt.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    return dataclasses.replace(rt, tp=tp, mesh=mesh, group=None)


def init(timeout_s: float = 300.0, deterministic: bool = False) -> Runtime:
    """Set up device and process group. ``timeout_s`` bounds every collective: a hung rank then
    fails the others after that long (a dead one fails them at once)."""
    if deterministic:
        make_deterministic()
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        return Runtime(0, 1, 0, device, "none")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, backend,
                   dist.group.WORLD)


def make_deterministic() -> None:
    """Bit-identical reruns: deterministic kernels only (an error if an op has none), no cuDNN
    autotuning, a fixed cuBLAS workspace. Costs speed on CUDA; on CPU it changes nothing we use."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def all_mean(values: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mean of a small tensor over ranks (identity on one process)."""
    if rt.world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= rt.world_size
    return values


def shutdown(clean: bool = True) -> None:
    """Tear the process group down on every rank together, after everything that used it is gone.

    The model, optimizer and hooks form reference cycles that would otherwise be freed at
    interpreter exit, after the group (torch 2.13 + gloo then aborted a rank now and then with
    "terminate called without an active exception"); and a rank that left early closed connections
    its peers were still tearing down. After a failure (``clean=False``) a peer may be dead or hung,
    so there is no barrier then.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()
