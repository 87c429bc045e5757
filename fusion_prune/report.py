"""Reports and plots. Figures are written through a temp file and a rename, never half-written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from fusion_prune.utils import atomic_file, write_text_atomic


def _save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` atomically and close it (also when writing fails)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def normalise_columns(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Min-max normalise each column to [0, 1] across layers (a constant column becomes 0.5)."""
    x = table[columns].astype(float)
    lo, hi = x.min(), x.max()
    span = (hi - lo).replace(0, np.nan)
    return ((x - lo) / span).fillna(0.5)


def plot_signals_heatmap(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Heatmap of layers (rows) x signals (columns), each signal min-max normalised across layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c not in ("layer", "orig_layer")]
    norm = normalise_columns(table, columns)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(columns), 1.2 + 0.42 * len(table)))
    im = ax.imshow(norm.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    labels = [f"{int(l)} (orig {int(o)})" if l != o else str(int(l))
              for l, o in zip(table["layer"], table["orig_layer"])]
    ax.set_yticks(range(len(table)), labels)
    ax.set_ylabel("layer")
    for i in range(len(table)):
        for j, c in enumerate(columns):
            v = table[c].iloc[i]
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6.5,
                    color="white" if norm.iloc[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, label="min-max across layers")
    ax.set_title(title or "layer signals")
    return _save_figure(fig, path)


def write_table(table: pd.DataFrame, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a table as parquet or CSV (by suffix), atomically; ``overwrite`` False refuses an existing file."""
    from fusion_prune.errors import BadInputError

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise BadInputError(f"The output file {str(path)!r} must end in .parquet or .csv. Got {suffix!r}.")
    with atomic_file(path, overwrite) as tmp:
        table.to_parquet(tmp, index=False) if suffix == ".parquet" else table.to_csv(tmp, index=False)
    return path


def plot_lodo(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Regret of each method on each held-out dataset (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pivot = table.pivot_table(index="held_out", columns="method", values="regret", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(pivot), 3.6))
    pivot.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("regret (best drop-one accuracy - chosen)")
    ax.set_xlabel("held-out dataset")
    ax.set_title("leave-one-dataset-out: layer choice regret (lower is better)")
    ax.legend(fontsize=7, ncols=2)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return _save_figure(fig, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _name(spec) -> str:
    return Path(str(spec)).name or str(spec)


def _plot_per_step(report: dict, path: str | os.PathLike, teacher: float, series: list[tuple[list, str, str]],
                   ylabel: str, title: str, log: bool = False, budget: float | None = None, **title_kw) -> Path:
    """A metric against the depth reached after each step (x: layers, inverted, integer ticks), the
    teacher dashed and, when given, the budget's limit dotted.

    ``series``: (values per step, matplotlib format, legend label); None values are not drawn.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    depth = [e["layers_before"] - len(e["dropped"]) for e in report["history"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.axhline(teacher, color="grey", ls="--", label=f"teacher ({report['teacher_layers']} layers)")
    if budget is not None:
        ax.axhline(budget, color="tab:red", ls=":", label="budget limit")
    for values, fmt, label in series:
        ax.plot(depth, [np.nan if v is None else v for v in values], fmt, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(report["teacher_layers"] + 0.5, min([*depth, report["teacher_layers"]]) - 0.5)
    ax.legend(fontsize=8)
    ax.set_title(title, **title_kw)
    return _save_figure(fig, path)


def plot_accuracy(report: dict, path: str | os.PathLike) -> Path:
    """Validation accuracy against depth after each step (and the measured drop-one accuracy before recovery)."""
    h = report["history"]
    series = [([e["validation_accuracy_after_finetune"] for e in h], "o-", "after short fine-tune")]
    measured = [e["measured_acc_after_drop"] for e in h]
    if any(m is not None for m in measured):
        series.append((measured, "x:", "right after the drop"))
    teacher = report["info"]["teacher_validation_accuracy"]
    title = f"{_name(report['model'])} on {_name(report['dataset'])}: validation accuracy ({report['strategy']})"
    return _plot_per_step(report, path, teacher, series, "validation accuracy", title,
                          budget=report["info"].get("budget_limit"), fontsize=9)


def depth_table(report: dict) -> pd.DataFrame:
    """One row per depth reached (the teacher first): parameters, measured throughput and its
    speed-up, and the validation metric after that step."""
    info, lm = report["info"], report.get("task") == "causal-lm"
    key, teacher_key = (("validation_perplexity", "teacher_validation_perplexity") if lm
                        else ("validation_accuracy_after_finetune", "teacher_validation_accuracy"))
    rows = [{"layers": report["teacher_layers"], "parameters": info.get("teacher_parameters"),
             "throughput": info.get("teacher_throughput"), "validation": info.get(teacher_key)}]
    rows += [{"layers": e["layers_before"] - len(e["dropped"]), "parameters": e.get("parameters"),
              "throughput": e.get("throughput"), "validation": e[key]} for e in report["history"]]
    t = pd.DataFrame(rows)
    t["speedup"] = t["throughput"] / t["throughput"].iloc[0] if t["throughput"].notna().all() else np.nan
    return t


def plot_size_speed(report: dict, path: str | os.PathLike) -> Path:
    """Parameters (millions) and measured forward throughput against depth."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    t = depth_table(report)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(t["layers"], t["parameters"] / 1e6, "o-", color="tab:blue", label="parameters")
    ax.set_xlabel("layers")
    ax.set_ylabel("parameters (millions)", color="tab:blue")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(t["layers"].max() + 0.5, t["layers"].min() - 0.5)
    ax2 = ax.twinx()
    ax2.plot(t["layers"], t["throughput"], "s--", color="tab:orange", label="throughput")
    ax2.set_ylabel(report["info"].get("throughput_unit", "examples/s") + " (one forward, measured)",
                   color="tab:orange")
    ax.set_title(f"{_name(report['model'])}: size and measured speed by depth", fontsize=9)
    return _save_figure(fig, path)


def _depth_lines(report: dict) -> list[str]:
    t = depth_table(report)
    if t["parameters"].isna().any():  # a report from before these were recorded
        return []
    unit = report["info"].get("throughput_unit", "examples/s")
    metric = "validation perplexity" if report.get("task") == "causal-lm" else "validation accuracy"
    lines = [f"| layers | parameters | {unit} (measured) | speed-up | {metric} |", "|---|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(f"| {r.layers} | {r.parameters:,} | {r.throughput:.1f} | {r.speedup:.2f}x | {r.validation:.4f} |")
    lines.append("")
    if report.get("accuracy_to_size") is not None:
        lines += [f"Accuracy-to-size ratio {report['accuracy_to_size']:.3f}: the fraction of the teacher's test "
                  "accuracy kept, divided by the fraction of its parameters kept (above 1: accuracy shrank less "
                  "than the model).", ""]
    b = report.get("budget")
    if b:
        stop = b["stopped"]
        lines += [f"Budget `{b['parameter']}` = {b['value']}: " + (
            f"removing original layer(s) {stop['dropped_orig']} at {stop['layers_before']} layers broke it, so that "
            f"step was undone and the run stopped at {report['student_layers']} layers." if stop
            else "never broken; the run stopped at the target depth."), ""]
    lines += ["![size and speed](plots/size_speed.png)", ""]
    return lines


def plot_kept_layers(report: dict, path: str | os.PathLike) -> Path:
    """Which original layers remain after each step."""
    plt = _plt()
    L = report["teacher_layers"]
    rows = [list(range(L))] + [e["kept_layers"] for e in report["history"]]
    grid = np.array([[1.0 if l in r else 0.0 for l in range(L)] for r in rows])
    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * L, 1.0 + 0.35 * len(rows)))
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=1.3, aspect="auto")
    ax.set_xticks(range(L))
    ax.set_yticks(range(len(rows)), ["teacher"] + [f"step {e['step']}" for e in report["history"]])
    ax.set_xlabel("original layer (green: kept)")
    ax.set_title(f"{_name(report['model'])}: kept layers after each step ({report['strategy']})", fontsize=9)
    return _save_figure(fig, path)


def plot_perplexity(report: dict, path: str | os.PathLike) -> Path:
    """Validation perplexity after each step of a causal-LM run (log scale), teacher dashed."""
    h = report["history"]
    title = f"{_name(report['model'])} on {_name(report['dataset'])}: validation perplexity ({report['strategy']})"
    teacher = report["info"]["teacher_validation_perplexity"]
    return _plot_per_step(report, path, teacher, [([e["validation_perplexity"] for e in h], "o-", "after each removal")],
                          "validation perplexity", title, log=True, budget=report["info"].get("budget_limit"),
                          fontsize=9)


def _lm_report_lines(report: dict) -> list[str]:
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [
        f"# fusionprune compress (causal LM): {report['model']} on {report['dataset']}", "",
        f"Strategy `{report['strategy']}`: {report['teacher_layers']} -> {report['student_layers']} layers, "
        f"kept original layers {report['kept_layers']}.", "",
        f"Test perplexity over {report['test_tokens']} predicted tokens (windows of "
        f"{report['config']['max_length']} tokens, no overlap; see fusion_prune/causal_lm.py):", "",
        "| stage | test perplexity |", "|---|---|",
        f"| teacher | {report['teacher_perplexity']:.3f} |",
        f"| pruned, before healing | {report['pruned_perplexity']:.3f} |",
        f"| healed ({(report.get('heal') or {}).get('method', 'none')}, {(report.get('heal') or {}).get('steps', 0)} "
        f"steps) | {report['healed_perplexity']:.3f} |",
        f"| after distillation | {report['student_perplexity']:.3f} |" if report.get("distill") else "", "",
    ]
    if report.get("zero_shot"):
        lines += ["| zero-shot accuracy | teacher | pruned | final | majority share |", "|---|---|---|---|---|"]
        for name, z in report["zero_shot"].items():
            lines.append(f"| {name} | {z['teacher']['accuracy']:.3f} | {z['pruned']['accuracy']:.3f} | "
                         f"{z['student']['accuracy']:.3f} | {z['teacher']['majority_share']:.3f} |")
        lines.append("")
    lines += [f"Wall time {report['wall_seconds']:.0f} s; time spent choosing layers {report['selection_seconds']:.1f} s.",
              "", "| step | layers | dropped (original) | measured NLL right after | validation perplexity |",
              "|---|---|---|---|---|"]
    for e in report["history"]:
        lines.append(f"| {e['step']} | {e['layers_before']} | {e['dropped_orig']} | "
                     f"{fmt(e['measured_nll_after_drop'])} | {e['validation_perplexity']:.3f} |")
    lines += ["", "![perplexity](plots/perplexity.png)", "", *_depth_lines(report),
              "![kept layers](plots/kept_layers.png)", ""]
    return lines


def write_compress_report(report: dict, folder: str | os.PathLike) -> None:
    """report.json, report.md and plots/ in ``folder``."""
    from fusion_prune.utils import write_json_atomic

    folder = Path(folder)
    if report.get("task") == "causal-lm":
        write_json_atomic(folder / "report.json", report)
        plot_perplexity(report, folder / "plots" / "perplexity.png")
        plot_kept_layers(report, folder / "plots" / "kept_layers.png")
        if report["info"].get("teacher_parameters") is not None:
            plot_size_speed(report, folder / "plots" / "size_speed.png")
        for e in report["history"]:
            if e["signals"] is not None:
                plot_signals_heatmap(pd.DataFrame(e["signals"]), folder / "plots" / f"signals_step{e['step']}.png",
                                     title=f"signals at step {e['step']} ({e['layers_before']} layers)")
        write_text_atomic(folder / "report.md", "\n".join(_lm_report_lines(report)) + "\n")
        return
    write_json_atomic(folder / "report.json", report)
    plots = folder / "plots"
    plot_accuracy(report, plots / "accuracy.png")
    plot_kept_layers(report, plots / "kept_layers.png")
    if report["info"].get("teacher_parameters") is not None:
        plot_size_speed(report, plots / "size_speed.png")
    for e in report["history"]:
        if e["signals"] is not None:
            plot_signals_heatmap(pd.DataFrame(e["signals"]), plots / f"signals_step{e['step']}.png",
                                 title=f"signals at step {e['step']} ({e['layers_before']} layers)")
    lines = [
        f"# fusionprune compress: {report['model']} on {report['dataset']}",
        "",
        f"Strategy `{report['strategy']}`: {report['teacher_layers']} -> {report['student_layers']} layers, "
        f"kept original layers {report['kept_layers']}.",
        "",
        "| | test accuracy | macro-F1 |",
        "|---|---|---|",
        f"| teacher | {report['teacher_accuracy']:.4f} | {report['teacher_macro_f1']:.4f} |",
        f"| pruned + fine-tuned | {report['pruned_accuracy']:.4f} | |",
        f"| after distillation | {report['student_accuracy']:.4f} | {report['student_macro_f1']:.4f} |",
        *([f"| control: same steps, hard labels only | {report['control_accuracy']:.4f} | |"]
          if report.get("control_accuracy") is not None else []),
        "",
        f"{report['test_examples']} test examples; wall time {report['wall_seconds']:.0f} s; "
        f"time spent choosing layers {report['selection_seconds']:.1f} s.",
        "",
        "| step | layers | dropped (original) | predicted | measured right after | validation after fine-tune |",
        "|---|---|---|---|---|---|",
    ]
    target = (report.get("fusion_bundle") or {}).get("target")
    if target:  # what "predicted" is depends on the bundle: only the 'retention' target is a fraction kept
        meaning = {"retention": "the predicted fraction of accuracy kept",
                   "retention_rank": "the predicted rank of the candidate among this step's layers "
                                     "(0 = worst to drop, 1 = best), not an accuracy",
                   "retention_z": "the predicted z-score of the accuracy after the drop among this step's "
                                  "layers, not an accuracy"}.get(target, f"the bundle's target {target!r}")
        lines[-2:-2] = [f"`predicted` is {meaning}; `measured right after` is the validation accuracy "
                        "with the layer removed, before fine-tuning.", ""]
    for e in report["history"]:
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {e['step']} | {e['layers_before']} | {e['dropped_orig']} | {fmt(e['predicted'])} | "
                     f"{fmt(e['measured_acc_after_drop'])} | {e['validation_accuracy_after_finetune']:.4f} |")
    lines += ["", "![accuracy](plots/accuracy.png)", "", *_depth_lines(report), "![kept layers](plots/kept_layers.png)", ""]
    lines += [f"![signals step {e['step']}](plots/signals_step{e['step']}.png)" for e in report["history"]
              if e["signals"] is not None]
    write_text_atomic(folder / "report.md", "\n".join(lines) + "\n")
