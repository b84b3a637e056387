"""The launch config: every shipped YAML loads, overrides apply, and every error class is clear."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.config import ConfigError, GroupConfig, check_world, load_config, valid_keys
from launch.model import Llama, count_params
from launch.optim import build_optimizer, lr_factor, param_groups

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
EXPECTED_PARAMS = {"llama3_70b": 70_553_706_496, "llama3_8b": 8_030_261_248}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_builds_on_meta(path):
    cfg = load_config(path)
    assert path.read_text().startswith("# Launch:"), "each config opens with the command that runs it"
    with torch.device("meta"):
        model = Llama(cfg.model)
    n = count_params(model)
    assert n == EXPECTED_PARAMS.get(path.stem, n)
    assert param_groups(model, cfg.optim)


def test_overrides_are_typed_and_applied():
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      ["optim.lr=3e-4", "train.steps=7", "optim.betas=[0.8, 0.9]", "optim.param_dtype=null",
                       "logging.progress=false"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.param_dtype is None and cfg.logging.progress is False


def problems(*overrides, config="configs/tiny.yaml"):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / config, list(overrides))
    return e.value.problems


@pytest.mark.parametrize("override,expected", [
    ("optim.lrr=1", "optim.lrr: unknown key (did you mean optim.lr?)"),
    ("optim.weight_dacay=0", "did you mean optim.weight_decay?"),
    ("trian.steps=3", "trian: unknown key (did you mean train?)"),
    ("train.steps=abc", "train.steps=abc: input should be a valid integer"),
    ("train.steps=0", "train.steps=0: input should be greater than 0"),
    ("optim.lr=-1", "optim.lr=-1: input should be greater than 0"),
    ("optim.lr=0", "optim.lr=0: input should be greater than 0"),
    ("optim.betas=[1.0,0.9]", "optim.betas.0=1.0: input should be less than 1"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.stage=3", "optim.stage=3: input should be 1 or 2"),
    ("optim.param_dtype=int8", "optim.param_dtype=int8"),
    ("model.n_heads=5", "model.n_heads=5: must divide model.dim=128"),
    ("train.seq_len=4096", "train.seq_len=4096: longer than model.max_seq_len"),
    ("data.source=tokens", "data.path: required when data.source=tokens"),
    ("optim.stage=1 optim.accumulate=shard", "optim.accumulate=shard: needs optim.stage=2"),
    ("optim", "override 'optim': expected key.path=value"),
    ("train.steps.x=1", "train.steps.x=1: steps is not a section"),
])
def test_each_error_names_the_key(override, expected):
    found = problems(*override.split())
    assert any(expected in p for p in found), found


def test_all_problems_are_reported_at_once():
    found = problems("optim.lrr=1", "optim.lr=-1", "train.steps=abc", "model.n_heads=5", "optim.stage=3")
    assert len(found) >= 5, found


def test_world_size_must_divide_the_batch():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    check_world(cfg, 2)
    with pytest.raises(ConfigError, match=r"train.global_batch=16: must be a multiple of "
                                          r"train.micro_batch \(8\) x world size \(3\)"):
        check_world(cfg, 3)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exits_2_with_a_message_and_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config",
                          str(ROOT / "configs/tiny.yaml"), "optim.lrr=1", "train.steps=-2", "--check"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert "optim.lrr: unknown key (did you mean optim.lr?)" in run.stderr
    assert "train.steps=-2" in run.stderr
    assert "Traceback" not in run.stderr


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert {"optim.lr", "train.steps", "model.n_kv_heads", "data.source"} <= set(keys)


def test_param_groups_by_pattern(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml")
    model = Llama(cfg.model)
    default = param_groups(model, cfg.optim)
    assert all(p.dim() >= 2 for _, p in default[0]["params"]) and default[1]["weight_decay"] == 0.0
    groups = [GroupConfig(match=["embed.*"], lr=1e-3), GroupConfig(match=["*norm*"], weight_decay=0.0),
              GroupConfig(match=["*"])]
    o = cfg.optim.model_copy(update={"groups": groups})
    built = param_groups(model, o)
    assert [n for n, _ in built[0]["params"]] == ["embed.weight"] and built[0]["lr"] == 1e-3
    assert all("norm" in n for n, _ in built[1]["params"])
    names = [n for g in built for n, _ in g["params"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()), "each param exactly once"
    with pytest.raises(ConfigError, match=r"optim.groups.0.match=\['nothing\*'\]: matches no"):
        bad = [GroupConfig(match=["nothing*"]), GroupConfig(match=["*"])]
        param_groups(model, o.model_copy(update={"groups": bad}))
    with pytest.raises(ConfigError, match="match no group"):
        param_groups(model, o.model_copy(update={"groups": [GroupConfig(match=["embed.*"])]}))
    opt = build_optimizer(model, o)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, cfg.optim.lr, cfg.optim.lr]


def test_lr_schedule_shapes():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"])
    f = lr_factor(cfg.schedule, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_transformers_model_by_config_class_name():
    pytest.importorskip("transformers")
    from launch.model import build_model
    cfg = load_config(ROOT / "configs/hf_llama_tiny.yaml")
    model = build_model(cfg.model)
    assert type(model.inner).__name__ == "LlamaForCausalLM"
    assert model(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)
    bad = load_config(ROOT / "configs/hf_llama_tiny.yaml", ["model.hf_fields.hiden_size=64"])
    with pytest.raises(ConfigError, match=r"model.hf_fields.hiden_size: LlamaConfig has no such field "
                                          r"\(did you mean hidden_size\?\)"):
        build_model(bad.model)
    bad = load_config(ROOT / "configs/hf_llama_tiny.yaml", ["model.hf_config=LlamaConfg"])
    with pytest.raises(ConfigError, match="transformers has no config class"):
        build_model(bad.model)
