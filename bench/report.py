"""Write docs/benchmarks.md (a table) and docs/benchmarks.png (a chart) from bench/run.py's summary."""

from __future__ import annotations

from pathlib import Path

MIB = 2 ** 20


def write(path: Path, summary: dict) -> None:
    rows, setup, k = summary["methods"], summary["setup"], summary["kernel"]
    any_row = next(iter(rows.values()))
    n, world = any_row["params"], any_row["world_size"]
    lines = [
        "# Benchmarks",
        "",
        f"Reproduce: `{setup['command']}` (or `make bench`); {world} ranks on {setup['device']}, "
        f"{setup['minutes']:.0f} minutes. Step times: {setup['reps']} jobs x {setup['steps']} rounds (after "
        f"{setup['warmup']} warm-up rounds) in which every method runs one step in turn on its own copy of "
        "the model, so the shared machine's slow phases hit all methods alike; medians over rounds, ratio "
        "= median of per-round ratios to DDP. Memory, traffic and loss: one separate job per method. "
        "Raw numbers: `benchmarks.json`.",
        "",
        f"Model: Llama-style decoder, {n / 1e6:.1f}M fp32 parameters, micro-batch 8 x 128 tokens per rank, "
        "AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1), global-norm clipping at 1.0 in every method.",
        "",
        "| method | step time (s), median [IQR] | vs DDP | optimizer state / rank | bytes/param | "
        "peak RSS / rank | collective bytes / step / rank | bytes/param | loss after last step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in rows.items():
        comm = sum(r["comm"].values())
        kinds = ", ".join(f"{kind} {v / MIB:.0f}" for kind, v in r["comm"].items())
        ratio = f"{r['ratio_to_ddp']:.2f}x" if r["ratio_to_ddp"] is not None else "-"
        lines.append(
            f"| {m} | {r['step_s']:.3f} [{r['step_s_iqr'][0]:.3f}-{r['step_s_iqr'][1]:.3f}] | {ratio} | "
            f"{r['state_bytes'] / MIB:.1f} MiB | {r['state_bytes'] / n:.2f} | "
            f"{r['peak_rss'] / MIB:.0f} MiB | "
            f"{comm / MIB:.0f} MiB ({kinds}) | {comm / n:.2f} | {r['final_loss']:.5f} |")
    lines += [
        "",
        "Collective bytes are what each rank sends under a ring algorithm: all-reduce 2(N-1)/N x the tensor, "
        "reduce-scatter and all-gather (N-1)/N x the full tensor, broadcast the tensor. DDP's all-reduce "
        "is counted through a comm hook equal to its default; everything else by wrapping "
        "`torch.distributed`'s collectives (`bench/comm_count.py`).",
        "",
        "## Local step bandwidth",
        "",
        f"Fused AdamW (`zero_adam.kernel.adamw_`) over one flat shard of {k['numel']:,} FP32 elements on "
        f"{k['device']} with {k['threads']} thread(s): {k['fused_flat_s'] * 1e3:.1f} ms, "
        f"{k['fused_params_per_s'] / 1e9:.2f} G params/s, {k['fused_GBps']:.1f} GB/s of the 28 bytes/param "
        f"it must move, against {k['stream_GBps']:.1f} GB/s for `x.mul_(1)` (in-place streaming): "
        f"**{k['fused_vs_stream']:.2f}x the streaming bandwidth**. The same update as "
        f"`torch.optim.AdamW(foreach=True)` over 16 parameters takes {k['foreach_over_fused']:.1f}x longer; "
        f"fused over 16 pieces instead of one flat shard: {k['fused_16_pieces_s'] * 1e3:.1f} ms.",
        "",
        "![step time and memory](benchmarks.png)",
        "",
        *targets(summary),
    ]
    extra = path.parent / "benchmarks_notes.md"
    if extra.exists():
        lines += ["", extra.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")
    chart(path.with_suffix(".png"), rows)


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured in this run"
    return f"**{'met' if value <= limit else 'missed'}**, {value:.2f}x"


def targets(summary: dict) -> list[str]:
    """The issue's targets, judged from this run's own numbers so the text cannot drift from the table."""
    rows, ratios, setup = summary["methods"], summary.get("ratios", {}), summary["setup"]
    losses = [r["final_loss"] for r in rows.values()]
    when = setup.get("date", "this run")
    lines = [f"## Targets ({when}, {setup['nproc']} ranks, {setup['device']}, fp32 model)", ""]
    lines.append("- zero-adam stage 2 step time <= 1.0x DDP + fused AdamW: "
                 + verdict(ratios.get("zero-adam-2/ddp"), 1.0) + " (median of per-round ratios).")
    lines.append("- zero-adam stage 2 step time <= 0.5x DeepSpeed ZeRO-2: "
                 + verdict(ratios.get("zero-adam-2/deepspeed-2"), 0.5)
                 + (f"; DeepSpeed ZeRO-2 itself runs at {ratios['deepspeed-2/ddp']:.2f}x DDP here."
                    if ratios.get("deepspeed-2/ddp") else "."))
    z2 = rows.get("zero-adam-2")
    if z2:
        per_param, want = z2["state_bytes"] / z2["params"], 8 / z2["world_size"]
        met = "met" if per_param <= want + 0.01 else "missed"
        lines.append(f"- optimizer state 8/N bytes/param: **{met}**, "
                     f"{per_param:.2f} bytes/param at N={z2['world_size']} (8/N = {want:.2f}).")
    lines.append(f"- losses after the last step agree across all {len(losses)} methods to "
                 f"{max(losses) - min(losses):.1e} (from {min(losses):.5f} to {max(losses):.5f}).")
    return lines


def chart(path: Path, rows: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ratios = [rows[m]["ratio_to_ddp"] or 0 for m in names]
    colors = ["tab:green" if m.startswith("zero-adam") else "tab:gray" for m in names]
    a.barh(names, ratios, color=colors)
    a.axvline(1.0, color="k", lw=0.8)
    a.set_xlabel("step time / DDP step time (lower is better)")
    b.barh(names, [rows[m]["state_bytes"] / MIB for m in names], color=colors)
    b.set_xlabel("optimizer state per rank (MiB)")
    for ax in (a, b):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
