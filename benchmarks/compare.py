"""Fusion against every baseline on real data, through the same loop, budget and seeds.

    python benchmarks/compare.py --profile cpu            # minilm-l6, 6 -> 3, capped samples
    python benchmarks/compare.py --profile gpu            # mpnet-base, 12 -> 6 and 12 -> 4, full data
    python benchmarks/compare.py --profile cpu --datasets bbc-news --strategies top,fusion-rf
    python benchmarks/compare.py --list                   # the profiles (data: benchmarks/profiles.toml)

For each dataset one teacher is fine-tuned (seed 0) and shared by every strategy and seed, so
that strategies and seeds differ only in what they choose and in the compression's own randomness
(data order, dropout, the random strategy). Each cell (dataset, target, strategy, seed) runs
``compress`` with the profile's budget and appends a row to ``benchmarks/results/<profile>/results.csv``;
finished cells are skipped, so an interrupted sweep continues where it stopped (also across
sessions). Cells run seed by seed: every strategy on every dataset at seed 0 first, then the extra
seeds. Several workers may share one results file: each claims a cell under a file lock before
running it, and rows are appended under another. For the ``control`` strategies the pruned
student is also fine-tuned on hard labels only for the distillation's steps (``accuracy_ft``):
does distillation help? Fusion strategies use bundles fitted on the
shipped rows **without** the evaluated dataset (leave-one-dataset-out); ``best-signal`` is the
single signal with the lowest regret on the other datasets' rows. No choice reads a test split:
test accuracy is only reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ["rotten-tomatoes", "bbc-news", "election-tweets", "reuters-r8", "reuters-r52", "20newsgroups"]
STRATEGIES = ["fusion-rf", "fusion-verify", "fusion-xgb", "fusion-linear", "consensus", "best-signal",
              "activation_patching", "angular-block", "symmetric", "deepest", "alternate", "top", "bottom",
              "random", "oracle"]
# What fusion-rf (the shipped configuration) and fusion-verify are set against, pair by pair on shared
# seeds: every single criterion and fixed rule the issue names (fixed rules: no signals at all), and the
# oracle (every layer's drop-one measured) as the reference a shortlist is measured against.
RIVALS = ("activation_patching", "angular-block", "best-signal", "symmetric", "deepest", "alternate", "top",
          "fusion-rf", "oracle")
COLUMNS = ["profile", "dataset", "target_layers", "strategy", "resolved_strategy", "seed", "teacher_accuracy",
           "accuracy", "accuracy_kd", "accuracy_ft", "selection_seconds", "wall_seconds", "kept_layers"]


@dataclass
class Profile:
    model: str
    targets: list[int]
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: dict[str, list[int]] = field(default_factory=dict)  # strategy -> seeds; others use default_seeds
    default_seeds: list[int] = field(default_factory=lambda: [0])
    teacher_samples: int | None = 3000
    teacher_epochs: float = 2.0
    # refuse a teacher within this of the majority share (fusion_prune.finetune.check_teacher; 0: off)
    teacher_margin: float = 0.02
    finetune_steps: int = 50
    signal_samples: int = 256
    drop_one_samples: int = 400
    distill_samples: int | None = 2000
    distill_epochs: float = 1.0
    max_eval_samples: int | None = 1000
    step_eval_samples: int | None = None  # validation examples for each step's record (None: max_eval_samples)
    max_length: int = 128
    batch_size: int = 32
    rows: str | None = None  # rows for the leave-one-dataset-out bundles (default: the shipped ones)
    control: list[str] = field(default_factory=lambda: ["fusion-rf"])  # strategies that also get accuracy_ft
    label: str = "acc_after_drop"  # measured column the LODO bundles and best-signal learn from
    teachers: str | None = None  # reuse this profile's teachers (same teacher settings) instead of training new ones
    distill_data: str = "all"  # CompressConfig.distill_data: "unseen" distils on rows the teacher did not train on
    baseline: str | None = None  # the summary shows this profile's rows beside this one's (same teachers and seeds)
    hidden_weight: float = 0.0  # DistillConfig.hidden_weight: hidden-state matching during distillation
    distill_layers: int | None = None  # DistillConfig.train_layers: distil into the last K layers and the head only
    paired: bool = False  # results.md gets the paired table (challengers against RIVALS on shared seeds)
    question: str = ""  # what the profile was run to answer (benchmarks/README.md says what it decided)


PROFILES_FILE = Path(__file__).resolve().parent / "profiles.toml"


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, Profile]:
    """The profiles of ``profiles.toml``: each table a Profile, ``extends`` starting from another one,
    "none" for None, relative ``rows`` read from the benchmarks folder."""
    import tomllib

    raw = tomllib.loads(path.read_text())
    out: dict[str, Profile] = {}

    def build(name: str) -> Profile:
        if name not in out:
            spec = {k: (None if v == "none" else v) for k, v in raw[name].items()}
            base = spec.pop("extends", None)
            if spec.get("rows") and not Path(spec["rows"]).is_absolute():
                spec["rows"] = str(path.parent / spec["rows"])
            out[name] = replace(build(base), **spec) if base else Profile(**spec)
        return out[name]

    for name in raw:
        build(name)
    return out


PROFILES = load_profiles()


def _slug(spec: str) -> str:
    """A folder-safe name for a dataset spec (which may be a path)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).name or spec)


def _lodo_bundle(rows: pd.DataFrame, dataset: str, model_type: str, folder: Path,
                 label: str = "acc_after_drop", extras: tuple[str, ...] = ()) -> str:
    """A bundle fitted on rows of every dataset but ``dataset``, with the default's normalisation,
    on the 12 signals and ``extras`` (opt-in signal columns of ``rows``)."""
    from fusion_prune import fusion as F

    suffix = ("" if label == "acc_after_drop" else f"-{label}") + "".join(f"+{e}" for e in extras)
    path = folder / "bundles" / f"lodo-{model_type}-without-{_slug(dataset)}{suffix}.npz"
    if not path.is_file():
        default = F.load_bundle() if F.DEFAULT_BUNDLE.is_file() else None
        norm, target = (default.feature_norm, default.target) if default else ("zscore", "retention_z")
        F.fit_bundle(rows[rows.dataset != dataset], model_type, [*F.DEFAULT_SIGNALS, *extras], norm, target,
                     measured=label).save(path)
    return str(path)


def _best_signal(rows: pd.DataFrame, dataset: str, label: str = "acc_after_drop") -> str:
    from fusion_prune import fusion as F

    return F.best_signal(F.use_measured(rows[rows.dataset != dataset], label))


def _teacher(profile: Profile, dataset: str, data, out: Path) -> Path:
    """Fine-tune (once) the teacher shared by every strategy and seed of this dataset."""
    from fusion_prune.finetune import FinetuneConfig, finetune

    folder = (RESULTS / profile.teachers / "work" if profile.teachers else out) / "teachers" / _slug(dataset)
    with _locked(folder.with_suffix(".lock")):  # a second worker waits for this teacher
        if folder.is_dir():
            return folder
        cfg = FinetuneConfig(epochs=profile.teacher_epochs, lr=2e-4 if "minilm" in profile.model else 5e-5,
                             max_train_samples=profile.teacher_samples, max_length=profile.max_length, seed=0,
                             batch_size=profile.batch_size, max_eval_samples=profile.max_eval_samples)
        finetune(profile.model, data, cfg, folder, teacher_margin=profile.teacher_margin)
    return folder


def _cells(profile: Profile) -> list[tuple[str, int, str, int]]:
    """(dataset, target, strategy, seed) in run order: seed 0 everywhere first, then the extra seeds."""
    cells = [(d, t, s, seed) for d in profile.datasets for t in profile.targets for s in profile.strategies
             for seed in profile.seeds.get(s, profile.default_seeds)]
    return sorted(cells, key=lambda c: (c[3] != profile.default_seeds[0], c[3], profile.datasets.index(c[0])))


def only_seeds(profile: Profile, keep: list[int]) -> Profile:
    """``profile`` with each strategy's seeds cut to those in ``keep`` (a strategy run on none of
    them gets no cell): runs one seed of a profile without running seeds it never asked for."""
    return replace(profile, seeds={s: [k for k in profile.seeds.get(s, profile.default_seeds) if k in keep]
                                   for s in profile.strategies})


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True):
    """Exclusive lock on ``path`` (a lock file) shared by the workers; yields False when ``wait`` is
    off and another worker holds it. The OS drops the lock when its holder dies: no stale claims."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(csv: Path) -> pd.DataFrame:
    done = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=COLUMNS)
    return done.reindex(columns=COLUMNS)


def _is_done(done: pd.DataFrame, dataset: str, target: int, strategy: str, seed: int) -> bool:
    return bool(((done.dataset == dataset) & (done.strategy == strategy) & (done.seed == seed)
                 & (done.target_layers == target)).any())


def run(profile: Profile, name: str, out: Path | None = None, log=print, work: Path | None = None) -> pd.DataFrame:
    """Run every unfinished cell; results (csv, md, plots, one report per cell) go to ``out``, the
    heavy files (teachers, bundles, cells in progress) to ``work`` (default ``out/work``)."""
    from fusion_prune.fusion import DEFAULT_BUNDLE, read_rows

    out = out or RESULTS / name
    work = work or out / "work"
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    rows = read_rows([profile.rows or str(DEFAULT_BUNDLE.parent / "rows" / "*.parquet")])
    loaded: dict[str, object] = {}
    for dataset, target, strategy, seed in _cells(profile):
        with _locked(work / "claims" / f"{_slug(dataset)}-l{target}-{strategy}-s{seed}.lock", wait=False) as mine:
            if mine:  # else another worker is running this cell
                _cell(profile, name, rows, loaded, dataset, target, strategy, seed, out, work, csv, log)
    done = _read(csv)
    summarise(with_baseline(profile, done), out, challengers=_challengers(profile),
              paired=bool(profile.baseline) or profile.paired)
    return done


def with_baseline(profile: Profile, results: pd.DataFrame) -> pd.DataFrame:
    """``results`` and, when the profile names a baseline, that profile's rows for the same datasets
    and depths of the strategies this profile does not run (for the tables, not results.csv)."""
    if not profile.baseline or not (RESULTS / profile.baseline / "results.csv").is_file():
        return results
    base = _read(RESULTS / profile.baseline / "results.csv")
    base = base[base.dataset.isin(results.dataset) & base.target_layers.isin(results.target_layers)
                & ~base.strategy.isin(profile.strategies)]
    return pd.concat([results, base], ignore_index=True) if len(base) else results


def _challengers(profile: Profile) -> list[str]:
    """Strategies the versus table sets against top and best-signal: fusion-rf, fusion-verify when
    the profile runs it, and this profile's own (all it runs when it sits beside a baseline)."""
    own = [s for s in profile.strategies if profile.baseline or s not in STRATEGIES or s == "fusion-verify"]
    return list(dict.fromkeys(["fusion-rf", *own]))


def _cell(profile: Profile, name: str, rows: pd.DataFrame, loaded: dict, dataset: str, target: int, strategy: str,
          seed: int, out: Path, work: Path, csv: Path, log) -> None:
    """Run one cell through ``compress`` and append its row."""
    from distill import DistillConfig
    from fusion_prune.data import load_dataset
    from fusion_prune.loop import CompressConfig, compress_with_config
    from fusion_prune.report import write_table

    with _locked(csv.with_suffix(".lock")):  # finished earlier, by this worker or another
        if _is_done(_read(csv), dataset, target, strategy, seed):
            return
    if dataset not in loaded:
        loaded[dataset] = load_dataset(dataset)
    data = loaded[dataset]
    teacher = _teacher(profile, dataset, data, work)
    fusion_path, resolved = None, strategy
    if strategy == "fusion-verify":  # the shipped configuration's shortlist, decided by the measured label
        fusion_path, resolved = _lodo_bundle(rows, dataset, "rf", work, profile.label), "fusion-verify"
    elif strategy.startswith("fusion-"):  # fusion-MODEL or fusion-MODEL+EXTRA+...
        model_type, *extras = strategy.split("-", 1)[1].split("+")
        fusion_path = _lodo_bundle(rows, dataset, model_type, work, profile.label, tuple(extras))
        resolved = "fusion"
    elif strategy == "best-signal":
        resolved = _best_signal(rows, dataset, profile.label)
    cfg = CompressConfig.from_options(
        target_layers=target, strategy=resolved, fusion_path=fusion_path,
        finetune_steps=profile.finetune_steps, signal_samples=profile.signal_samples,
        drop_one_samples=profile.drop_one_samples if resolved in ("oracle", "fusion-verify") else 0,
        max_eval_samples=profile.max_eval_samples, max_length=profile.max_length,
        batch_size=profile.batch_size, seed=seed, progress=False,
        distill=DistillConfig(epochs=profile.distill_epochs, max_train_samples=profile.distill_samples,
                              batch_size=profile.batch_size, hidden_weight=profile.hidden_weight,
                              train_layers=profile.distill_layers),
        distill_control=strategy in profile.control, distill_data=profile.distill_data,
        teacher_margin=profile.teacher_margin)
    cell = work / "runs" / f"{_slug(dataset)}-l{target}-{strategy}-s{seed}"
    t0 = time.perf_counter()
    r = compress_with_config(str(teacher), data, cfg, cell, resume=True, overwrite=True)
    (out / "reports").mkdir(exist_ok=True)
    shutil.copyfile(cell / "report.json", out / "reports" / f"{cell.name}.json")
    shutil.rmtree(cell, ignore_errors=True)  # the row and the report are what is kept; a model is ~70 MB
    row = {"profile": name, "dataset": dataset, "target_layers": target, "strategy": strategy,
           "resolved_strategy": resolved, "seed": seed, "teacher_accuracy": r["teacher_accuracy"],
           "accuracy": r["pruned_accuracy"], "accuracy_kd": r["student_accuracy"],
           "accuracy_ft": r["control_accuracy"], "selection_seconds": r["selection_seconds"],
           "wall_seconds": round(time.perf_counter() - t0, 1), "kept_layers": json.dumps(r["kept_layers"])}
    with _locked(csv.with_suffix(".lock")):  # after every cell: an interrupted sweep loses at most one cell
        write_table(pd.concat([_read(csv), pd.DataFrame([row])], ignore_index=True), csv)
    ft = f", plain fine-tune {r['control_accuracy']:.4f}" if r["control_accuracy"] is not None else ""
    log(f"{dataset} l{target} {strategy} s{seed}: {r['pruned_accuracy']:.4f} / kd "
        f"{r['student_accuracy']:.4f}{ft} (teacher {r['teacher_accuracy']:.4f}), kept {r['kept_layers']}, "
        f"{row['wall_seconds']:.0f} s")


def _fmt(values: pd.Series) -> str:
    """Mean, with the standard deviation over seeds when there are several."""
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():.4f}" + (f" ± {values.std():.4f}" if len(values) > 1 else "")


def mean_ranks(results: pd.DataFrame, metric: str) -> pd.Series:
    """Mean over datasets of each strategy's rank (1 = best) by ``metric``, seeds averaged first;
    indexed by (target_layers, strategy)."""
    means = results.groupby(["target_layers", "dataset", "strategy"])[metric].mean().reset_index()
    means["rank"] = means.groupby(["target_layers", "dataset"])[metric].rank(ascending=False)
    return means.groupby(["target_layers", "strategy"])["rank"].mean()


def paired_table(part: pd.DataFrame, challengers: list[str], datasets: list[str],
                 rivals: tuple[str, ...] = RIVALS) -> str:
    """Each challenger minus each rival on the seeds both ran (same seed: same test sample, so its
    noise cancels), averaged per dataset; the wins, the number of (dataset, seed) pairs, and the
    standard error of the mean difference over those pairs (sd / sqrt(pairs)): a "mean" within
    about two of it is not told apart from zero."""
    lines = ["| challenger | minus | metric | " + " | ".join(datasets) + " | mean | wins | pairs | se of pairs |",
             "|" + "---|" * (len(datasets) + 7)]
    for challenger in challengers:
        for rival in (r for r in rivals if r != challenger):
            for metric in ("accuracy", "accuracy_kd"):
                a = part[part.strategy == challenger].groupby(["dataset", "seed"])[metric].mean()
                b = part[part.strategy == rival].groupby(["dataset", "seed"])[metric].mean()
                diff = (a - b).dropna()
                if diff.empty:
                    continue
                per = diff.groupby(level="dataset").mean()
                cells = [f"{per[d]:+.4f}" if d in per.index else "" for d in datasets]
                se = f"{diff.std() / len(diff) ** 0.5:.4f}" if len(diff) > 1 else ""
                lines.append(f"| {challenger} | {rival} | {metric} | " + " | ".join(cells)
                             + f" | {per.mean():+.4f} | {int((per > 0).sum())}/{len(per)} | {len(diff)} | {se} |")
    return "\n".join(lines)


def tables(results: pd.DataFrame, challengers: list[str] | tuple[str, ...] = ("fusion-rf",),
           paired: bool = False) -> dict[str, str]:
    """Markdown tables: ``wide`` (strategy x dataset, accuracy / accuracy_kd, mean rank),
    ``versus`` (each challenger, fusion-rf by default, against top and best-signal, per dataset),
    ``paired`` (when asked: the challengers against fusion-rf, top and best-signal on shared seeds),
    ``distill`` (KD against plain fine-tuning of the same student for the same steps)."""
    out = {}
    for target, part in results.groupby("target_layers"):
        datasets = [d for d in DATASETS if d in set(part.dataset)] + sorted(set(part.dataset) - set(DATASETS))
        ranks = {c: mean_ranks(part, c).xs(target) for c in ("accuracy", "accuracy_kd")}
        order = [s for s in STRATEGIES if s in set(part.strategy)] + sorted(set(part.strategy) - set(STRATEGIES))
        head = "| strategy | " + " | ".join(datasets) + " | mean over datasets | mean rank |"
        lines = [f"Test accuracy after pruning + fine-tuning / after distillation, {target} layers "
                 "(mean ± sd over seeds where there are several; the mean over datasets of those means, "
                 "blank unless the strategy ran on every dataset; rank 1 is best, mean over datasets).", "",
                 head, "|" + "---|" * (len(datasets) + 3)]
        teacher = part.groupby("dataset").teacher_accuracy.mean()
        lines.append("| teacher | " + " | ".join(f"{teacher[d]:.4f}" for d in datasets)
                     + f" | {teacher.mean():.4f} | |")
        means = part.groupby(["strategy", "dataset"])[["accuracy", "accuracy_kd"]].mean()
        for s in order:
            cells = []
            for d in datasets:
                c = part[(part.dataset == d) & (part.strategy == s)]
                cells.append(f"{_fmt(c.accuracy)} / {_fmt(c.accuracy_kd)}" if len(c) else "")
            m = means.xs(s)
            overall = f"{m.accuracy.mean():.4f} / {m.accuracy_kd.mean():.4f}" if len(m) == len(datasets) else ""
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {overall} | "
                         f"{ranks['accuracy'].get(s, float('nan')):.2f} / {ranks['accuracy_kd'].get(s, float('nan')):.2f} |")
        out[f"wide-{target}"] = "\n".join(lines)
        # head to head: per dataset, mean over seeds of each side, then the difference
        blocks = []
        for challenger in challengers:
            lines = [f"| {challenger} minus | metric | " + " | ".join(datasets) + " | mean | wins |",
                     "|" + "---|" * (len(datasets) + 4)]
            for rival in ("top", "best-signal", *(("fusion-rf",) if challenger != "fusion-rf" else ())):
                for metric in ("accuracy", "accuracy_kd"):
                    diffs = []
                    for d in datasets:
                        f = part[(part.dataset == d) & (part.strategy == challenger)][metric]
                        r = part[(part.dataset == d) & (part.strategy == rival)][metric]
                        diffs.append(f.mean() - r.mean() if len(f) and len(r) else float("nan"))
                    valid = [x for x in diffs if x == x]
                    if not valid:  # the rival (or the challenger) was not run in this profile: no row of nans
                        continue
                    wins = f"{sum(x > 0 for x in valid)}/{len(valid)}"
                    mean = sum(valid) / len(valid)
                    lines.append(f"| {rival} | {metric} | " + " | ".join(f"{x:+.4f}" if x == x else "" for x in diffs)
                                 + f" | {mean:+.4f} | {wins} |")
            if len(lines) > 2 or challenger == challengers[0]:
                blocks.append("\n".join(lines))
        out[f"versus-{target}"] = "\n\n".join(blocks)
        if paired:  # and the classifier default of compress against the same rivals, when it was run
            from fusion_prune.tasks import ClassificationTask

            default = [ClassificationTask.default_strategy]
            default = default if default[0] in set(part.strategy) else []
            out[f"paired-{target}"] = paired_table(part, list(dict.fromkeys([*challengers, *default])), datasets)
        ctrl = part[part.accuracy_ft.notna()] if "accuracy_ft" in part else part.iloc[:0]
        if len(ctrl):
            lines = ["| dataset | strategy | seeds | after pruning | plain fine-tune | distillation | KD minus fine-tune |",
                     "|---|---|---|---|---|---|---|"]
            for (d, s), c in ctrl.groupby(["dataset", "strategy"]):
                gain = c.accuracy_kd - c.accuracy_ft
                lines.append(f"| {d} | {s} | {len(c)} | {_fmt(c.accuracy)} | {_fmt(c.accuracy_ft)} | "
                             f"{_fmt(c.accuracy_kd)} | {_fmt(gain)} |")
            out[f"distill-{target}"] = "\n".join(lines)
    return out


def summarise(results: pd.DataFrame, out: Path, challengers: list[str] | tuple[str, ...] = ("fusion-rf",),
              paired: bool = False) -> Path:
    """results.md (the tables above and per-dataset detail) and two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusion_prune.report import _save_figure

    lines = [f"# Strategy comparison ({results.profile.iloc[0] if len(results) else ''})", "",
             f"{len(results)} runs. Regenerate with `python benchmarks/compare.py --profile "
             f"{results.profile.iloc[0] if len(results) else 'cpu'} --summary-only`.", ""]
    for key, table in tables(results, challengers, paired).items():
        kind, target = key.split("-")
        title = {"wide": "All strategies", "versus": f"{' and '.join(challengers)} against top and the best single signal "
                 "(difference of means over seeds)", "paired": "The same on the seeds both ran (same seed, same "
                 "test sample), mean over datasets", "distill": "Distillation against plain fine-tuning "
                 "(same pruned student, same steps, data and learning rate)"}[kind]
        lines += [f"## {title}, {target} layers", "", table, ""]
    for (dataset, target), part in results.groupby(["dataset", "target_layers"]):
        lines += [f"## {dataset}, {target} layers (teacher {part.teacher_accuracy.mean():.4f})", "",
                  "| strategy | accuracy | accuracy_kd | seeds | selection s | kept layers |", "|---|---|---|---|---|---|"]
        for strategy, s in part.groupby("strategy"):
            kept = ", ".join(sorted(set(s.kept_layers.astype(str))))
            lines.append(f"| {strategy} | {_fmt(s.accuracy)} | {_fmt(s.accuracy_kd)} | {len(s)} | "
                         f"{s.selection_seconds.mean():.1f} | {kept} |")
        lines.append("")
    md = out / "results.md"
    tmp = md.with_name(".results.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md)
    means = results.groupby(["dataset", "target_layers", "strategy"]).accuracy_kd.mean().reset_index()
    rank = mean_ranks(results, "accuracy_kd")
    if results.target_layers.nunique() == 1:  # one depth: label bars by dataset / strategy alone
        rank = rank.droplevel(0)
        means["case"] = means.dataset
    else:
        means["case"] = means.dataset + " -> " + means.target_layers.astype(str)
    rank = rank.sort_values()
    pivot = means.pivot_table(index="case", columns="strategy", values="accuracy_kd")
    fig, ax = plt.subplots(figsize=(2 + 1.4 * max(len(pivot), 1), 4))
    pivot.plot.bar(ax=ax, width=0.85)
    ax.set_ylabel("test accuracy after distillation")
    ax.legend(fontsize=6, ncols=3)
    ax.set_ylim(max(0.0, float(pivot.min().min()) - 0.05) if len(pivot) else 0, 1)
    _save_figure(fig, out / "accuracy.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    rank.plot.barh(ax=ax)
    ax.set_xlabel("mean rank of accuracy_kd (lower is better)")
    _save_figure(fig, out / "mean_rank.png")
    return md


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--datasets", default=None, help="comma-separated subset")
    ap.add_argument("--strategies", default=None, help="comma-separated subset")
    ap.add_argument("--seeds", default=None, help="comma-separated subset of each strategy's seeds")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<profile>)")
    ap.add_argument("--work", type=Path, default=None, help="teachers, bundles, cells in progress (default OUT/work)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (two 1-thread workers beat one)")
    ap.add_argument("--summary-only", action="store_true", help="rewrite results.md and the plots, run nothing")
    ap.add_argument("--teachers-only", action="store_true",
                    help="fine-tune the teachers of the chosen datasets and stop (one such process a dataset "
                         "trains them side by side while workers wait for them)")
    ap.add_argument("--list", action="store_true", help="list the profiles (benchmarks/profiles.toml) and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, p in PROFILES.items():
            print(f"{name:<22} {p.question}")
        return pd.DataFrame()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    if args.datasets:
        profile = replace(profile, datasets=args.datasets.split(","))
    if args.strategies:
        valid = list(dict.fromkeys([*STRATEGIES, *profile.strategies]))
        unknown = set(args.strategies.split(",")) - set(valid)
        if unknown:
            ap.error(f"--strategies: unknown {sorted(unknown)}; expected some of {valid}")
        profile = replace(profile, strategies=args.strategies.split(","))
    if args.seeds:
        profile = only_seeds(profile, [int(k) for k in args.seeds.split(",")])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out or RESULTS / args.profile
    if args.summary_only:
        done = _read(out / "results.csv")
        summarise(with_baseline(profile, done), out, challengers=_challengers(profile),
                  paired=bool(profile.baseline) or profile.paired)
        return done
    if args.teachers_only:
        from fusion_prune.data import load_dataset

        for dataset in profile.datasets:
            print(f"teacher {dataset}: {_teacher(profile, dataset, load_dataset(dataset), args.work or out / 'work')}",
                  flush=True)
        return _read(out / "results.csv")
    return run(profile, args.profile, out, log=lambda m: print(m, flush=True), work=args.work)


if __name__ == "__main__":
    main(sys.argv[1:])
