"""Reports and plots: the typed report of ``compress`` and the figures and markdown made from it.

Figures are written through a temp file and a rename, never half-written. What a report says
about one task's metric (its results table, its step table, its metric plot) comes from the
task (:class:`fusion_prune.tasks.Task`); the rest is shared here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from fusion_prune.utils import atomic_file, write_text_atomic


#: the candidate-table column of a drop-one measurement the strategy did not choose by
REFERENCE = "measured, not used"


@dataclass
class StepRecord:
    """One pruning step: what was removed, what was measured, what it cost."""

    step: int
    layers_before: int
    dropped: list[int]  # current indices
    dropped_orig: list[int]  # original indices
    kept_layers: list[int]
    predicted: float | None  # the bundle's prediction for the removed layer (one removal a step)
    measured: float | None  # the measured drop-one value of the removed layer
    metric: float | None  # the task's validation metric after the step's recovery (None: not recorded)
    finetune_steps: int
    selection_seconds: float
    parameters: int | None = None
    throughput: float | None = None
    seconds: float = 0.0
    signals: dict | None = None  # the signals table, column -> values
    drop_one: dict | None = None  # the drop-one table, column -> values
    #: per current layer: layer, orig_layer and what the strategy chose by (StrategyState.evidence;
    #: the last column decides), plus the step's drop-one measurement when one was taken
    candidates: dict | None = None
    #: the report.json names of ``measured`` and ``metric`` (the task's: e.g. measured_nll_after_drop)
    measured_key: str = field(default="measured_after_drop", repr=False)
    metric_key: str = field(default="validation_metric", repr=False)

    def to_dict(self) -> dict:
        return {"step": self.step, "layers_before": self.layers_before, "dropped": self.dropped,
                "dropped_orig": self.dropped_orig, "kept_layers": self.kept_layers, "predicted": self.predicted,
                self.measured_key: self.measured, self.metric_key: self.metric, "finetune_steps": self.finetune_steps,
                "selection_seconds": self.selection_seconds, "parameters": self.parameters,
                "throughput": self.throughput, "seconds": self.seconds, "signals": self.signals,
                "drop_one": self.drop_one, "candidates": self.candidates}

    @classmethod
    def from_dict(cls, d: dict, measured_key: str, metric_key: str) -> StepRecord:
        """Read back what :meth:`to_dict` wrote (a checkpoint's history); older keys are accepted."""
        return cls(d["step"], d["layers_before"], d["dropped"], d["dropped_orig"], d["kept_layers"], d.get("predicted"),
                   d.get(measured_key), d.get(metric_key), d.get("finetune_steps", 0), d.get("selection_seconds", 0.0),
                   d.get("parameters"), d.get("throughput"), d.get("seconds", 0.0), d.get("signals"),
                   d.get("drop_one", d.get("labels")), d.get("candidates"), measured_key, metric_key)


@dataclass
class CompressReport(Mapping):
    """What ``compress`` made and measured. ``report.json`` is :meth:`to_dict`; the report also reads as
    that mapping (``report["student_layers"]``), for code written against the JSON."""

    model: str
    dataset: str
    strategy: str
    task: str
    metric: str  # the task's headline metric ("accuracy", "perplexity")
    teacher_metric_key: str
    results: dict  # the task's finish: teacher / pruned / student metrics, distillation or healing stats
    teacher_layers: int
    student_layers: int
    kept_layers: list[int]
    history: list[StepRecord]
    info: dict
    budget: dict | None
    student_parameters: int
    accuracy_to_size: float | None
    config: dict
    fusion_bundle: dict | None
    selection_seconds: float
    wall_seconds: float
    versions: dict

    @property
    def model_name(self) -> str:
        return _name(self.model)

    @property
    def dataset_name(self) -> str:
        return _name(self.dataset)

    def to_dict(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "strategy": self.strategy, "task": self.task,
                **self.results, "teacher_layers": self.teacher_layers, "student_layers": self.student_layers,
                "kept_layers": self.kept_layers, "history": [e.to_dict() for e in self.history], "info": self.info,
                "budget": self.budget, "student_parameters": self.student_parameters,
                "accuracy_to_size": self.accuracy_to_size, "config": self.config, "fusion_bundle": self.fusion_bundle,
                "selection_seconds": self.selection_seconds, "wall_seconds": self.wall_seconds,
                "versions": self.versions}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def compress_summary(report: CompressReport, task, output: str | os.PathLike) -> list[str]:
    """The closing lines of ``fusionprune compress``: the shared ones and the task's metric lines."""
    lines = [f"{report.model} on {report.dataset}  ({report.strategy}, {report.task})",
             f"layers            {report.teacher_layers} -> {report.student_layers}  (kept original "
             f"{report.kept_layers})"]
    if report.budget:
        b = report.budget
        lines.append(f"budget            {b['parameter']} {b['value']}: "
                     + (f"stopped, removing {b['stopped']['dropped_orig']} broke it" if b["stopped"]
                        else "not reached"))
    lines += task.summary_lines(report)
    peaks = report.info.get("peak_memory") or {}
    if peaks:
        from fusion_prune.utils import human_bytes

        name, top = max(peaks.items(), key=lambda kv: kv[1]["cpu_rss_bytes"])
        cuda = [e["cuda_allocated_bytes"] for e in peaks.values() if e.get("cuda_allocated_bytes")]
        lines.append(f"peak memory       {human_bytes(top['cpu_rss_bytes'])} resident ({name})"
                     + (f", {human_bytes(max(cuda))} CUDA" if cuda else "") + "  (per phase: report.md)")
    lines += [f"wall time         {report.wall_seconds:.0f} s  (choosing layers: {report.selection_seconds:.1f} s)",
              f"saved             {output}  (README.md model card, report.md, report.json, plots/)"]
    return lines


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


def plot_signals_heatmap(table: pd.DataFrame, path: str | os.PathLike, title: str = "",
                         removed: list[int] | None = None) -> Path:
    """Heatmap of layers (rows) x signals (columns), the raw value in each cell.

    Colour is each signal's *importance by its own rule*, min-max across layers: 0 (dark) is the
    layer that signal would remove first, whatever its direction; a column not registered as a
    signal is coloured by its raw value. ``removed``: current layer indices outlined in red.
    """
    from signals import SIGNALS

    plt = _plt()
    columns = [c for c in table.columns if c not in ("layer", "orig_layer")]
    aligned = table[columns].astype(float).copy()
    for c in columns:
        if c in SIGNALS:
            aligned[c] = SIGNALS[c].direction() * aligned[c]
    norm = normalise_columns(aligned, columns)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(columns), 1.2 + 0.42 * len(table)))
    im = ax.imshow(norm.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), [c + (" (low: remove)" if c in SIGNALS and SIGNALS[c].rule == "prune_lowest"
                                             else " (high: remove)" if c in SIGNALS else "") for c in columns],
                  rotation=45, ha="right")
    removed = set(removed or [])
    labels = [(f"{int(l)} (orig {int(o)})" if l != o else str(int(l))) + ("  removed" if int(l) in removed else "")
              for l, o in zip(table["layer"], table["orig_layer"])]
    ax.set_yticks(range(len(table)), labels)
    ax.set_ylabel("layer")
    for i in range(len(table)):
        for j, c in enumerate(columns):
            v = table[c].iloc[i]
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6.5,
                    color="white" if norm.iloc[i, j] < 0.6 else "black")
        if int(table["layer"].iloc[i]) in removed:
            ax.add_patch(plt.Rectangle((-0.5, i - 0.5), len(columns), 1, fill=False, ec="red", lw=2))
            ax.get_yticklabels()[i].set_color("red")
    fig.colorbar(im, ax=ax, fraction=0.03, label="importance by the signal's rule (0: remove first)")
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


def plot_per_step(report: CompressReport, path: str | os.PathLike, teacher: float,
                  series: list[tuple[list, str, str]], ylabel: str, title: str, log: bool = False,
                  budget: float | None = None, test: dict[str, float | None] | None = None, **title_kw) -> Path:
    """A metric against the depth reached after each step (x: layers, inverted, integer ticks), the
    teacher dashed and, when given, the budget's limit dotted.

    ``series``: (values per step, matplotlib format, legend label); None values are not drawn.
    ``test``: the finished run's test-split values, ``{"teacher": v, "pruned": v, "final": v}`` (a
    label for the final model may replace "final"), drawn as separate markers at their depths.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    depth = [e.layers_before - len(e.dropped) for e in report.history]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.axhline(teacher, color="grey", ls="--", label=f"teacher ({report.teacher_layers} layers)")
    if budget is not None:
        ax.axhline(budget, color="tab:red", ls=":", label="budget limit")
    for values, fmt, label in series:
        ax.plot(depth, [np.nan if v is None else v for v in values], fmt, label=label)
    for (name, v), marker in zip((test or {}).items(), ("D", "v", "*")):
        if v is not None:
            x = report.teacher_layers if name == "teacher" else report.student_layers
            ax.plot([x], [v], marker, ms=9 if marker == "*" else 6, ls="none", label=f"test: {name}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(report.teacher_layers + 0.5, min([*depth, report.teacher_layers]) - 0.5)
    ax.legend(fontsize=8)
    ax.set_title(title, **title_kw)
    return _save_figure(fig, path)


def depth_table(report: CompressReport) -> pd.DataFrame:
    """One row per depth reached (the teacher first): parameters, measured throughput and its
    speed-up, and the validation metric after that step."""
    info = report.info
    rows = [{"layers": report.teacher_layers, "parameters": info.get("teacher_parameters"),
             "throughput": info.get("teacher_throughput"), "validation": info.get(report.teacher_metric_key)}]
    rows += [{"layers": e.layers_before - len(e.dropped), "parameters": e.parameters,
              "throughput": e.throughput, "validation": e.metric} for e in report.history]
    t = pd.DataFrame(rows)
    t["speedup"] = t["throughput"] / t["throughput"].iloc[0] if t["throughput"].notna().all() else np.nan
    speed = (info.get("speed") or {}).get("rows")
    t["ideal_speedup"] = [r["ideal_speedup"] for r in speed] if speed and len(speed) == len(t) else np.nan
    return t


def plot_size_speed(report: CompressReport, path: str | os.PathLike) -> Path:
    """Parameters (millions) and measured forward throughput against depth."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    t = depth_table(report)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(t["layers"], t["parameters"] / 1e6, "o-", color="tab:blue", label="parameters")
    ax.set_xlabel("layers")
    ax.set_ylabel("parameters (millions)", color="tab:blue")
    ax.set_ylim(0, t["parameters"].max() / 1e6 * 1.08)  # from zero: a 23% cut must look like 23%
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(t["layers"].max() + 0.5, t["layers"].min() - 0.5)
    ax2 = ax.twinx()
    ax2.plot(t["layers"], t["throughput"], "s--", color="tab:orange", label="measured")
    if t["ideal_speedup"].notna().all():  # what the FLOPs allow, from the teacher's measured speed
        ax2.plot(t["layers"], t["throughput"].iloc[0] * t["ideal_speedup"], ":", color="tab:gray",
                 label="ideal (FLOPs)")
        ax2.legend(fontsize=7, loc="lower right")
    ax2.set_ylabel(report.info.get("throughput_unit", "examples/s") + " (one forward, fastest of rounds)",
                   color="tab:orange")
    ax2.set_ylim(0, None)
    ax.set_title(f"{report.model_name}: size and measured speed by depth", fontsize=9)
    return _save_figure(fig, path)


def _depth_lines(report: CompressReport) -> list[str]:
    t = depth_table(report)
    if t["parameters"].isna().any():  # a report from before these were recorded
        return []
    unit = report.info.get("throughput_unit", "examples/s")
    lines = [f"| layers | parameters | {unit} (measured) | speed-up | ideal (FLOPs) | validation {report.metric} |",
             "|---|---|---|---|---|---|"]
    for r in t.itertuples():
        ideal = "" if pd.isna(r.ideal_speedup) else f"{r.ideal_speedup:.2f}x"
        lines.append(f"| {r.layers} | {r.parameters:,} | {r.throughput:.1f} | {r.speedup:.2f}x | {ideal} | "
                     f"{r.validation:.4f} |")
    lines.append("")
    if report.info.get("speed"):
        sp = report.info["speed"]
        lines += [f"Speed: {sp['method']} ({sp['device']}, {sp['threads']} threads).", ""]
    if report.accuracy_to_size is not None:
        lines += [f"Accuracy-to-size ratio {report.accuracy_to_size:.3f}: the fraction of the teacher's test "
                  "accuracy kept, divided by the fraction of its parameters kept (above 1: accuracy shrank less "
                  "than the model).", ""]
    b = report.budget
    if b:
        stop = b["stopped"]
        lines += [f"Budget `{b['parameter']}` = {b['value']}: " + (
            f"removing original layer(s) {stop['dropped_orig']} at {stop['layers_before']} layers broke it, so that "
            f"step was undone and the run stopped at {report.student_layers} layers." if stop
            else "never broken; the run stopped at the target depth."), ""]
        checks = report.info.get("budget_checks") or []
        if checks:
            lines += ["Steps outside the budget after their short recovery were judged again on a copy finished as "
                      "the run ends (measured on the same validation examples, not predicted):", "",
                      f"| step | layers | {report.metric} after recovery | after the finish | kept | seconds |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {c['step']} | {c['layers']} | {c['after_recovery']:.4f} | {c['after_finish']:.4f} | "
                      f"{'yes' if c['kept'] else 'no'} | {c['seconds']:.0f} |" for c in checks]
            lines += [""]
    lines += ["![size and speed](plots/size_speed.png)", ""]
    return lines


def candidate_lines(report: CompressReport) -> list[str]:
    """report.md's "Why each layer was removed": per step, every candidate layer with the values the
    strategy chose by (its deciding column last) and the removed one in bold."""
    steps = [e for e in report.history if e.candidates]
    if not steps:  # a report from before candidates were recorded
        return []
    lines = ["## Why each layer was removed", "",
             f"Strategy `{report.strategy}`: {report.info.get('strategy_rule', '')}", ""]
    if not any(c not in ("layer", "orig_layer") for e in steps for c in e.candidates):
        return lines + ["It chooses by position, not by a score: no candidate table.", ""]
    scored = any(c not in ("layer", "orig_layer") and not c.startswith(REFERENCE) for e in steps for c in e.candidates)
    lines += ["Per step, every layer that could be removed and " + (
        "what the choice was made by; the last column decides (removability and predicted: highest; accuracy: "
        "highest; loss and NLL: lowest; `-`: not scored)." if scored else
        "its measured drop-one value, shown for reference: this strategy chooses by position.")
        + " The removed layer is in bold.", ""]
    for e in steps:
        cols = [c for c in e.candidates if c not in ("layer", "orig_layer")]
        lines += [f"**Step {e.step}** ({e.layers_before} -> {e.layers_before - len(e.dropped)} layers): removed "
                  f"original layer(s) {e.dropped_orig}", "",
                  "| layer (original) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for i, orig in zip(e.candidates["layer"], e.candidates["orig_layer"]):
            cells = [f"{i} ({orig})", *("-" if v is None or np.isnan(v) else f"{v:.4g}"
                                        for v in (e.candidates[c][i] for c in cols))]
            if i in e.dropped:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot_kept_layers(report: CompressReport, path: str | os.PathLike) -> Path:
    """Which original layers remain after each step."""
    plt = _plt()
    L = report.teacher_layers
    rows = [list(range(L))] + [e.kept_layers for e in report.history]
    grid = np.array([[1.0 if l in r else 0.0 for l in range(L)] for r in rows])
    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * L, 1.0 + 0.35 * len(rows)))
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=1.3, aspect="auto")
    ax.set_xticks(range(L))
    ax.set_yticks(range(len(rows)), ["teacher"] + [f"step {e.step}" for e in report.history])
    ax.set_xlabel("original layer (green: kept)")
    ax.set_title(f"{report.model_name}: kept layers after each step ({report.strategy})", fontsize=9)
    return _save_figure(fig, path)


def write_compress_report(report: CompressReport, folder: str | os.PathLike, task) -> None:
    """report.json, report.md, plots/ and the model card (README.md) in ``folder``: the shared parts here, the task's own
    results table, step table and metric plot from ``task`` (:class:`fusion_prune.tasks.Task`)."""
    from fusion_prune.utils import write_json_atomic

    folder = Path(folder)
    plots = folder / "plots"
    write_json_atomic(folder / "report.json", report.to_dict())
    metric_lines = task.report_plots(report, plots)
    plot_kept_layers(report, plots / "kept_layers.png")
    if report.info.get("teacher_parameters") is not None:
        plot_size_speed(report, plots / "size_speed.png")
    for e in report.history:
        if e.signals is not None:
            plot_signals_heatmap(pd.DataFrame(e.signals), plots / f"signals_step{e.step}.png",
                                 title=f"signals at step {e.step} ({e.layers_before} layers; red: removed)",
                                 removed=e.dropped)
    from fusion_prune.memory import memory_lines

    memory = memory_lines(report.info.get("peak_memory") or {})
    lines = [*task.report_section(report), *task.step_table(report), *candidate_lines(report), *metric_lines,
             *_depth_lines(report),
             *(["## Peak memory per phase", "", *memory] if memory else []),
             "![kept layers](plots/kept_layers.png)", ""]
    lines += [f"![signals step {e.step}](plots/signals_step{e.step}.png)" for e in report.history
              if e.signals is not None]
    write_text_atomic(folder / "report.md", "\n".join(lines) + "\n")
    _card(report, folder, task)


def _card(report: CompressReport, folder: Path, task) -> None:
    """README.md, the model card (:mod:`fusion_prune.card`), beside the saved model."""
    from fusion_prune.card import architecture_of, invocation, write_model_card

    method = [f"- Layers chosen by the `{report.strategy}` strategy in {len(report.history)} removal step(s), "
              f"measured on `{report.dataset}` ({report.task}).",
              *([f"- Budget: {report.budget['parameter']} {report.budget['value']}."] if report.budget else []),
              "- Each step's measurements: `report.md`; every setting: `report.json`."]
    write_model_card(folder, source=report.model, architecture=architecture_of(folder),
                     teacher_layers=report.teacher_layers, kept=report.kept_layers,
                     removed=[i for e in report.history for i in e.dropped_orig],
                     parameters=report.student_parameters, method=method,
                     results=task.report_section(report)[2:], versions=report.versions, command=invocation())
