"""Migrate a DeepSpeed ZeRO-1/2 checkpoint to zero-adam, moments included, on any world size.

    model = build_model()                                  # the same architecture, any init
    opt = ZeroAdamW(model.named_parameters(), lr=..., ...) # on the new job's world size and stage
    migrate(model, opt, "ds_checkpoints/")                 # newest tag, or tag="global_step1000"
    zero_adam.checkpoint.save("ckpt/step_1000", model, opt)

The weights come from DeepSpeed's own ``zero_to_fp32`` (the merged FP32 masters). The same routine
applied to the partitions of ``exp_avg`` and ``exp_avg_sq`` in DeepSpeed's optimizer files rebuilds
the moments, with DeepSpeed's own layout and padding rules; the step count and the learning-rate
hyperparameters come from the same files. Every rank reads the (small for ZeRO-1/2 partitions)
files and keeps only its own pieces.

DeepSpeed writes its checkpoints with ``torch.save`` of arbitrary objects (pickle): migrate only
checkpoints you trust. zero-adam's own checkpoints never unpickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..interop import load_full_state
from ..optimizer import ZeroAdamW


def resolve(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """The directory of one DeepSpeed checkpoint (``tag``, else the one named in ``latest``)."""
    root = Path(checkpoint_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            if list(root.glob("*_optim_states.pt")):
                return root
            raise FileNotFoundError(f"{root} has no 'latest' file and no *_optim_states.pt; pass tag=")
        tag = latest.read_text().strip()
    path = root / tag
    if not path.is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint {path}")
    return path


def read(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """Full FP32 weights, ``exp_avg``, ``exp_avg_sq`` (by parameter name), step and param groups."""
    from deepspeed.utils import zero_to_fp32 as z

    path = resolve(checkpoint_dir, tag)
    model_states = z.parse_model_states(z.get_model_state_files(str(path)))
    shards = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for f in z.get_optim_files(str(path))]
    if shards[0]["zero_stage"] > 2:
        raise ValueError(f"{path} is a ZeRO-{shards[0]['zero_stage']} checkpoint; this migrates ZeRO-1/2")
    world = shards[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    paddings = shards[0].get("param_alignment_paddings")
    trainable = [name for shapes in model_states[0].param_shapes for name in shapes]

    def merge(groups_per_rank):
        full = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups_per_rank, model_states, True,
                                                            paddings)
        return {n: full[n] for n in trainable}

    fp32 = [s["single_partition_of_fp32_groups"] for s in shards]   # saved without padding
    n_groups = len(fp32[0])

    def base_state(shard: dict, g: int) -> dict:
        base = shard["base_optimizer_state"]   # per-group lean states, or the inner optimizer's dict
        return base[g] if isinstance(base, list) else base["state"][g]

    def partitions(kind: str) -> list[list[torch.Tensor]]:
        return [[base_state(s, g)[kind].reshape(-1)[:fp32[r][g].numel()] for g in range(n_groups)]
                for r, s in enumerate(shards)]

    moments = {kind: merge(partitions(kind)) for kind in ("exp_avg", "exp_avg_sq")}
    step = shards[0].get("base_optimizer_step", base_state(shards[0], 0).get("step"))
    base0 = shards[0]["base_optimizer_state"]
    groups = base0.get("param_groups", []) if isinstance(base0, dict) else []
    weights = z._get_fp32_state_dict_from_zero2_checkpoint(world, fp32, model_states, False, paddings)
    return {"weights": dict(weights), **moments, "step": float(step), "param_groups": groups,
            "world_size": world}


@torch.no_grad()
def migrate(model: nn.Module, optimizer: ZeroAdamW, checkpoint_dir: str | os.PathLike,
            tag: str | None = None) -> dict[str, Any]:
    """Load a DeepSpeed ZeRO-1/2 checkpoint into ``model`` and ``optimizer``; returns what was read."""
    ds = read(checkpoint_dir, tag)
    ours = {id(p) for fb in optimizer.buckets for p in fb.params}
    trainable = {n for n, p in model.named_parameters() if id(p) in ours}
    others = {n: t for n, t in ds["weights"].items() if n not in trainable}
    missing = sorted(trainable - set(ds["weights"]))
    if missing:
        raise ValueError(f"the DeepSpeed checkpoint has no weights for {missing[:5]}: another model?")
    current = model.state_dict()
    for name, t in others.items():  # frozen parameters and buffers
        if name in current:
            current[name].copy_(t)
    load_full_state(model, optimizer, params=ds["weights"], exp_avg=ds["exp_avg"],
                    exp_avg_sq=ds["exp_avg_sq"], step=ds["step"])
    if len(ds["param_groups"]) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, ds["param_groups"]):
            for k in ("lr", "betas", "eps", "weight_decay"):
                if k in saved:
                    group[k] = tuple(saved[k]) if k == "betas" else saved[k]
    return ds
