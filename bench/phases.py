"""Where a step's time goes: forward, backward and optimizer step, per method, and how much of it
each rank spent idle (waiting for a peer or the wire) rather than computing.

    torchrun --standalone --nproc-per-node=2 bench/phases.py [--model llama|gpt] [--micro-batch 4]
        [--rounds 16] [--methods floor ddp zero-adam-2 zero-adam-2:no-overlap] [--profile]

Methods are bench/methods.py's, each on its own copy of the model (same seed). Every round runs
3 consecutive steps of each method (order rotating; the first untimed, so the timed ones start
with the previous step's overlapped communication in flight, as in a training loop; the
method's in-flight communication finished untimed before the next method runs), as
bench/run.py does. Per phase: median wall time, and median *idle* time (wall minus the CPU time
of all this process's threads, gloo's included): on CPU ranks that share cores, communication
costs CPU wherever it runs, so what overlap can still win is the idle part. Communication
overlapped with compute shows up inside forward (zero-adam's all-gather waits) or backward
(gradient reductions); "step" holds the optimizer and whatever waits it holds.
``--profile`` then runs two more steps of each under ``torch.profiler`` and prints, per method,
the operators with the most self time on rank 0. The last column is each rank's median CPU time
per step (all its threads) and, in brackets, its idle time: on CPU-bound ranks the slower rank's
CPU sets the pace, and the other rank's surplus shows up as idle time where it next needs the
slower one's data. A second table splits each rank's CPU per step into its main thread (the
training loop) and its other threads (gloo's), and gives the machine's idle core time per step
(``/proc/stat``, all cores; Linux only): time no process used, which overlap could still fill.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import shapes  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import runtime  # noqa: E402

import methods  # noqa: E402

PHASES = ("forward", "backward", "step")


def cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def phase_marks() -> list[tuple[str, float, float]]:
    """Time the phases through comm_count's phase markers, which every method's step() sets:
    returns the list that receives (phase, wall s, CPU s) as they end."""
    import comm_count
    marks: list[tuple[str, float, float]] = []
    original = comm_count.phase

    class timed:
        def __init__(self, name: str) -> None:
            self.name, self.inner = name, original(name)

        def __enter__(self):
            self.inner.__enter__()
            self.t, self.c = time.perf_counter(), cpu_s()

        def __exit__(self, *exc):
            marks.append((self.name, time.perf_counter() - self.t, cpu_s() - self.c))
            return self.inner.__exit__(*exc)
    comm_count.phase = timed
    return marks


def machine_idle_s() -> float | None:
    """Idle core-seconds of the whole machine so far (all cores, /proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[4]) / os.sysconf("SC_CLK_TCK")


class ThreadSplit:
    """Per step: this process's main-thread CPU, its other threads' CPU, and the machine's idle
    core time, each a list of seconds per method."""

    def __init__(self, names: list[str]) -> None:
        self.main = {n: [] for n in names}
        self.other = {n: [] for n in names}
        self.idle = {n: [] for n in names}

    def start(self) -> None:
        self._t = (time.thread_time(), cpu_s(), machine_idle_s())

    def stop(self, name: str) -> None:
        t, c, i = self._t
        main = time.thread_time() - t
        self.main[name].append(main)
        self.other[name].append(cpu_s() - c - main)
        if i is not None:
            self.idle[name].append(machine_idle_s() - i)

    def medians_ms(self) -> dict[str, tuple[float, float, float | None]]:
        med = lambda v: statistics.median(v) * 1e3 if v else None   # noqa: E731
        return {n: (med(self.main[n]), med(self.other[n]), med(self.idle[n])) for n in self.main}


def print_split(per_rank: list[dict]) -> None:
    print("\n| method | main-thread CPU per step, by rank | other threads' CPU, by rank | "
          "machine idle core time per step (rank 0's view) |")
    print("| --- | --- | --- | --- |")
    for name in per_rank[0]:
        main = " / ".join(f"{r[name][0]:.0f}" for r in per_rank)
        other = " / ".join(f"{r[name][1]:.0f}" for r in per_rank)
        idle = per_rank[0][name][2]
        print(f"| {name} | {main} | {other} | {'-' if idle is None else f'{idle:.0f}'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama", choices=["llama", "gpt"])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["floor", "ddp", "zero-adam-2"])
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler operator table")
    a = p.parse_args()
    rt = runtime.init()
    if any(m.startswith("deepspeed") for m in a.methods):
        import deepspeed
        deepspeed.init_distributed(dist_backend=rt.backend)
    marks, runs = phase_marks(), {}
    for name in a.methods:
        torch.manual_seed(0)
        runs[name] = methods.build(name, shapes.build(a.model).to(rt.device), rt.device, a.micro_batch)
    wall = {n: {ph: [] for ph in PHASES} for n in runs}
    idle = {n: {ph: [] for ph in PHASES} for n in runs}
    g = torch.Generator().manual_seed(rt.rank)
    split = ThreadSplit(list(runs))
    for r in range(a.rounds + 1):
        for name in a.methods[r % len(a.methods):] + a.methods[:r % len(a.methods)]:
            dist.barrier()
            for k in range(3):
                x = torch.randint(0, shapes.VOCAB, (a.micro_batch, shapes.SEQ), generator=g)
                marks.clear()
                split.start()
                runs[name].step(x.to(rt.device), x.to(rt.device))
                if r and k:
                    split.stop(name)
                    for ph, w, c in marks:
                        wall[name][ph].append(w)
                        idle[name][ph].append(w - c)
            runs[name].finish()
    cpu = {n: (statistics.median(sum(v) for v in zip(*((w - i for w, i in zip(wall[n][ph], idle[n][ph]))
                                                        for ph in PHASES))),
               statistics.median(sum(v) for v in zip(*(idle[n][ph] for ph in PHASES)))) for n in runs}
    gathered: list = [None] * rt.world_size
    dist.all_gather_object(gathered, (cpu, split.medians_ms()))
    per_rank, splits = [g[0] for g in gathered], [g[1] for g in gathered]
    if rt.is_main:
        print(f"{a.model} x{a.micro_batch}, {rt.world_size} ranks, {a.rounds} rounds: median ms (idle ms); "
              "rank 0's phases, and every rank's CPU and idle time per step")
        print("| method | forward | backward | step | total | CPU (idle) per step, by rank |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in runs:
            med = [(statistics.median(wall[name][ph]), statistics.median(idle[name][ph])) for ph in PHASES]
            cells = [f"{w * 1e3:.0f} ({i * 1e3:.0f})" for w, i in med]
            total = [sum(v) for v in zip(*(wall[name][ph] for ph in PHASES))]
            ranks = " / ".join(f"{r[name][0] * 1e3:.0f} ({r[name][1] * 1e3:.0f})" for r in per_rank)
            print(f"| {name} | " + " | ".join(cells) + f" | {statistics.median(total) * 1e3:.0f} | {ranks} |")
        print_split(splits)
    if a.profile:
        profile(runs, x, rt.is_main)
    runtime.shutdown()


def profile(runs: dict, x: torch.Tensor, is_main: bool) -> None:
    """Two steps per method under the torch profiler; rank 0 prints the top operators by self time."""
    for name, run in runs.items():
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                run.step(x, x)
        run.finish()
        if is_main:
            print(f"\n### {name}: top operators by self CPU time (2 steps, rank 0)\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                            max_name_column_width=48))


if __name__ == "__main__":
    main()
