"""Do the opt-in extra signals help fusion choose layers?

    python benchmarks/archive/extra_signals.py --threads 1 --datasets rotten-tomatoes,bbc-news   # collect (resumable)
    python benchmarks/archive/extra_signals.py --evaluate-only

The 12 default signals are cheap; the three opt-in ones (``activation_patching``, ``mc_dropout``,
``layer_conductance``, signals/extra.py) cost several times more. Here the same states carry
both: per dataset, the cpu comparison's teacher (run ``compare.py --profile cpu`` first) walked
6 -> 5 -> 4 layers with the comparison's caps (length 64, 128 calibration and 256 validation
examples, 25 recovery steps per drop), each state labelled by drop-one validation accuracy
(``acc_after_drop``, the label the shipped bundle learns). Evaluation, leave-one-dataset-out,
every choice judged by that label (regret, top-1, Spearman per state, averaged): fusion-rf on the
12 signals, on the 12 plus all three extras, on the 12 plus each extra; every extra alone with
its rule; the best single signal chosen on the training datasets among the 12 and among all 15;
consensus. No choice reads a test split. Also records the seconds each signal group took.
Writes benchmarks/results/extra-signals/{rows/*.parquet, lodo.csv, lodo.md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "extra-signals"
TEACHERS = HERE.parent / "results" / "cpu" / "work" / "teachers"
DATASETS = ["rotten-tomatoes", "bbc-news", "election-tweets", "reuters-r8", "reuters-r52", "20newsgroups"]
EXTRAS = ("activation_patching", "mc_dropout", "layer_conductance")
# Candidate feature sets for the shipped bundle, cheapest first, as signals_cost.py modes (names
# joined by "+", "12" = the defaults): each is fitted leave-one-dataset-out like the 12 and priced
# by the time of its own shared pass on the same calibration batches (COST, from signals_cost.py).
NO_GRAD = "act_inhibition+act_intensity+act_energy+mi_task+mi_prediction+attn_entropy+repr_angular"
FEATURE_SETS = {
    "weight (2, no data)": "weight_norm+weight_entropy",
    "no gradient (9)": f"{NO_GRAD}+weight_norm+weight_entropy",
    "12": "12",
    "activation_patching + weight (3)": "activation_patching+weight_norm+weight_entropy",
    "activation_patching + no gradient (10)": f"activation_patching+{NO_GRAD}+weight_norm+weight_entropy",
    "12 + activation_patching": "12+activation_patching",
}
COST = HERE.parent / "results" / "signals_cost" / "minilm-l6-rotten-tomatoes-cpu-b32-t64-sets.json"


def collect_rows(datasets: list[str], out: Path, log=print) -> list[Path]:
    """Collect (or resume) the rows of every dataset whose teacher exists; returns the finished files."""
    from fusion_prune.collect import CollectConfig, collect_many

    cfg = CollectConfig(min_layers=3, finetune_steps=25, signal_samples=128, max_eval_samples=256, max_length=64,
                        lr=1e-4, extra_signals=EXTRAS, progress=False)
    return collect_many({d: TEACHERS / d for d in datasets}, cfg, out, log=lambda m: log(f"[extra] {m}"))


def evaluate(rows: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-dataset-out table: one row per (held-out dataset, method)."""
    from fusion_prune import fusion as F
    from signals.rules import consensus_removability, signal_removability

    default = F.load_bundle()
    norm, target = default.feature_norm, default.target
    base = list(F.DEFAULT_SIGNALS)
    variants = {"fusion-rf (12 signals)": base, "fusion-rf (12 + 3 extras)": [*base, *EXTRAS],
                **{f"fusion-rf (12 + {e})": [*base, e] for e in EXTRAS}}
    out = []
    for held in sorted(rows.dataset.unique()):
        train, test = rows[rows.dataset != held], rows[rows.dataset == held]

        def add(method: str, scorer, **extra) -> None:
            out.append({"held_out": held, "method": method, **extra, **F.choice_metrics(test, scorer)})

        for name, feats in variants.items():
            add(name, F.fit_bundle(train, "rf", feats, norm, target).predict)
        for name, mode in FEATURE_SETS.items():
            add(f"set: {name}", F.fit_bundle(train, "rf", set_names(mode), norm, target).predict)
        for e in EXTRAS:
            add(e, lambda s, e=e: signal_removability(s, e))
        for label, pool in (("best-signal (of 12)", base), ("best-signal (of 15)", [*base, *EXTRAS])):
            best = F.best_signal(train, pool)
            add(label, lambda s, n=best: signal_removability(s, n), signal=best)
        add("consensus (12)", lambda s: consensus_removability(s, base))
    return pd.DataFrame(out)


def set_names(mode: str) -> list[str]:
    sys.path.insert(0, str(HERE.parent))  # signals_cost.py lives in benchmarks/
    try:
        from signals_cost import set_names as names
    finally:
        sys.path.remove(str(HERE.parent))
    return names(mode)


def feature_set_table(res: pd.DataFrame, cost: Path = COST) -> str:
    """Markdown: each candidate feature set's mean leave-one-dataset-out regret / top-1 / Spearman
    beside the time of its shared pass relative to one plain forward+backward (when measured)."""
    import json

    times = json.loads(cost.read_text()) if cost.is_file() else {}
    plain = times.get("modes", {}).get("plain", {}).get("seconds")
    lines = ["| feature set (fusion-rf) | signals | regret | top-1 | Spearman | pass time / plain |", "|---|---|---|---|---|---|"]
    for name, mode in FEATURE_SETS.items():
        m = res[res.method == f"set: {name}"][["regret", "top1", "spearman"]].mean()
        secs = times.get("modes", {}).get(mode, {}).get("seconds")
        ratio = f"{secs / plain:.2f}x" if secs and plain else "not measured"
        lines.append(f"| {name} | {len(set_names(mode))} | {m.regret:.4f} | {m.top1:.2f} | {m.spearman:+.2f} | {ratio} |")
    where = (f"{times['machine']}, {times['date']}, {times['batches']} batches of {times['batch_size']} x "
             f"{times['max_length']} tokens" if times else "not measured yet")
    return "\n".join(lines) + f"\n\nPass times: `{cost.name}` ({where}).\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from fusion_prune import fusion as F
    from fusion_prune.report import write_table
    from fusion_prune.utils import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the machine)")
    ap.add_argument("--evaluate-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    datasets = [d for d in args.datasets.split(",") if d]
    if args.evaluate_only:
        files = [p for d in DATASETS if (p := args.out / "rows" / f"{d}.parquet").is_file()]
    else:
        files = collect_rows(datasets, args.out)
    if len(files) < 2:
        print(f"[extra] rows for {len(files)} dataset(s); leave-one-dataset-out needs 2", file=sys.stderr)
        return pd.DataFrame()
    rows = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
    res = evaluate(rows)
    write_table(res, args.out / "lodo.csv")
    md = (f"# Opt-in extra signals as fusion features ({len(files)} datasets, "
          f"{F.count_states(rows)} states)\n\nEach cell: regret / top-1 of the chosen layer by "
          "drop-one validation accuracy, averaged over the held-out dataset's states (6, 5, 4 layers). "
          "Regenerate: `python benchmarks/archive/extra_signals.py --evaluate-only`.\n\n" + F.lodo_markdown(res, spearman=True) + "\n"
          "\n## Feature sets: regret against cost\n\n" + feature_set_table(res))
    write_text_atomic(args.out / "lodo.md", md)
    print(md)
    return res


if __name__ == "__main__":
    main()
