"""The launch configuration: YAML loading, ``key.path=value`` overrides, and errors.

The schema is ``launch.schema`` (frozen pydantic sections that forbid unknown keys). A bad config
never raises a traceback at the user: all problems are collected into one :class:`ConfigError`,
each worded in the override syntax (``optim.lr=-1: ...``) and, for an unknown key, with the
nearest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launch.schema import (  # noqa: F401  (re-exported: every component imports its section here)
    CheckpointConfig,
    Config,
    DataConfig,
    GroupConfig,
    LoggingConfig,
    LossScalingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
)


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
    t, tp = cfg.train, cfg.parallel.tp
    if world_size % tp:
        raise ConfigError(cfg.name, [
            f"parallel.tp={tp}: must divide the number of processes ({world_size}); launch a "
            f"multiple of {tp} processes or change parallel.tp"])
    dp = world_size // tp
    per_step = t.micro_batch * dp
    if t.global_batch % per_step:
        where = f"data-parallel size ({world_size} processes / tp {tp} = {dp})" if tp > 1 else \
            f"world size ({world_size})"
        raise ConfigError(cfg.name, [
            f"train.global_batch={t.global_batch}: must be a multiple of train.micro_batch "
            f"({t.micro_batch}) x {where} = {per_step}; change one of them"])


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
