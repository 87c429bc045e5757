"""Leave-one-dataset-out grid over fusion settings, on the shipped rows (or given ones).

    python benchmarks/archive/fusion_lodo.py [--data 'fusion_prune/fusion_data/rows/*.parquet']

For every model type x feature normalisation x target, the mean over held-out datasets of
Spearman, top-1 and regret (regret: best drop-one accuracy of the state minus that of the chosen
layer), next to the best single signal (chosen on the training datasets of each fold) and
consensus. Two further variants: a relative-position feature (layer / (n_layers - 1)) added to
the 12 signals, and the same models on fewer training states (only the first half of each
trajectory). Writes benchmarks/results/fusion/grid.csv and grid.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fusion"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from fusion_prune import fusion as F

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(F.DEFAULT_BUNDLE.parent / "rows" / "*.parquet"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = F.read_rows([args.data])
    rows = rows.assign(rel_position=rows["layer"] / (rows["n_layers"] - 1).clip(lower=1))
    norms, targets, models = list(F.NORMALISATIONS), list(F.TARGETS), list(F.FUSION_MODELS)
    parts = []
    grid = F.leave_one_dataset_out(rows, models, norms, targets)
    parts.append(grid.assign(variant="12 signals"))
    plus = F.leave_one_dataset_out(rows, models, ["zscore", "rank"], ["retention_z", "retention_rank"],
                                   features=[*F.DEFAULT_SIGNALS, "rel_position"])
    parts.append(plus[plus.method.str.startswith("fusion")].assign(variant="12 signals + position"))
    early = rows[rows.step < rows.groupby("dataset").step.transform("max") / 2 + 0.5]
    fewer = []
    for held in sorted(rows.dataset.unique()):
        train, test = early[early.dataset != held], rows[rows.dataset == held]
        for mt in models:
            b = F.fit_bundle(train, mt, F.DEFAULT_SIGNALS, "zscore", "retention_z")
            fewer.append({"held_out": held, "method": f"fusion-{mt}", "feature_norm": "zscore",
                          "target": "retention_z", **F.choice_metrics(test, b.predict)})
    parts.append(pd.DataFrame(fewer).assign(variant="first half of each trajectory"))
    table = pd.concat(parts, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "grid.csv", index=False)
    summary = (table.fillna({"feature_norm": "-", "target": "-"})
               .groupby(["variant", "method", "feature_norm", "target"])[["spearman", "top1", "regret"]].mean()
               .reset_index().sort_values(["variant", "regret", "spearman"], ascending=[True, True, False]))
    lines = ["# Fusion: leave-one-dataset-out grid", "",
             f"{F.count_states(rows)} states from {rows.dataset.nunique()} datasets "
             f"({', '.join(sorted(rows.dataset.unique()))}); means over held-out datasets.", "",
             "| variant | method | features | target | Spearman | top-1 | regret |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.variant} | {r.method} | {r.feature_norm} | {r.target} | {r.spearman:.3f} | {r.top1:.3f} | "
              f"{r.regret:.4f} |" for r in summary.itertuples()]
    (args.out / "grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
