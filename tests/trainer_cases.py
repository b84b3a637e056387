"""Run under torchrun by tests/test_trainer.py: several Trainer runs of ``launch/hf_trainer.py`` in
one launch (start-up costs more than these tiny runs), each one's log history written as JSON.

    python -m torch.distributed.run --nproc-per-node=2 tests/trainer_cases.py DIR NAME:ARGS...

``NAME:ARGS`` is a run name and the example's command-line arguments separated by spaces, e.g.
``zero-gpt2:--model gpt2 --output-dir D``. Rank 0 writes DIR/NAME.json with the log history and
what the trainer actually ran (optimizer class, whether the model was wrapped).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import hf_trainer  # noqa: E402


def run(out: Path, name: str, argv: list[str]) -> None:
    a = hf_trainer.parser().parse_args(argv)
    trainer = hf_trainer.make_trainer(a)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(f"{a.output_dir}/final")
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    facts = {"optimizer": type(opt).__name__, "wrapped": type(trainer.model_wrapped).__name__,
             "history": [r for r in trainer.state.log_history if "loss" in r]}
    if trainer.is_world_process_zero():
        (out / f"{name}.json").write_text(json.dumps(facts))
    trainer.accelerator.wait_for_everyone()
    del trainer, opt  # DDP's reducer and ZeroAdamW's hooks go while the process group is alive
    gc.collect()


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, args = spec.partition(":")
        run(out, name, args.split())


if __name__ == "__main__":
    main()
