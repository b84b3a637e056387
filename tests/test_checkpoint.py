"""Checkpoints: resharding N -> M ranks across stages, crash safety, damage, consolidation, interop."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zero_adam import ZeroAdamW, checkpoint
from zero_adam.ckpt_format import CheckpointError
from zero_adam.consolidate import adamw_param_groups
from zero_adam.consolidate import main as consolidate
from zero_adam.interop import load_adamw_state_dict

import _spawn
from _models import batch, loss_fn, make_model, named_groups
from ckpt_cases import CASES, K1, case_name

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    per_rank = _spawn.run(4, "ckpt_cases:run_all", str(tmp), timeout=600)
    return per_rank


@pytest.mark.parametrize("case", CASES, ids=[case_name(c) for c in CASES])
def test_save_on_n_load_on_m(reshard, case):
    n, m = case[0], case[1]
    for rank in range(m):
        r = reshard[rank][case_name(case)]
        assert r["same_state"], "restored masters, moments and step must equal the saved ones bit for bit"
        assert r["extra"] == {"k1": K1, "note": "hi"}
        # continuing on another world size changes only the order of the gradient average (fp32),
        # or which rows share a bf16 forward pass (bf16: one rounding step of a bf16 weight)
        assert r["final_diff"] < (2 ** -7 if case[4] else 1e-5), r
        if n == m:
            assert r["final_diff"] == 0.0, "same world size: identical to the uninterrupted run"


def _trained(steps=3, **kw):
    model = make_model()
    opt = ZeroAdamW(named_groups(model), lr=1e-2, **kw)
    for s in range(steps):
        loss_fn(model, *batch(s, 8)).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("where", ["before_meta", "during_write"])
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path, where):
    run = subprocess.run([sys.executable, str(HERE / "ckpt_kill.py"), str(tmp_path), where],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    assert (tmp_path / "step_2.partial").is_dir() and not (tmp_path / "step_2").exists()
    assert checkpoint.latest(tmp_path) == tmp_path / "step_1"
    assert checkpoint.load(tmp_path / "step_1", *fresh()) == {"step": 1}
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load(tmp_path / "step_2.partial", *fresh())


def fresh():
    m = make_model(seed=4)
    return m, ZeroAdamW(named_groups(m), lr=1e-2)


def test_damaged_checkpoints_fail_clearly(tmp_path):
    model, opt = _trained()
    path = checkpoint.save(tmp_path / "ck", model, opt)
    data = sorted(path.glob("*.distcp"))[0]
    raw = data.read_bytes()
    data.write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path, *fresh())
    assert not checkpoint.is_complete(path) and checkpoint.latest(tmp_path) is None
    data.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    with pytest.raises(CheckpointError, match="CRC-32 mismatch"):
        checkpoint.load(path, *fresh())
    data.write_bytes(raw)
    checkpoint.load(path, *fresh())
    (path / "zero_adam.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load(path, *fresh())
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nowhere", *fresh())


def test_other_model_is_refused_with_names(tmp_path):
    model, opt = _trained()
    path = checkpoint.save(tmp_path / "ck", model, opt)
    other = make_model(hidden=256, unused=True)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path, other, ZeroAdamW(other.named_parameters()))
    msg = str(e.value)
    assert "missing from the checkpoint: ['spare']" in msg and "inp.weight: shape [257, 17]" in msg


def test_consolidated_weights_and_adamw_export_continue_like_zero_adam(tmp_path):
    model, opt = _trained(param_dtype=None, max_grad_norm=None)
    path = checkpoint.save(tmp_path / "ck", model, opt)
    out, optim_out = tmp_path / "w.safetensors", tmp_path / "adamw.pt"
    assert consolidate([str(path), str(out), "--optimizer", str(optim_out)]) == 0
    plain = make_model(seed=7)
    plain.load_state_dict(load_file(out))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters()))
    state = torch.load(optim_out, weights_only=True)
    adamw = torch.optim.AdamW(adamw_param_groups(plain, state), lr=1e-2)
    adamw.load_state_dict(state)
    for s in range(3, 6):
        for m, o in ((model, opt), (plain, adamw)):
            loss_fn(m, *batch(s, 8)).backward()
            o.step()
            o.zero_grad()
    worst = max((p - q).abs().max().item() for p, q in zip(plain.parameters(), model.parameters()))
    assert worst < 1e-6


@pytest.mark.parametrize("amsgrad", [False, True])
def test_join_from_adamw(tmp_path, amsgrad):
    model = make_model()
    adamw = torch.optim.AdamW(named_groups(model), lr=1e-2, amsgrad=amsgrad)
    for s in range(3):
        loss_fn(model, *batch(s, 8)).backward()
        adamw.step()
        adamw.zero_grad()
    joined = copy.deepcopy(model)
    opt = ZeroAdamW(named_groups(joined), lr=1e-2, amsgrad=amsgrad)
    load_adamw_state_dict(joined, opt, adamw.state_dict())
    if amsgrad:  # the running maximum is state too: it must arrive, not restart from zero
        assert all(fb.max_exp_avg_sq.abs().max() > 0 for fb in opt.buckets)
    for s in range(3, 7):
        for m, o in ((model, adamw), (joined, opt)):
            loss_fn(m, *batch(s, 8)).backward()
            o.step()
            o.zero_grad()
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), joined.parameters())) < 1e-6


def test_join_from_adamw_refuses_an_amsgrad_mismatch():
    model = make_model()
    adamw = torch.optim.AdamW(named_groups(model), lr=1e-2, amsgrad=True)
    loss_fn(model, *batch(0, 8)).backward()
    adamw.step()
    opt = ZeroAdamW(named_groups(model), lr=1e-2)
    before = [fb.exp_avg.clone() for fb in opt.buckets]
    with pytest.raises(ValueError, match="amsgrad=True but ZeroAdamW was built with amsgrad=False"):
        load_adamw_state_dict(model, opt, adamw.state_dict())
    assert all(torch.equal(b, fb.exp_avg) for b, fb in zip(before, opt.buckets)), "nothing may change"


def test_consolidate_cli_errors(tmp_path):
    model, opt = _trained(1)
    path = checkpoint.save(tmp_path / "ck", model, opt)
    out = tmp_path / "w.safetensors"
    out.write_text("keep me")
    cmd = [sys.executable, "-m", "zero_adam.consolidate"]
    for args, expected in [([str(path), str(out)], "exists; pass --overwrite"),
                           ([str(tmp_path / "missing"), str(tmp_path / "x.st")], "no checkpoint at"),
                           ([str(path), str(tmp_path / "no/dir/x.st")], "does not exist")]:
        run = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert out.read_text() == "keep me"


RSS_SCRIPT = """
import sys
import zero_adam.consolidate as c
if sys.argv[1] == "export":
    c.main(sys.argv[2:])
else:
    c.Checkpoint(sys.argv[2])
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, inherited over exec)
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def test_consolidation_peak_memory_is_one_tensor_not_the_model(tmp_path):
    """Peak RSS of exporting 12 vs 36 layers of the same 8 MiB tensors: 192 MiB more weights (and
    twice that of moments) must not raise it by more than a few tensors (allocator noise ~20 MiB)."""
    def peak(n_layers):
        layers = torch.nn.Sequential(*[torch.nn.Linear(2048, 1024, bias=False) for _ in range(n_layers)])
        path = checkpoint.save(tmp_path / f"n{n_layers}", layers, ZeroAdamW(layers.named_parameters()))
        out = tmp_path / f"n{n_layers}"
        args = ["export", str(path), f"{out}.safetensors", "--optimizer", f"{out}.pt"]
        run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    small, big = peak(12), peak(36)
    extra_model = 24 * 1024 * 2048 * 4
    print(f"peak RSS {small / 2**20:.0f} MiB (96 MiB model) vs {big / 2**20:.0f} MiB (288 MiB model)")
    assert big - small < 48 * 2**20 < extra_model / 3


class _Tied(torch.nn.Module):
    """GPT-2's tied input and output embeddings (one tensor, two state-dict names)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(50, 12)
        self.lm_head = torch.nn.Linear(12, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.wte(x))


def test_tied_weights_export_under_every_name(tmp_path):
    torch.manual_seed(0)
    model = _Tied()
    opt = ZeroAdamW(model.named_parameters(), lr=1e-2)
    x = torch.randint(0, 50, (4, 7))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    path = checkpoint.save(tmp_path / "ck", model, opt)
    out = tmp_path / "w.safetensors"
    assert consolidate([str(path), str(out)]) == 0
    state = load_file(out)
    assert set(state) == {"wte.weight", "lm_head.weight"}
    fresh = _Tied()
    fresh.load_state_dict(state, strict=True)   # the README's strict load
    assert torch.equal(fresh.wte.weight, model.wte.weight) and fresh.lm_head.weight is fresh.wte.weight
    opt.close()


def test_compact_state_dict_saves_one_parameter_not_its_bucket(tmp_path):
    import io

    from zero_adam import compact_state_dict
    model, opt = _trained(param_dtype=None)
    one = {"scale": model.state_dict()["scale"]}
    whole, small = io.BytesIO(), io.BytesIO()
    torch.save(one, whole)                                   # a view: its bucket's storage goes too
    torch.save({"scale": compact_state_dict(model)["scale"]}, small)
    assert whole.getbuffer().nbytes > 4 * 1000 and small.getbuffer().nbytes < 2000
    assert torch.equal(compact_state_dict(model)["scale"], model.scale)
