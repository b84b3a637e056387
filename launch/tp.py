"""Tensor parallelism for Llama models: one plan, used by the runtime and by the planner.

Megatron-style: attention heads and FFN columns are split across the TP ranks (q/k/v and w1/w3
column-wise, wo and w2 row-wise), the embedding and the output head by vocabulary; RMSNorm weights
are replicated. The same plan covers the built-in ``launch.model.Llama`` and a ``transformers``
Llama-family model (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``: the module names of
``base_model_tp_plan``). ``local_shape`` gives a parameter's shape on one TP rank without building
anything, so the planner can size a 70B model on the ``meta`` device.
"""

from __future__ import annotations

from torch import nn

from launch.config import ConfigError, ModelConfig
from launch.schema import tp_problems

COL, ROW = "colwise", "rowwise"
# module path suffix -> style, for each model family
BUILTIN = {"attn.wq": COL, "attn.wk": COL, "attn.wv": COL, "attn.wo": ROW,
           "ffn.w1": COL, "ffn.w3": COL, "ffn.w2": ROW}
HF = {"self_attn.q_proj": COL, "self_attn.k_proj": COL, "self_attn.v_proj": COL,
      "self_attn.o_proj": ROW, "mlp.gate_proj": COL, "mlp.up_proj": COL, "mlp.down_proj": ROW}
VOCAB = {"embed": "embed", "head": "head", "embed_tokens": "embed", "lm_head": "head"}

# suffix of a parameter name -> the dimension split across TP ranks
SPLIT_DIM = {**{f"{k}.weight": 0 if v == COL else 1 for k, v in {**BUILTIN, **HF}.items()},
             "embed.weight": 0, "head.weight": 0, "embed_tokens.weight": 0, "lm_head.weight": 0}


def check(cfg: ModelConfig, tp: int) -> list[str]:
    """Why this model cannot be split ``tp`` ways (empty: it can)."""
    return tp_problems(cfg, tp)


def local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[tuple[int, ...], bool]:
    """A parameter's shape on one TP rank, and whether it is split (else replicated)."""
    for suffix, dim in SPLIT_DIM.items():
        if name.endswith(suffix) and tp > 1:
            out = list(shape)
            out[dim] //= tp
            return tuple(out), True
    return tuple(shape), False


def parallelize(model: nn.Module, mesh) -> nn.Module:
    """Apply the plan with torch's ``parallelize_module`` on a 1-D TP ``mesh``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    style = {COL: ColwiseParallel, ROW: RowwiseParallel}
    plan, vocab = {}, {}
    for name, module in model.named_modules():
        for suffix, kind in {**BUILTIN, **HF}.items():
            if name.endswith("." + suffix):
                plan[name] = style[kind]()
        leaf = name.rsplit(".", 1)[-1]
        if leaf in VOCAB and isinstance(module, (nn.Embedding, nn.Linear)):
            vocab[VOCAB[leaf]] = name
    if set(vocab) != {"embed", "head"} or not plan:
        raise ConfigError("parallel.tp", [f"parallel.tp={mesh.size()}: {type(model).__name__} does not "
                                          "have the Llama module names the TP plan splits"])
    _check_untied(model, vocab)
    _check_divisible(model, plan, mesh.size())
    plan[vocab["embed"]] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    plan[vocab["head"]] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    for module in model.modules():  # the built-in attention reshapes by its own head counts
        if hasattr(module, "n_kv") and hasattr(module, "n_heads"):
            module.n_heads //= mesh.size()
            module.n_kv //= mesh.size()
    return model


def _check_untied(model: nn.Module, vocab: dict[str, str]) -> None:
    embed = model.get_submodule(vocab["embed"]).weight
    if embed is model.get_submodule(vocab["head"]).weight:
        raise ConfigError("parallel.tp", ["parallel.tp: tied input and output embeddings cannot be "
                                          "split by vocabulary twice; set tie_word_embeddings: false"])


def _check_divisible(model: nn.Module, plan: dict, tp: int) -> None:
    """DTensor would shard an indivisible dimension unevenly; the attention reshape would break."""
    bad = []
    for name, style in plan.items():
        weight = model.get_submodule(name).weight
        dim = 0 if type(style).__name__ == "ColwiseParallel" else 1
        if weight.shape[dim] % tp:
            bad.append(f"{name}.weight dimension {dim} ({weight.shape[dim]})")
    if bad:
        raise ConfigError("parallel.tp", [f"parallel.tp={tp}: not divisible by {tp}: {', '.join(bad[:4])}"])
