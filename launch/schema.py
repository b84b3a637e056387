"""The launch configuration's typed schema: one frozen pydantic model per section.

Every section forbids unknown keys and checks its cross-field constraints in ``problems()``,
worded in the override syntax (``model.n_heads=5: must divide model.dim=128``). Each component
receives only its own section (``cfg.optim``, ``cfg.data``, ...). Loading, overrides and error
reporting are in ``launch.config``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TP_HF_CONFIGS = ("LlamaConfig", "MistralConfig", "Qwen2Config")  # the module names launch/tp.py splits
Dtype = Literal["float32", "bfloat16", "float16"]
Beta = Annotated[float, Field(ge=0, lt=1)]


def activation_every(value: str) -> int | None:
    """``train.activation_checkpointing`` as "checkpoint every K-th block" (0: none), None if invalid."""
    if value == "none":
        return 0
    if value == "full":
        return 1
    head, _, k = value.partition(":")
    if head == "every" and k.isdigit() and int(k) >= 1:
        return int(k)
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def problems(self) -> list[str]:
        """Checks across fields of this section, worded as ``section.key=value: problem``."""
        return []

    @model_validator(mode="after")
    def _cross_check(self):
        found = self.problems()
        if found:
            raise ValueError("\n  ".join(found))
        return self


class ModelConfig(Section):
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied embeddings.

    Or, with ``hf_config`` (e.g. ``LlamaConfig``), a ``transformers`` causal LM built from that config
    class and ``hf_fields`` (no weights downloaded); ``vocab_size`` and ``max_seq_len`` fill in the
    vocabulary and positions unless ``hf_fields`` sets them."""
    vocab_size: int = Field(256, gt=0)
    dim: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    ffn_dim: int = Field(352, gt=0)
    max_seq_len: int = Field(256, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    hf_config: str | None = None
    hf_fields: dict[str, Any] = Field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.hf_fields and not self.hf_config:
            out.append("model.hf_fields: only used with model.hf_config (e.g. LlamaConfig)")
        if self.dim % self.n_heads:
            out.append(f"model.n_heads={self.n_heads}: must divide model.dim={self.dim}")
        elif (self.dim // self.n_heads) % 2:
            out.append(f"model.dim={self.dim}: head size dim/n_heads={self.dim // self.n_heads} "
                       "must be even for RoPE")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            out.append(f"model.n_kv_heads={kv}: must divide model.n_heads={self.n_heads}")
        return out


class DataConfig(Section):
    """``stdlib``: this interpreter's standard-library sources as bytes (no download);
    ``text``: a UTF-8/bytes file; ``tokens``: a flat binary file of token ids (memory-mapped)."""
    source: Literal["stdlib", "text", "tokens"] = "stdlib"
    path: str | None = None
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    max_bytes: int = Field(8_000_000, gt=0)

    def problems(self) -> list[str]:
        if self.source in ("text", "tokens") and not self.path:
            return [f"data.path: required when data.source={self.source} (the file to read)"]
        if self.source == "stdlib" and self.path:
            return ["data.path: only read when data.source is text or tokens; remove it or set "
                    "data.source"]
        return []


class GroupConfig(Section):
    """A parameter group: names matched by glob patterns (first matching group wins)."""
    match: list[str] = Field(min_length=1)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class LossScalingConfig(Section):
    """Dynamic loss scaling knobs (used when ``optim.loss_scale: dynamic``; fp16 params)."""
    init_scale: float = Field(2.0 ** 16, gt=0)
    growth_factor: float = Field(2.0, gt=1)
    backoff_factor: float = Field(0.5, gt=0, lt=1)
    growth_interval: int = Field(2000, ge=1)
    hysteresis: int = Field(2, ge=1)
    min_scale: float = Field(1.0, gt=0)


class OptimConfig(Section):
    """Maps one-to-one onto ``zero_adam.ZeroAdamW``'s arguments, with the same defaults except the
    hyperparameters."""
    lr: float = Field(3e-3, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    stage: Literal[1, 2] = 2
    bucket_mb: float = Field(25.0, gt=0)
    param_dtype: Dtype | None = None
    reduce_dtype: Dtype = "float32"
    max_grad_norm: float | None = Field(1.0, gt=0)
    accumulate: Literal["local", "shard"] | None = None
    overlap_gather: bool = True
    max_inflight: int = Field(2, ge=1)
    loss_scale: Literal["dynamic"] | float | None = None
    loss_scaling: LossScalingConfig = LossScalingConfig()
    nonfinite: Literal["skip", "raise"] = "skip"
    groups: list[GroupConfig] | None = None

    def problems(self) -> list[str]:
        out = []
        if self.accumulate == "shard" and self.stage == 1:
            out.append("optim.accumulate=shard: needs optim.stage=2 (stage 1 reduces once per step)")
        if isinstance(self.loss_scale, float) and self.loss_scale <= 0:
            out.append(f"optim.loss_scale={self.loss_scale}: must be positive, dynamic or null")
        if self.param_dtype == "float16" and self.loss_scale is None:
            out.append("optim.param_dtype=float16: needs optim.loss_scale (dynamic, or a number); "
                       "fp16 gradients underflow without it")
        if self.loss_scaling.min_scale > self.loss_scaling.init_scale:
            out.append(f"optim.loss_scaling.min_scale={self.loss_scaling.min_scale}: above init_scale")
        return out


class ScheduleConfig(Section):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainConfig(Section):
    steps: int = Field(200, gt=0)
    activation_checkpointing: str = "none"
    global_batch: int = Field(16, gt=0)
    micro_batch: int = Field(8, gt=0)
    seq_len: int = Field(128, gt=0)
    seed: int = 0
    eval_every: int = Field(50, ge=0)
    eval_batches: int = Field(4, gt=0)
    log_every: int = Field(10, gt=0)
    stop_at: int | None = Field(None, gt=0)
    deterministic: bool = False
    collective_timeout_s: float = Field(300.0, gt=0)

    def problems(self) -> list[str]:
        if activation_every(self.activation_checkpointing) is None:
            return [f"train.activation_checkpointing={self.activation_checkpointing}: expected none, "
                    "full (every block) or every:K (every K-th block, K >= 1)"]
        if self.stop_at is not None and self.stop_at > self.steps:
            return [f"train.stop_at={self.stop_at}: beyond train.steps={self.steps}"]
        if self.global_batch < self.micro_batch:
            return [f"train.global_batch={self.global_batch}: smaller than train.micro_batch="
                    f"{self.micro_batch}"]
        return []


class CheckpointConfig(Section):
    """``every``: steps between saves (0: none but the final one); ``keep``: newest complete ones
    kept; ``resume``: ``auto`` (newest complete checkpoint in ``dir``, if any), ``none``, or a path."""
    dir: str = "runs/{name}/checkpoints"
    every: int = Field(0, ge=0)
    keep: int = Field(2, ge=1)
    final: bool = True
    resume: str = "none"


class ParallelConfig(Section):
    """``tp``: tensor-parallel degree T. The world of W processes becomes a (W/T) x T
    ``DeviceMesh`` ("dp", "tp"); the model is split T ways (``launch/tp.py``), ZeroAdamW shards
    over the "dp" dimension and the data is split over it too."""
    tp: int = Field(1, ge=1)


class LoggingConfig(Section):
    out_dir: str = "runs/{name}"
    progress: bool = True
    plot: bool = True


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    parallel: ParallelConfig = ParallelConfig()
    name: str = "run"

    def problems(self) -> list[str]:
        m, t = self.model, self.train
        out = []
        if t.seq_len > m.max_seq_len:
            out.append(f"train.seq_len={t.seq_len}: longer than model.max_seq_len={m.max_seq_len}")
        if self.data.source in ("stdlib", "text") and m.vocab_size < 256:
            out.append(f"model.vocab_size={m.vocab_size}: byte-level data needs at least 256")
        if m.hf_config and activation_every(t.activation_checkpointing) not in (0, 1):
            out.append(f"train.activation_checkpointing={t.activation_checkpointing}: a transformers "
                       "model checkpoints every block or none (use full or none)")
        return out + tp_problems(m, self.parallel.tp)


def tp_problems(m: ModelConfig, tp: int) -> list[str]:
    """Why the model cannot be split ``tp`` ways (heads, KV heads, FFN columns and the vocabulary
    are divided across TP ranks)."""
    if tp == 1:
        return []
    if m.hf_config:
        if m.hf_config not in TP_HF_CONFIGS:
            return [f"parallel.tp={tp}: tensor parallelism covers the built-in Llama and transformers "
                    f"{', '.join(TP_HF_CONFIGS)}, not model.hf_config={m.hf_config}"]
        f = m.hf_fields
        sizes = [("model.hf_fields.num_attention_heads", f.get("num_attention_heads")),
                 ("model.hf_fields.num_key_value_heads", f.get("num_key_value_heads")),
                 ("model.hf_fields.intermediate_size", f.get("intermediate_size")),
                 ("model.vocab_size", m.vocab_size)]
        out = [f"parallel.tp={tp}: {what}={n} is not divisible by {tp}"
               for what, n in sizes if isinstance(n, int) and n % tp]
        if f.get("tie_word_embeddings"):
            out.append(f"parallel.tp={tp}: model.hf_fields.tie_word_embeddings=true: tied embeddings "
                       "cannot be split by vocabulary twice; set it to false")
        return out
    kv = m.n_kv_heads or m.n_heads
    return [f"parallel.tp={tp}: {what}={n} is not divisible by {tp}"
            for what, n in (("model.n_heads", m.n_heads), ("model.n_kv_heads", kv),
                            ("model.ffn_dim", m.ffn_dim), ("model.vocab_size", m.vocab_size)) if n % tp]
