"""Write docs/benchmarks.md (targets, one table per configuration) and docs/benchmarks.png from
bench/run.py's summary. Every verdict is computed from the run's own numbers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MIB = 2 ** 20
DEFAULTS = "zero-adam-2"   # ZeroAdamW(params, stage=2) with the library's defaults


def write(path: Path, summary: dict) -> None:
    setup, configs, field = summary["setup"], summary["configs"], summary.get("field")
    first = next(iter(configs.values())) if configs else field
    lines = [
        "# Benchmarks",
        "",
        f"Reproduce: `{setup['command']}` (or `make bench`); {first['world_size']} ranks on "
        f"{setup['device']}, {setup['minutes']:.0f} minutes, {setup['date']}. Raw numbers: "
        "`benchmarks.json`.",
        "",
        "Every method trains the same model from the same seed on the same data, AdamW (lr 1e-3, betas "
        "0.9/0.95, weight decay 0.1) with global-norm clipping at 1.0. `floor`: each rank trains alone "
        "(forward, backward, clipping, fused AdamW over the whole model) with no collective at all, the "
        "time no data-parallel method can beat; `zero-adam-2` is `ZeroAdamW(params, stage=2)` with the "
        "library's defaults; `:no-overlap` and `:ar-ar` change one default each (parameters gathered "
        "inside `step()`; both directions as all-reduces, the gloo choice before exchanges).",
        "",
        f"Timing: one job per configuration for the verdict (floor, DDP, zero-adam-2; "
        f"{setup['rounds']} rounds) and one job for the whole field ({setup.get('field', '-')}, "
        f"{setup.get('field_rounds', '-')} rounds). Each round runs {setup['block']} consecutive "
        "steps of every method in turn (rotating order; the first step of each block untimed, so a "
        "timed step starts where a training loop's does, with the previous step's overlapped "
        "communication in flight; the block's communication finished untimed before the next "
        f"method), after {setup['warmup']} warm-up round(s). Medians over the timed steps; `vs DDP` "
        "and `vs floor` are medians of per-round ratios, `above floor` the median per-round "
        "difference: what the method's communication and bookkeeping cost. In brackets after `vs "
        "DDP`: the 95% interval of that median (sign test over the per-step ratios; with few rounds "
        "it is close to their whole range, as in the field's table).",
        "",
        *targets(summary),
    ]
    for key, c in configs.items():
        lines += ["", *config_table(key, c)]
    if field:
        lines += ["", *config_table(f"All methods, {setup['field']}", field)]
    lines += ["", *memory_table(summary), "", *kernel_lines(summary["kernel"]), "",
              "![step time relative to DDP](benchmarks.png)"]
    extra = path.parent / "benchmarks_notes.md"
    if extra.exists():
        lines += ["", extra.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")
    chart(path.with_suffix(".png"), configs, field)


def _fmt_ratio(v: float | None, ci: list[float] | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _sent(way: dict[str, float], n: int) -> str:
    if not way:
        return "-"
    return ", ".join(f"{v / n:.2f} ({k})" for k, v in sorted(way.items()))


def config_table(key: str, c: dict) -> list[str]:
    rows = c["methods"]
    n = next(iter(rows.values()))["params"]
    lines = [f"## {key}: {model_name(c['model'])}, {n / 1e6:.1f}M FP32 parameters, micro-batch "
             f"{c['micro_batch']} x 128 tokens per rank", "",
             "| method | step (s), median [IQR] | vs DDP [95% interval] | vs floor | above floor (ms) | "
             "bytes sent / param / step: gradients | parameters | loss after last step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in rows.items():
        above = "-" if r["over_floor_s"] is None else f"{r['over_floor_s'] * 1e3:.0f}"
        lines.append(
            f"| {m} | {r['step_s']:.3f} [{r['step_s_iqr'][0]:.3f}-{r['step_s_iqr'][1]:.3f}] | "
            f"{_fmt_ratio(r['ratio_to_ddp'], r.get('ratio_to_ddp_ci'))} | "
            f"{_fmt_ratio(r['ratio_to_floor'])} | {above} | "
            f"{_sent(r['sent']['gradients'], n)} | {_sent(r['sent']['parameters'], n)} | "
            f"{r['final_loss']:.5f} |")
    return lines


def model_name(model: str) -> str:
    return {"llama": "Llama (RMSNorm, rotary GQA attention, SwiGLU)",
            "gpt": "GPT with `nn.MultiheadAttention` (LayerNorm, learned positions, GELU)"}.get(model, model)


def memory_table(summary: dict) -> list[str]:
    field = summary.get("field") or next(iter(summary["configs"].values()))
    rss, rows = summary.get("peak_rss", {}), field["methods"]
    n, world = next(iter(rows.values()))["params"], field["world_size"]
    lines = [f"## Optimizer state ({field['model']} x{field['micro_batch']})", "",
             "| method | optimizer state / rank | bytes/param |"
             + (" peak RSS / rank (own job) |" if rss else ""),
             "| --- | --- | --- |" + (" --- |" if rss else "")]
    for m, r in rows.items():
        peak = (f" {rss[m] / MIB:.0f} MiB |" if m in rss else " - |") if rss else ""
        lines.append(f"| {m} | {r['state_bytes'] / MIB:.1f} MiB | {r['state_bytes'] / n:.2f} |{peak}")
    lines += ["", "AdamW's state is 8 bytes/param (12 with a separate FP32 master); at "
              f"N={world} ZeRO shards it to 8/N = {8 / world:.2f}. Peak memory per method and the largest "
              "model each trains: `docs/capacity.md`. Bytes sent are what a rank sends per "
              "step: a ring all-reduce 2(N-1)/N x the tensor, reduce-scatter and all-gather (N-1)/N x "
              "the full tensor, broadcast the tensor, a point-to-point send its tensor "
              "(`bench/comm_count.py`)."]
    return lines


def kernel_lines(k: dict) -> list[str]:
    return [
        "## Local step bandwidth", "",
        f"Fused AdamW (`zero_adam.kernel.adamw_`) over one flat shard of {k['numel']:,} FP32 elements on "
        f"{k['device']} with {k['threads']} thread(s): {k['fused_flat_s'] * 1e3:.1f} ms, "
        f"{k['fused_params_per_s'] / 1e9:.2f} G params/s, {k['fused_GBps']:.1f} GB/s of the 28 bytes/param "
        f"it must move, against {k['stream_GBps']:.1f} GB/s for `x.mul_(1)` (in-place streaming): "
        f"**{k['fused_vs_stream']:.2f}x the streaming bandwidth**. The same update as "
        f"`torch.optim.AdamW(foreach=True)` over 16 parameters takes {k['foreach_over_fused']:.1f}x longer; "
        f"fused over 16 pieces instead of one flat shard: {k['fused_16_pieces_s'] * 1e3:.1f} ms."]


def bracket(ci: Sequence[float], scale: float = 1.0, fmt: str = ".3f") -> str:
    """'[lo, hi]': a 95% interval as every table of the benchmarks prints it."""
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def _interval(ci: list[float] | None, limit: float, scale: float = 1.0, fmt: str = ".3f") -> str:
    """' [lo, hi]' and ' tie' when it holds ``limit`` (the run cannot tell the methods apart)."""
    if not ci:
        return ""
    return " " + bracket(ci, scale, fmt) + (" tie" if ci[0] <= limit <= ci[1] else "")


def verdict(value: float | None, limit: float, unit: str = "x", ci: list[float] | None = None) -> str:
    """Met or missed by the median, with its 95% interval when the run has one."""
    if value is None:
        return "not measured in this run"
    return f"**{'met' if value <= limit else 'missed'}**, {value:.3f}{unit}" + _interval(ci, limit)


def _paired(z: dict) -> str:
    """zero-adam's minus DDP's time per round (ms), with its 95% interval when the run has one."""
    ci = _interval(z.get("minus_ddp_ci"), 0, 1e3, "+.0f")
    return f"paired per round {z['minus_ddp_s'] * 1e3:+.0f}{ci}"


def targets(summary: dict) -> list[str]:
    """The targets, judged per configuration from this run's numbers."""
    lines = ["## Targets (library defaults: `ZeroAdamW(params, stage=2)`)", "",
             "| configuration | zero-adam-2 vs DDP (<= 1.0x) | above floor, ms: zero-adam-2 vs DDP "
             "(medians); their difference paired per round, the floor cancelling (<= 0) | "
             "vs DeepSpeed ZeRO-2 | losses agree (all but floor) |", "| --- | --- | --- | --- | --- |"]
    for key, c in summary["configs"].items():
        rows = c["methods"]
        z, d, ds = rows.get(DEFAULTS), rows.get("ddp"), rows.get("deepspeed-2")
        losses = [r["final_loss"] for m, r in rows.items() if m != "floor"]
        over = "-"
        if z and d and z["over_floor_s"] is not None:
            paired = z.get("minus_ddp_s")
            ok = "met" if (paired if paired is not None else z["over_floor_s"] - d["over_floor_s"]) <= 0 \
                else "missed"
            over = f"**{ok}**, {z['over_floor_s'] * 1e3:.0f} vs {d['over_floor_s'] * 1e3:.0f}"
            if paired is not None:
                over += "; " + _paired(z)
        vs_ds = "-"
        if z and ds:
            vs_ds = f"{z['step_s'] / ds['step_s']:.3f}x (DeepSpeed {ds['ratio_to_ddp']:.3f}x DDP)"
        ratio = verdict(z and z["ratio_to_ddp"], 1.0, ci=z and z.get("ratio_to_ddp_ci"))
        lines.append(f"| {key} | {ratio} | {over} | {vs_ds} | "
                     f"{max(losses) - min(losses):.1e} ({len(losses)} methods) |")
    if any(c["methods"].get(DEFAULTS, {}).get("ratio_to_ddp_ci") for c in summary["configs"].values()):
        lines += ["", "In brackets: the 95% interval of each median (sign test over the timed steps' "
                  "per-round values). `tie`: the interval holds the limit, so this run cannot tell "
                  "zero-adam from DDP there; a median on the right side of the limit is then luck as "
                  "much as speed."]
    z = {k: c["methods"].get(DEFAULTS) for k, c in summary["configs"].items()}
    coll = next((r["collectives"] for r in z.values() if r and r.get("collectives")), None)
    if coll:
        lines += ["", f"zero-adam-2's defaults on this backend: gradients by `{coll['gradients']}`, "
                  f"parameters by `{coll['parameters']}`, all-gather overlapped with the next forward: "
                  f"{'yes' if coll['overlap_gather'] else 'no'}; {coll['buckets']} buckets."]
    return lines


def chart(path: Path, configs: dict, field: dict | None = None) -> None:
    """Left: zero-adam-2 and DDP against the floor per configuration; right: the field vs DDP."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(configs)
    shown = [m for m in ("ddp", DEFAULTS) if all(m in c["methods"] for c in configs.values())]
    width = 0.8 / max(1, len(shown))
    for i, m in enumerate(shown):
        vals = [(configs[k]["methods"][m].get("ratio_to_floor") or 0) for k in keys]
        a.bar([j + i * width for j in range(len(keys))], vals, width=width, label=m)
    a.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(keys))], keys)
    a.axhline(1.0, color="k", lw=0.8)
    a.set_ylabel("step time / floor step time (lower is better)")
    a.legend(fontsize=8)
    a.grid(axis="y", alpha=0.3)
    if field:
        names = list(field["methods"])
        colors = ["tab:green" if m.startswith("zero-adam") else "tab:gray" for m in names]
        b.barh(names, [field["methods"][m]["ratio_to_ddp"] or 0 for m in names], color=colors)
        b.axvline(1.0, color="k", lw=0.8)
        b.invert_yaxis()
        b.set_xlabel(f"step time / DDP step time, {field['model']} x{field['micro_batch']}")
        b.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
