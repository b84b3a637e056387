"""Per-rank memory of a config under ZeroAdamW, from the runtime's own partitioner (no GPU needed).

    python launch/plan.py --config configs/llama3_70b.yaml --world-size 16 --tp 8 --gpu-mem 80
    python launch/plan.py --params 7.5e9 --world-size 64 --param-dtype float16 --reduce-dtype float16 \\
        --grad-dtype float16                      # the ZeRO paper's Figure 1 setting
    python launch/plan.py --config configs/llama3_8b.yaml --world-size 8 --json

``--world-size`` is the number of data-parallel ranks N (ZeRO shards over these); with ``--tp T``
each of them is T GPUs, so the job uses N x T GPUs. The model is built on the ``meta`` device and
partitioned exactly as ZeroAdamW will. For the built-in Llama the per-rank peak adds activations
(``launch/activations.py``: one micro-batch of ``train.micro_batch`` x ``train.seq_len`` with the
config's ``train.activation_checkpointing``, overridable with the flags below); ``--reserve`` adds
a margin on top (allocator fragmentation, CUDA context, communication buffers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from launch import tp as tensor_parallel  # noqa: E402
from launch.activations import Activations, activation_bytes  # noqa: E402
from launch.config import ConfigError, load_config  # noqa: E402
from launch.model import build_model  # noqa: E402
from launch.optim import DTYPES, param_groups  # noqa: E402
from launch.schema import activation_every  # noqa: E402
from zero_adam.memory import FIELDS, Estimate, bare_plan, estimate  # noqa: E402
from zero_adam.options import ShardingOptions  # noqa: E402
from zero_adam.plan import Plan, build_plan, trainable_specs  # noqa: E402

GIB = 2 ** 30


class PlanError(Exception):
    pass


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a launch YAML (its model and optim sections are used)")
    src.add_argument("--params", type=float, help="a bare parameter count, e.g. 7.5e9")
    p.add_argument("--world-size", type=int, required=True, help="data-parallel ranks N")
    p.add_argument("--tp", type=int, help="tensor-parallel degree T (default: the config's parallel.tp)")
    p.add_argument("--stage", type=int, choices=[1, 2], help="default: the config's optim.stage, else 2")
    p.add_argument("--offload", choices=["cpu"], help="optimizer state in host memory")
    p.add_argument("--master", choices=["fp32", "remainder"], default="fp32")
    p.add_argument("--param-dtype", choices=list(DTYPES), help="default: the config's, else bfloat16")
    p.add_argument("--reduce-dtype", choices=list(DTYPES), help="default: the config's, else float32")
    p.add_argument("--grad-dtype", choices=list(DTYPES), help="gradient shard dtype (default float32)")
    p.add_argument("--gpu-mem", type=float, help="GiB per GPU: say whether it fits and what would")
    p.add_argument("--reserve", type=float, default=0.0,
                   help="GiB per GPU kept free on top of the plan (CUDA context, fragmentation)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: the config's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's)")
    p.add_argument("--activation-checkpointing", metavar="none|full|every:K",
                   help="default: the config's train.activation_checkpointing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    for flag, v in (("--world-size", a.world_size), ("--tp", a.tp)):
        if v is not None and v < 1:
            p.error(f"{flag} must be a positive integer, got {v}")
    if a.params is not None and not 1 <= a.params < 1e15:
        p.error(f"--params must be a positive parameter count such as 7.5e9, got {a.params:g}")
    if a.gpu_mem is not None and a.gpu_mem <= 0:
        p.error(f"--gpu-mem must be positive GiB, got {a.gpu_mem}")
    if a.params is not None and (a.tp or 1) > 1:
        p.error("--tp needs --config (which weights split across TP ranks depends on the model)")
    for flag, v in (("--micro-batch", a.micro_batch), ("--seq-len", a.seq_len)):
        if v is not None and v < 1:
            p.error(f"{flag} must be a positive integer, got {v}")
    if a.activation_checkpointing is not None and activation_every(a.activation_checkpointing) is None:
        p.error(f"--activation-checkpointing {a.activation_checkpointing}: expected none, full or every:K")
    return a


class Planner:
    """Builds the plan once per TP degree and estimates any (N, stage, offload) from it."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.cfg = load_config(a.config) if a.config else None
        a.tp = a.tp or (self.cfg.parallel.tp if self.cfg else 1)
        o = self.cfg.optim if self.cfg else None
        self.stage = a.stage or (o.stage if o else 2)
        self.param_dtype = DTYPES[a.param_dtype or (o.param_dtype if o and o.param_dtype else "bfloat16")]
        self.reduce_dtype = DTYPES[a.reduce_dtype or (o.reduce_dtype if o else "float32")]
        self.grad_dtype = DTYPES[a.grad_dtype] if a.grad_dtype else None
        self.bucket_mb = o.bucket_mb if o else 25.0
        self._plans: dict[tuple[int, int], Plan] = {}
        self._specs: dict[int, list] = {}
        self._acts: dict[tuple[int, str], Activations] = {}
        t = self.cfg.train if self.cfg else None
        self.micro_batch = a.micro_batch or (t.micro_batch if t else None)
        self.seq_len = a.seq_len or (t.seq_len if t else None)
        self.ac = a.activation_checkpointing or (t.activation_checkpointing if t else "none")

    def activations(self, tp: int) -> Activations | None:
        """Per-rank activation peak for the built-in Llama (None for --params or a transformers model)."""
        if self.cfg is None or self.cfg.model.hf_config:
            return None
        key = (tp, self.ac)
        if key not in self._acts:
            self._acts[key] = activation_bytes(
                self.cfg.model, micro_batch=self.micro_batch, seq_len=self.seq_len, tp=tp,
                checkpoint_every=activation_every(self.ac), dtype=self.param_dtype)
        return self._acts[key]

    def peak(self, e: Estimate, tp: int) -> int:
        """Bytes one GPU needs at its peak: the estimate's device total plus activations."""
        acts = self.activations(tp)
        return e.device.total + (acts.total if acts else 0)

    def plan(self, tp: int, n: int) -> Plan:
        """The runtime's plan at N data-parallel ranks (N cuts parameters larger than a bucket)."""
        if (tp, n) not in self._plans:
            self._plans[tp, n] = self._build(tp, n)
        return self._plans[tp, n]

    def _build(self, tp: int, n: int) -> Plan:
        numel = ShardingOptions(bucket_mb=self.bucket_mb, reduce_dtype=self.reduce_dtype,
                                param_dtype=self.param_dtype).bucket_numel
        if self.cfg is None:
            return bare_plan(self.a.params, dtype=self.param_dtype, bucket_numel=numel)
        if tp not in self._specs:
            problems = tensor_parallel.check(self.cfg.model, tp)
            if problems:
                raise PlanError("; ".join(problems))
            with torch.device("meta"):
                model = build_model(self.cfg.model)
            groups = torch.optim.Optimizer(param_groups(model, self.cfg.optim), {}).param_groups
            self._specs[tp] = trainable_specs(
                groups, self.param_dtype, lambda name, shape: tensor_parallel.local_shape(name, shape, tp))[1]
        return build_plan(self._specs[tp], bucket_numel=numel, world_size=n)

    def estimate(self, n: int, tp: int, stage: int, offload: str | None) -> Estimate:
        return estimate(self.plan(tp, n), n, stage=stage, reduce_dtype=self.reduce_dtype,
                        grad_dtype=self.grad_dtype, master=self.a.master, offload=offload,
                        accumulate=self.cfg.optim.accumulate if self.cfg else None)

    def smallest_fit(self, budget: float) -> dict | None:
        """Fewest GPUs (then no offload, then stage 1, then the config's activation checkpointing
        before full) whose per-GPU peak fits ``budget``."""
        builtin = self.cfg is not None and not self.cfg.model.hf_config
        tps = [t for t in (1, 2, 4, 8, 16)
               if t == 1 or (builtin and not tensor_parallel.check(self.cfg.model, t))]
        acs = [self.ac] + (["full"] if builtin and self.ac != "full" else [])
        options = []
        configured = self.ac
        try:
            for ac_rank, ac in enumerate(acs):
                self.ac = ac
                for tp in tps:
                    for n in (2 ** k for k in range(0, 14)):
                        for offload in (None, "cpu"):
                            for stage in (1, 2):
                                if self.peak(self.estimate(n, tp, stage, offload), tp) <= budget:
                                    options.append((n * tp, offload is not None, stage, ac_rank, n, tp,
                                                    offload, ac))
                                    break
        finally:
            self.ac = configured
        if not options:
            return None
        gpus, _, stage, _, n, tp, offload, ac = min(options)
        return {"world_size": n, "tp": tp, "stage": stage, "offload": offload, "gpus": gpus,
                "activation_checkpointing": ac}


def render(a: argparse.Namespace, pl: Planner, e: Estimate, fits: bool | None, best: dict | None) -> str:
    plan = pl.plan(a.tp, a.world_size)
    padding = sum(plan.padding(b, a.world_size) for b in plan.buckets)
    total_params = e.n_params * a.tp if pl.cfg is None else _model_params(pl)
    what = a.config or f"{a.params:.3g} parameters"
    lines = [f"{what}: {total_params:,} params; N={a.world_size} data-parallel x TP={a.tp} "
             f"({a.world_size * a.tp} GPUs), ZeRO stage {pl.stage}, {str(pl.param_dtype)[6:]} params, "
             f"{str(pl.reduce_dtype)[6:]} reduce, master {a.master}"
             + (", optimizer state offloaded to CPU" if a.offload else ""),
             f"{len(plan.buckets)} buckets, {padding:,} padding elements per rank", "",
             f"{'per rank':<14}{'GiB':>10}{'bytes':>20}" + (f"{'host GiB':>12}" if a.offload else "")]
    for f in FIELDS:
        row = f"{f:<14}{getattr(e.device, f) / GIB:>10.2f}{getattr(e.device, f):>20,}"
        lines.append(row + (f"{getattr(e.host, f) / GIB:>12.2f}" if a.offload else ""))
    lines.append(f"{'total':<14}{e.device.total / GIB:>10.2f}{e.device.total:>20,}"
                 + (f"{e.host.total / GIB:>12.2f}" if a.offload else ""))
    lines.append(f"{'model states':<14}{e.device.model_states / GIB:>10.2f}  (params + grads + optimizer "
                 "state: what the ZeRO paper counts; decimal GB "
                 f"{e.device.model_states / 1e9:.1f})")
    ddp = pl.estimate(1, a.tp, 1, None).device
    lines.append(f"{'no sharding':<14}{ddp.model_states / GIB:>10.2f}  (DDP + AdamW with an FP32 master, "
                 f"the same model states unsharded; decimal GB {ddp.model_states / 1e9:.1f})")
    acts = pl.activations(a.tp)
    if acts is not None:
        lines.append(f"{'activations':<14}{acts.total / GIB:>10.2f}{acts.total:>20,}  (micro-batch "
                     f"{pl.micro_batch} x {pl.seq_len} tokens, activation checkpointing {pl.ac}: stored "
                     f"blocks {acts.blocks / GIB:.2f} + max(head {acts.head / GIB:.2f}, recompute "
                     f"{acts.recompute / GIB:.2f}) GiB)")
        lines.append(f"{'peak':<14}{pl.peak(e, a.tp) / GIB:>10.2f}{pl.peak(e, a.tp):>20,}")
    else:
        lines.append("activations: not counted (built-in Llama configs only); keep them in --reserve")
    if a.gpu_mem is not None:
        lines.append("")
        need = pl.peak(e, a.tp) / GIB + a.reserve
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {a.gpu_mem:g} GiB per GPU "
                     f"(needs {need:.1f} GiB incl. {a.reserve:g} GiB reserve)")
        if not fits:
            lines.append("smallest that fits: " + (_describe(best, pl.ac) if best else
                                                   "nothing up to 8192 x 16 GPUs"))
    return "\n".join(lines)


def _describe(best: dict, configured_ac: str) -> str:
    text = f"N={best['world_size']} x TP={best['tp']} ({best['gpus']} GPUs), stage {best['stage']}"
    if best["offload"]:
        text += ", offload cpu"
    if best["activation_checkpointing"] != configured_ac:
        text += f", activation checkpointing {best['activation_checkpointing']}"
    return text


def _model_params(pl: Planner) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(pl.cfg.model).parameters())


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        pl = Planner(a)
        e = pl.estimate(a.world_size, a.tp, pl.stage, a.offload)
        budget = (a.gpu_mem - a.reserve) * GIB if a.gpu_mem is not None else None
        fits = None if budget is None else pl.peak(e, a.tp) <= budget
        best = pl.smallest_fit(budget) if budget is not None and not fits else None
    except (ConfigError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.json:
        out = {"params": int(a.params) if pl.cfg is None else _model_params(pl),
               "per_rank_bytes": e.device.as_dict(), "host_bytes": e.host.as_dict(),
               "model_states_bytes": e.device.model_states,
               "activation_bytes": (acts := pl.activations(a.tp)) and acts.as_dict(),
               "peak_bytes": pl.peak(e, a.tp),
               "unsharded_model_states_bytes": pl.estimate(1, a.tp, 1, None).device.model_states,
               "world_size": a.world_size, "tp": a.tp,
               "stage": pl.stage, "offload": a.offload, "fits": fits, "smallest_fit": best}
        print(json.dumps(out))
    else:
        print(render(a, pl, e, fits, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
