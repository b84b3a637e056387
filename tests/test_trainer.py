"""transformers.Trainer with ZeroAdamW (``zero_adam.integrations.transformers``) against plain
Trainer (DDP + fused AdamW) on 2 CPU processes, resumed on 2 and on 1 process, and the README's
script as users run it (optional extras: skipped without transformers/accelerate)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--steps", "8", "--save-steps", "4", "--batch", "2"]


def torchrun(nproc: int, *args: str, script: str = "tests/trainer_cases.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert "Traceback" not in done.stderr, done.stderr[-6000:]
    return done


def spec(tmp: Path, name: str, *args: str) -> str:
    return f"{name}:" + " ".join([*STEPS, "--output-dir", str(tmp / name), *args])


def resume_copy(tmp: Path, src: str, name: str) -> None:
    """A fresh output folder holding only ``src``'s step-4 checkpoint (resume picks the newest)."""
    shutil.copytree(tmp / src / "checkpoint-4", tmp / name / "checkpoint-4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Plain and zero runs of GPT-2 and Llama (2 processes x 2 micro-steps); then the zero runs
    resumed from step 4 on 2 processes, GPT-2 on 1 process with twice the accumulation (the same
    global batch), and a zero run resumed from the *plain* run's step-4 checkpoint."""
    tmp = tmp_path_factory.mktemp("trainer")
    torchrun(2, str(tmp), *(spec(tmp, f"{mode}-{m}", "--model", m, *(["--plain"] if mode == "plain" else []))
                            for m in ("gpt2", "llama") for mode in ("plain", "zero")))
    for m in ("gpt2", "llama"):
        resume_copy(tmp, f"zero-{m}", f"resumed2-{m}")
    damaged = tmp / "resumed2-gpt2" / "checkpoint-6"  # newer, cut short mid-save: resume skips it
    shutil.copytree(tmp / "resumed2-gpt2" / "checkpoint-4", damaged)
    next((damaged / "zero_adam").glob("*.distcp")).unlink()
    resume_copy(tmp, "plain-gpt2", "joined-gpt2")
    torchrun(2, str(tmp), *(spec(tmp, f"resumed2-{m}", "--model", m, "--resume") for m in ("gpt2", "llama")),
             spec(tmp, "joined-gpt2", "--resume"))
    resume_copy(tmp, "zero-gpt2", "resumed1-gpt2")
    torchrun(1, str(tmp), spec(tmp, "resumed1-gpt2", "--resume", "--accum", "4"))
    return {p.stem: {**json.loads(p.read_text()), "dir": tmp / p.stem} for p in tmp.glob("*.json")}


def losses(run: dict, first: int = 1) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in run["history"] if r["step"] >= first}


def max_diff(a: dict, b: dict, i: int) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s][i] - b[s][i]) for s in a)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_zero_trainer_matches_plain_trainer_every_step(runs, model):
    """Per-step loss within 1e-4 of Trainer + DDP + AdamW(fused=True), and the logged grad_norm is
    zero-adam's global norm (the same value DDP's clip_grad_norm_ reports), with clipping on."""
    zero, plain = runs[f"zero-{model}"], runs[f"plain-{model}"]
    assert zero["optimizer"] == "ZeroAdamW" and plain["optimizer"] == "AdamW"
    assert zero["wrapped"] != "DistributedDataParallel" and plain["wrapped"] == "DistributedDataParallel"
    z, p = losses(zero), losses(plain)
    assert len(z) == 8 and max_diff(z, p, 0) < 1e-4 and max_diff(z, p, 1) < 1e-4, (z, p)
    assert all(n > 1.0 for _, n in z.values())  # max_grad_norm=1.0 clipped every step
    assert z[8][0] < z[1][0] - 0.5


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_resume_on_the_same_process_count_continues_exactly(runs, model):
    """(GPT-2's folder also holds a newer checkpoint-6 missing a shard: resume=True skips it.)"""
    zero, resumed = losses(runs[f"zero-{model}"], 5), losses(runs[f"resumed2-{model}"], 5)
    assert len(resumed) == 4
    assert max_diff(zero, resumed, 0) <= 1e-6 and max_diff(zero, resumed, 1) <= 1e-6, (zero, resumed)


def test_resume_on_one_process_continues_the_two_process_curve(runs):
    zero, resumed = losses(runs["zero-gpt2"], 5), losses(runs["resumed1-gpt2"], 5)
    assert max_diff(zero, resumed, 0) < 1e-5 and max_diff(zero, resumed, 1) < 1e-5, (zero, resumed)


def test_a_plain_trainer_checkpoint_continues_under_zero_adam(runs):
    """optimizer.pt of a DDP + AdamW run: its moments and step join ZeroAdamW (interop)."""
    plain, joined = losses(runs["plain-gpt2"], 5), losses(runs["joined-gpt2"], 5)
    assert max_diff(plain, joined, 0) < 1e-4, (plain, joined)
    assert (runs["joined-gpt2"]["dir"] / "checkpoint-8" / "zero_adam" / "zero_adam.json").is_file()


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_save_model_is_a_normal_hugging_face_checkpoint(runs, model):
    """from_pretrained loads the zero run's final folder (GPT-2's tied lm_head stays tied) and
    its weights are the plain run's to fp32 rounding; checkpoint-N holds every rank's shard."""
    from transformers import AutoModelForCausalLM
    zero = AutoModelForCausalLM.from_pretrained(runs[f"zero-{model}"]["dir"] / "final")
    plain = AutoModelForCausalLM.from_pretrained(runs[f"plain-{model}"]["dir"] / "final")
    if model == "gpt2":
        assert zero.lm_head.weight is zero.transformer.wte.weight
    ours, theirs = zero.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-4
    ckpt = runs[f"zero-{model}"]["dir"] / "checkpoint-8"
    assert len(list((ckpt / "zero_adam").glob("*.distcp"))) == 2 and not (ckpt / "optimizer.pt").exists()


def test_the_readme_script_runs_under_torchrun(tmp_path):
    """launch/hf_trainer.py exactly as the README shows it (fewer steps)."""
    done = torchrun(2, "--steps", "3", "--save-steps", "3", "--output-dir", str(tmp_path),
                    script="launch/hf_trainer.py")
    assert "-> " in done.stdout and (tmp_path / "final" / "model.safetensors").is_file()


def test_arguments_that_would_bypass_zero_adam_are_refused():
    from transformers import TrainingArguments

    from zero_adam.integrations.transformers import check_args
    with pytest.raises(ValueError) as e:
        check_args(TrainingArguments("/tmp/unused", use_cpu=True, fp16=False, optim="sgd"))
    assert "optim='sgd'" in str(e.value) and "adamw_torch_fused" in str(e.value)


def test_optimizer_from_args_uses_trainers_groups_and_hyperparameters():
    """One process, no process group: the same decay rule and hyperparameters as Trainer's AdamW."""
    from transformers import Trainer, TrainingArguments

    from launch.hf_trainer import build_model
    from zero_adam.integrations.transformers import optimizer_from_args
    model = build_model("llama", 16)
    args = TrainingArguments("/tmp/unused", use_cpu=True, learning_rate=2e-3, weight_decay=0.05,
                             adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6)
    decay = Trainer.get_decay_parameter_names(None, model)
    opt = optimizer_from_args(model, args, decay, stage=1)
    names = {id(p): n for n, p in model.named_parameters()}
    g0, g1 = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert set(g0) == set(decay) and all("norm" in n for n in g1) and g1
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6
    with pytest.raises(ValueError, match="learning_rate"):
        optimizer_from_args(build_model("gpt2", 16), args, decay, lr=1.0)
    opt.close()


def test_shipped_accelerate_config_launches_two_processes(runs, tmp_path):
    """``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml``: the first three steps
    equal the 2-process torchrun run's (one process would see half the global batch)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
           "--main_process_port", str(port), str(ROOT / "launch/hf_trainer.py"), "--steps", "3",
           "--batch", "2", "--save-steps", "4", "--output-dir", str(tmp_path),
           "--losses", str(tmp_path / "l.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    got = {r["step"]: (r["loss"], r["grad_norm"]) for r in json.loads((tmp_path / "l.json").read_text())}
    want = {s: v for s, v in losses(runs["zero-gpt2"]).items() if s <= 3}
    assert max_diff(got, want, 0) < 1e-6, (got, want)
