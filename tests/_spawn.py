"""Run a function on N real gloo processes and collect what each rank returns.

Spawning costs ~7-10 s on 2 cores, so a test module spawns once and loops over its cases inside
the worker. A watchdog kills the processes if they exceed ``timeout``: a hang fails the test.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import signal
import tempfile
import time
from typing import Any

import torch.multiprocessing as mp


def run(world_size: int, target: str, *args: Any, timeout: float = 300.0,
        env: dict[str, str] | None = None, pg_timeout: float = 120.0) -> list[Any]:
    """Call ``module:function`` on every rank of a fresh gloo world; return each rank's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = start(world_size, tmp, target, *args, env=env, pg_timeout=pg_timeout)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGKILL)
                raise TimeoutError(f"{target} on {world_size} ranks did not finish in {timeout:.0f} s")
        out = []
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out.append(json.load(f))
        return out


def start(world_size: int, tmp: str, target: str, *args: Any, env: dict[str, str] | None = None,
          pg_timeout: float = 120.0):
    """Start the ranks without waiting (for tests that kill or stop one of them)."""
    return mp.start_processes(_entry, args=(world_size, tmp, target, args, env or {}, pg_timeout),
                              nprocs=world_size, start_method="spawn", join=False)


def _entry(rank: int, world_size: int, tmp: str, target: str, args: tuple, env: dict,
           pg_timeout: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    # what libraries that read torchrun's environment (DeepSpeed, Accelerate) expect to find
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(*args)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        import gc
        gc.collect()  # free optimizer/hook cycles while the group is alive (see launch/runtime.shutdown)
        dist.destroy_process_group()
