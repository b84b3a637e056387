"""A DeepSpeed ZeRO-2 checkpoint made on CPU by 2 ranks, migrated to zero-adam on 1 rank."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from zero_adam import ZeroAdamW
from zero_adam.integrations.deepspeed import migrate

from _models import batch, loss_fn, make_model
from _parity import MICRO


def make_and_migrate(tmp: str) -> dict:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    only_rank0 = dist.new_group([0])
    model = make_model()
    client = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": MICRO // ws, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config, dist_init_required=False)
    b = MICRO // ws

    def train(steps):
        for step in steps:
            x, y = batch(step, MICRO)
            engine.backward(loss_fn(engine, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]))
            engine.step()

    train(range(3))
    engine.save_checkpoint(tmp)
    train(range(3, 6))
    final = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    out = {}
    if rank == 0:  # a different world size (1) and a deliberately wrong lr, which migrate replaces
        fresh = make_model(seed=7)
        opt = ZeroAdamW(fresh.named_parameters(), lr=0.5, betas=(0.9, 0.95), weight_decay=0.1,
                        max_grad_norm=1.0, process_group=only_rank0)
        ds = migrate(fresh, opt, tmp)
        out["step"] = float(opt.buckets[0].step)
        out["lr"] = opt.param_groups[0]["lr"]
        out["ds_world"] = ds["world_size"]
        out["weights_at_save"] = max((p.detach() - ds["weights"][n]).abs().max().item()
                                     for n, p in fresh.named_parameters())
        for step in range(3, 6):
            loss_fn(fresh, *batch(step, MICRO)).backward()
            opt.step()
        out["continued_vs_deepspeed"] = max((p.detach() - final[n]).abs().max().item()
                                            for n, p in fresh.named_parameters())
        out["files"] = sorted(os.listdir(tmp))
    dist.barrier()
    return out
