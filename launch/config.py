"""The launch configuration: a typed schema, YAML loading, ``key.path=value`` overrides, and errors.

Every section is a frozen pydantic model that forbids unknown keys. A bad config never raises a
traceback at the user: all problems are collected into one :class:`ConfigError`, each worded in the
override syntax (``optim.lr=-1: ...``) and, for an unknown key, with the nearest valid one.
Each component later receives only its own section (``cfg.optim``, ``cfg.data``, ...).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
Beta = Annotated[float, Field(ge=0, lt=1)]


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
    """Maps one-to-one onto ``zero_adam.ZeroAdamW``'s arguments (``overlap_gather`` defaults to on
    here: the training loop reads parameters only in forward and through zero_adam.checkpoint)."""
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
    overlap_gather: bool = True   # the launcher reads params only in forward and checkpoints
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
    name: str = "run"

    def problems(self) -> list[str]:
        m, t = self.model, self.train
        out = []
        if t.seq_len > m.max_seq_len:
            out.append(f"train.seq_len={t.seq_len}: longer than model.max_seq_len={m.max_seq_len}")
        if self.data.source in ("stdlib", "text") and m.vocab_size < 256:
            out.append(f"model.vocab_size={m.vocab_size}: byte-level data needs at least 256")
        return out


class ConfigError(Exception):
    """All problems of one config, ready to print (no traceback needed)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        head = f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the config"
        super().__init__(head + "\n  " + "\n  ".join(problems))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML, apply ``key.path=value`` overrides, validate; raise ConfigError with every problem."""
    path = Path(path)
    raw = _read_yaml(path)
    problems = _apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        found = [line for err in e.errors() for line in _explain(err, raw).split("\n  ")]
        raise ConfigError(str(path), problems + found) from None
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def check_world(cfg: Config, world_size: int) -> None:
    """Problems that depend on how many ranks run the config."""
    t = cfg.train
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        raise ConfigError(cfg.name, [
            f"train.global_batch={t.global_batch}: must be a multiple of train.micro_batch "
            f"({t.micro_batch}) x world size ({world_size}) = {per_step}; change one of them"])


# -- loading -----------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), [f"no such config file: {path} (see configs/ for examples)"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), [f"malformed YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the file must hold a mapping of sections (model:, optim:, ...)"])
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key.path=value, e.g. optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{key}={text}: {part} is not a section")
                break
        else:
            node[parts[-1]] = value
    return problems


def _explain(err: dict[str, Any], raw: dict[str, Any]) -> str:
    key = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        hint = _nearest(key)
        return f"{key}: unknown key" + (f" (did you mean {hint}?)" if hint else "")
    if err["type"] == "value_error":  # a section's own cross-field check: already worded
        return str(err["ctx"]["error"])
    value = _lookup(raw, err["loc"])
    msg = err["msg"][0].lower() + err["msg"][1:]
    shown = "" if value is _MISSING else f"={_show(value)}"
    return f"{key}{shown}: {msg}"


_MISSING = object()


def _lookup(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (used to suggest the nearest one)."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        out.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += valid_keys(ann, key + ".")
    return out


def _nearest(key: str) -> str | None:
    keys = valid_keys()
    leaf = key.rsplit(".", 1)[-1]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    same_section = [k for k in keys if k.startswith(section) and "." not in k[len(section):]]
    for pool, probe in ((same_section, key), (keys, key)):
        hit = difflib.get_close_matches(probe, pool, n=1, cutoff=0.6)
        if hit:
            return hit[0]
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    return by_leaf[0] if by_leaf else None
