"""Layer-importance analysis: every signal and criterion's ranking of one model's layers, side by side.

What the layerwise-importance literature reports as an analysis rather than a pruning run: each
method's ranking of the layers, how much the methods agree (Spearman between their scores), the
consensus ranking and the fusion bundle's ranking next to each other and, with ``measure``, the
measured validation metric without each layer as the reference they can all be judged against.

Every number comes from the functions ``signals``, ``compress`` and ``collect`` use
(:func:`signals.compute_signals` on the same sample, :meth:`Task.drop_one`), so the tables agree
with those commands for the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from fusion_prune.errors import BadInputError

#: the method names that are not a single signal
CONSENSUS, FUSION, MEASURED = "consensus", "fusion", "measured"


@dataclass
class Analysis:
    """The result of :func:`analyze`.

    ``table``: one row per layer: ``layer``, ``orig_layer``, every signal's value and, when
    measured, the drop-one columns. ``removability``: one row per layer, one column per method,
    higher = more removable by that method. ``ranks``: the same with 1 = the first layer that
    method would remove. ``agreement``: Spearman correlation between the methods' scores
    (n_methods x n_methods).
    """

    table: pd.DataFrame
    removability: pd.DataFrame
    ranks: pd.DataFrame
    agreement: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """``analysis.md``, ``analysis.parquet`` (values and ranks), ``agreement.csv`` and ``plots/``,
        written to a temporary folder and renamed."""
        from fusion_prune.report import plot_signals_heatmap, write_table
        from fusion_prune.utils import atomic_dir, write_text_atomic

        folder = Path(folder)
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            wide = self.table.merge(self.ranks.add_prefix("rank_").assign(layer=self.table["layer"].to_numpy()),
                                    on="layer")
            write_table(wide, tmp / "analysis.parquet")
            self.agreement.round(6).to_csv(tmp / "agreement.csv")
            plot_signals_heatmap(self.table[["layer", "orig_layer", *self.meta["signals"]]], tmp / "plots" / "signals.png",
                                 title=f"{self.meta['model_name']} on {self.meta['dataset_name']}: signals per layer")
            plot_ranks(self, tmp / "plots" / "ranks.png")
            plot_agreement(self, tmp / "plots" / "agreement.png")
            write_text_atomic(tmp / "analysis.md", self.markdown())
        return folder

    def first_layers(self) -> dict[str, int]:
        """The original index of the layer each method would remove first."""
        orig = self.table["orig_layer"]
        return {m: int(orig.iloc[int(self.ranks[m].to_numpy().argmin())]) for m in self.ranks.columns}

    def caution_lines(self) -> list[str]:
        """A warning when no ranking was checked by measurement, or a list of the methods whose first
        layer is not among the two best measured ones."""
        if MEASURED not in self.ranks.columns:
            return ["> **Unmeasured rankings.** No layer was removed to check them: a signal or the fusion model can "
                    "rank first a layer whose removal costs far more than another's (in the demo, the first-ranked "
                    "layer left near-majority accuracy). Add `--measure` before acting on a ranking; `compress` "
                    "measures by default.", ""]
        col, orig = self.meta.get("measured_column"), self.table["orig_layer"].to_numpy()
        measured_rank = self.ranks[MEASURED].to_numpy()
        best = int(np.argmin(measured_rank))
        off = []
        for meth in self.ranks.columns:
            first = int(self.ranks[meth].to_numpy().argmin())
            if meth != MEASURED and measured_rank[first] > 2:
                value = f", {col} {self.table[col].iloc[first]:.4g}" if col in self.table else ""
                off.append(f"`{meth}` (layer {int(orig[first])}: measured rank {int(measured_rank[first])}{value})")
        if not off:
            return ["Every method's first layer is among the two best by measurement.", ""]
        best_value = f", {col} {self.table[col].iloc[best]:.4g}" if col in self.table else ""
        return [f"> **Disagrees with the measurement.** First layers outside the two best measured (best: layer "
                f"{int(orig[best])}{best_value}): " + ", ".join(off) + ".", ""]

    def markdown(self) -> str:
        m = self.meta
        methods = list(self.ranks.columns)
        lines = [f"# Layer analysis: {m['model']} on {m['dataset']}", "",
                 f"{m['layers']} layers ({m['task']}); signals on {m['samples']} calibration "
                 f"{m['unit']} of the {m['split']!r} split, seed "
                 f"{m['seed']}; fusion bundle: {m['fusion'] or 'none'}"
                 + (f"; measured: {m['metric']} on {m['drop_one_samples']} validation "
                    f"{m['unit']} without each layer"
                    if MEASURED in methods else "") + f". {m['seconds']:.0f} s.", "",
                 *self.caution_lines(),
                 "## The layer each method would remove first", "",
                 "| method | first | second | third |" + (" Spearman with measured |" if MEASURED in methods else ""),
                 "|---|---|---|---|" + ("---|" if MEASURED in methods else "")]
        orig = self.table["orig_layer"].to_numpy()
        for meth in methods:
            order = orig[np.argsort(self.ranks[meth].to_numpy(), kind="stable")]
            cells = [str(int(x)) for x in order[:3]] + [""] * max(0, 3 - len(order))
            extra = (f" {self.agreement.loc[meth, MEASURED]:+.2f} |" if MEASURED in methods else "")
            lines.append(f"| {meth} | " + " | ".join(cells) + " |" + extra)
        lines += ["", "Layers are original indices. Each signal ranks by its registered rule (docs/signals.md): "
                  "`prune_lowest` signals remove their lowest-valued layer first.", "",
                  "## Consensus and fusion side by side", "",
                  "| layer | " + " | ".join(c for c in (CONSENSUS, FUSION, MEASURED) if c in methods) + " |",
                  "|---|" + "---|" * sum(c in methods for c in (CONSENSUS, FUSION, MEASURED))]
        for i, o in enumerate(orig):
            cells = [str(int(self.ranks[c].iloc[i])) for c in (CONSENSUS, FUSION, MEASURED) if c in methods]
            lines.append(f"| {int(o)} | " + " | ".join(cells) + " |")
        lines += ["", "(rank 1 = removed first)", "", "## Agreement", ""]
        mean_agree = (self.agreement.sum() - 1) / max(1, len(methods) - 1)
        lines += ["Mean Spearman of each method with the others: " + ", ".join(
            f"`{k}` {v:+.2f}" for k, v in mean_agree.sort_values(ascending=False).items()) + ".", "",
            "Full matrix: `agreement.csv`. Values and ranks: `analysis.parquet`.", "",
            "![signals](plots/signals.png)", "", "![ranks](plots/ranks.png)", "", "![agreement](plots/agreement.png)",
            ""]
        return "\n".join(lines)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:  # a constant score ranks nothing
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 = highest score (removed first); ties keep layer order."""
    order = np.argsort(-scores, kind="stable")
    r = np.empty(len(scores), dtype=np.int64)
    r[order] = np.arange(1, len(scores) + 1)
    return r


def analyze(model: str, dataset, *, task: str | None = None, text_column: str = "text", label_column: str = "label",
            samples: int | None = None, split: str = "validation", extras: Sequence[str] | None = None,
            measure: bool = False, drop_one_samples: int | None = None, fusion: str | Path | None = "default",
            batch_size: int | None = None, max_length: int | None = None, seed: int = 0,
            progress: bool = True) -> Analysis:
    """Rank ``model``'s layers by every signal (the 12 and ``extras``; None: the extras worth their
    cost, :func:`signals.analysis_extras`),
    consensus and the fusion bundle (``fusion``: a path, "default" or None for none), and with
    ``measure`` by the measured validation metric without each layer.

    Classifiers: signals on ``samples`` (256) examples of ``split``, the sample ``fusionprune
    signals`` draws. Causal LMs: on ``samples`` (4) calibration windows of the train split, the
    windows ``compress`` draws at its first step. The model must be trained for the task.
    """
    from fusion_prune.config import StepConfig
    from fusion_prune.fusion import load_bundle
    from fusion_prune.tasks import task_for
    from signals.rules import consensus_removability, signal_removability
    from signals import DEFAULT_SIGNALS, analysis_extras, resolve_signals

    t0 = time.perf_counter()
    if fusion is not None and str(fusion) != "default" and not Path(fusion).is_file():
        raise BadInputError(f"The fusion bundle {str(fusion)!r} does not exist; expected a file written by "
                            "fit-fusion, 'default' or 'none'.")
    if extras is None:
        extras = analysis_extras()
    names = list(dict.fromkeys([*DEFAULT_SIGNALS, *extras]))
    resolve_signals(names)
    t, data = task_for(model, dataset, task, text_column, label_column)
    if split not in ("train", "validation", "test"):
        raise BadInputError(f"The 'split' parameter must be one of {{'train', 'validation', 'test'}}. Got {split!r}.")
    net, tok, ready = t.load_model(str(model))
    if not ready:
        raise BadInputError(f"The model {str(model)!r} has no classification head trained for the labels of "
                            f"{data.spec!r}; expected a fine-tuned classifier (run `fusionprune finetune` first).")
    step = StepConfig(signal_samples=samples, drop_one_samples=drop_one_samples,
                      batch_size=batch_size if batch_size is not None else t.analysis_batch_size,
                      max_length=max_length, seed=seed, progress=False)
    t.resolve_step(step)
    table, split, n_samples = t.analysis_signals(net, tok, step, names, split, progress)
    table = table.sort_values("layer").reset_index(drop=True)
    scores = {n: signal_removability(table, n) for n in names}
    scores[CONSENSUS] = consensus_removability(table)
    bundle = None
    if fusion is not None:
        bundle = load_bundle(t.default_bundle if str(fusion) == "default" else fusion)
        missing = [f for f in bundle.features if f not in table.columns]
        if missing:
            raise BadInputError(f"The fusion bundle needs signals {missing} that were not computed; expected them "
                                f"among --extras. Got extras {list(extras)}.")
        scores[FUSION] = bundle.predict(table)
    if measure:
        if not step.drop_one_samples:
            step.drop_one_samples = t.analysis_drop_one_samples
        dropone = t.drop_one(net, tok, step).table.sort_values("layer").reset_index(drop=True)
        table = table.merge(dropone.drop(columns=["orig_layer"], errors="ignore"), on="layer")
        cols, asc = t.drop_one_order  # best to remove first: sort by the task's own order
        key = dropone.sort_values(cols, ascending=asc)["layer"].to_numpy()
        measured = np.empty(len(key))
        measured[key] = np.arange(len(key), 0, -1, dtype=np.float64)  # a score: higher = removed first
        scores[MEASURED] = measured
    removability = pd.DataFrame(scores)
    ranks = removability.apply(lambda c: pd.Series(_ranks(c.to_numpy(dtype=np.float64))))
    methods = list(removability.columns)
    agreement = pd.DataFrame([[_spearman(removability[a].to_numpy(), removability[b].to_numpy()) for b in methods]
                              for a in methods], index=methods, columns=methods)
    meta = {"model": str(model), "dataset": str(data.spec), "model_name": Path(str(model)).name or str(model),
            "dataset_name": Path(str(data.spec)).name or str(data.spec), "task": t.name, "layers": len(table),
            "samples": int(n_samples), "unit": t.unit, "split": split, "seed": seed, "signals": names,
            "fusion": str(fusion) if bundle is not None else None,
            "metric": t.metric, "measured_column": t.drop_one_order[0][0] if measure else None,
            "drop_one_samples": t.count_drop_one(step) if measure else None,
            "seconds": round(time.perf_counter() - t0, 1)}
    return Analysis(table, removability, ranks, agreement, meta)


def plot_ranks(a: Analysis, path: str | Path) -> Path:
    """Methods (rows) x original layers (columns), each cell the method's rank of that layer."""
    from fusion_prune.report import _plt, _save_figure

    plt = _plt()
    r = a.ranks.to_numpy().T
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * r.shape[1], 1.0 + 0.32 * r.shape[0]))
    im = ax.imshow(r, cmap="viridis_r", aspect="auto")
    ax.set_yticks(range(r.shape[0]), list(a.ranks.columns), fontsize=8)
    ax.set_xticks(range(r.shape[1]), [str(int(o)) for o in a.table["orig_layer"]])
    ax.set_xlabel("original layer")
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            ax.text(j, i, str(r[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if r[i, j] > r.shape[1] / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, label="rank (1 = removed first)")
    ax.set_title(f"{a.meta['model_name']} on {a.meta['dataset_name']}: each method's layer ranking", fontsize=9)
    return _save_figure(fig, path)


def plot_agreement(a: Analysis, path: str | Path) -> Path:
    """The Spearman matrix between methods, values written in the cells."""
    from fusion_prune.report import _plt, _save_figure

    plt = _plt()
    m = a.agreement.to_numpy()
    n = len(m)
    fig, ax = plt.subplots(figsize=(1.8 + 0.45 * n, 1.4 + 0.42 * n))
    im = ax.imshow(m, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(n), list(a.agreement.columns), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), list(a.agreement.index), fontsize=8)
    for i in range(n):
        for j in range(n):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.03, label="Spearman")
    ax.set_title(f"{a.meta['model_name']} on {a.meta['dataset_name']}: agreement between methods", fontsize=9)
    return _save_figure(fig, path)
