"""Peak RSS of `python -m zero_adam.consolidate` against the size of the model it exports.

    python bench/consolidate_rss.py --layers 32 --rows 4096 --cols 2048   # 1 GiB of fp32 weights

Saves a checkpoint of a stack of Linear layers with ZeroAdamW (one process), then runs the
consolidation (weights and AdamW state) in a fresh process and reports its peak resident memory
next to the same export of a tiny checkpoint (the fixed cost of Python, torch and the code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zero_adam import ZeroAdamW, checkpoint  # noqa: E402

CHILD = """
import sys
import zero_adam.consolidate as c
if sys.argv[1] == "export":
    assert c.main(sys.argv[2:]) == 0
else:
    c.Checkpoint(sys.argv[2])
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, inherited over exec)
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def peak_rss(*args: str) -> tuple[int, float]:
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(run.stdout.split()[-1]), time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        model = torch.nn.Sequential(*[torch.nn.Linear(a.cols, a.rows, bias=False) for _ in range(a.layers)])
        opt = ZeroAdamW(model.named_parameters())
        ckpt = checkpoint.save(Path(tmp) / "ckpt", model, opt)
        tiny = torch.nn.Sequential(*[torch.nn.Linear(64, 32, bias=False) for _ in range(a.layers)])
        small = checkpoint.save(Path(tmp) / "tiny", tiny, ZeroAdamW(tiny.named_parameters()))
        del model, opt
        model_bytes = a.layers * a.rows * a.cols * 4
        base, _ = peak_rss("export", str(small), f"{tmp}/t.safetensors", "--optimizer", f"{tmp}/t.pt")
        peak, secs = peak_rss("export", str(ckpt), f"{tmp}/w.safetensors", "--optimizer", f"{tmp}/adamw.pt")
        out = {"model_bytes": model_bytes, "largest_tensor_bytes": a.rows * a.cols * 4,
               "tiny_export_peak_rss": base, "export_peak_rss": peak, "growth": peak - base, "seconds": secs,
               "written_bytes": os.path.getsize(f"{tmp}/w.safetensors") + os.path.getsize(f"{tmp}/adamw.pt")}
    print(json.dumps(out, indent=1))
    mib = 2 ** 20
    print(f"model {model_bytes / mib:,.0f} MiB (largest tensor {a.rows * a.cols * 4 / mib:.0f} MiB): "
          f"consolidation peak RSS {peak / mib:,.0f} MiB vs {base / mib:,.0f} MiB for a tiny checkpoint "
          f"(+{(peak - base) / mib:,.0f} MiB), {out['written_bytes'] / mib:,.0f} MiB written in {secs:.1f} s")


if __name__ == "__main__":
    main()
