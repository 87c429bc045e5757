"""Do states off the oracle's path help the fusion? Leave-one-dataset-out on the shipped rows.

    python benchmarks/archive/walks.py [--oracle 'fusion_prune/fusion_data/rows/*.parquet']
                               [--other 'fusion_prune/fusion_data/rows-random/*.parquet']

The oracle's walk (``collect``'s default) drops the measured best layer at every state, so every
training state is one the oracle reached. ``collect --walk random`` (or ``top``) labels the
states of another walk. For each dataset that has rows of both walks, a bundle in the shipped
configuration (rf, min-max features, rank target) is fitted on the *other* datasets':

* oracle rows only (what ships today),
* oracle + other-walk rows (more, and more varied, states),
* other-walk rows only,

and scored on the held-out dataset's oracle states and, separately, on its other-walk states
(states a fusion-led loop can reach when it departs from the oracle). Equal-size check: the
oracle-only bundle sees fewer states, so a gain could be size alone; the table gives the state
counts. Writes benchmarks/results/fusion/walks.csv and walks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fusion"
CONFIG = {"model_type": "rf", "feature_norm": "minmax", "target": "retention_rank"}  # the shipped one


def compare_walks(oracle: pd.DataFrame, other: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per (held-out dataset, training rows, scored states) with Spearman, top-1, regret."""
    from fusion_prune import fusion as F

    oracle = oracle.assign(walk="oracle") if "walk" not in oracle else oracle
    held_out = sorted(set(oracle.dataset) & set(other.dataset))
    if not held_out:
        raise SystemExit("walks.py: no dataset has rows of both walks")
    out = []
    for held in held_out:
        o_tr, x_tr = oracle[oracle.dataset != held], other[other.dataset != held]
        train_sets = {"oracle": o_tr, "oracle + other walk": pd.concat([o_tr, x_tr], ignore_index=True),
                      "other walk": x_tr}
        tests = {"oracle states": oracle[oracle.dataset == held], "other-walk states": other[other.dataset == held]}
        for train_name, train in train_sets.items():
            if train.empty:
                continue
            b = F.fit_bundle(train, CONFIG["model_type"], F.DEFAULT_SIGNALS, CONFIG["feature_norm"],
                             CONFIG["target"], seed)
            n_train = F.count_states(train)
            for test_name, test in tests.items():
                out.append({"held_out": held, "train": train_name, "train_states": n_train, "scored": test_name,
                            **F.choice_metrics(test, b.predict)})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from fusion_prune import fusion as F

    root = F.DEFAULT_BUNDLE.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle", default=str(root / "rows" / "*.parquet"))
    ap.add_argument("--other", default=str(root / "rows-random" / "*.parquet"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    oracle = F.use_measured(F.read_rows([args.oracle]), "acc_after_drop")
    other = F.use_measured(F.read_rows([args.other]), "acc_after_drop")
    table = compare_walks(oracle, other)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "walks.csv", index=False)
    mean = (table.groupby(["scored", "train"], sort=False)[["train_states", "spearman", "top1", "regret"]].mean()
            .reset_index())
    walks = ", ".join(sorted(set(other.walk)))
    lines = ["# Fusion trained on states off the oracle's path", "",
             f"Leave-one-dataset-out over the {table.held_out.nunique()} datasets with rows of both walks "
             f"({', '.join(sorted(table.held_out.unique()))}; other walk: {walks}); shipped configuration "
             "(rf, min-max features, rank target). Means over held-out datasets; train states = mean number of "
             "training states per fold.", "",
             "| scored on | trained on | train states | Spearman | top-1 | regret |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.scored} | {r.train} | {r.train_states:.0f} | {r.spearman:+.3f} | {r.top1:.2f} | {r.regret:.4f} |"
              for r in mean.itertuples()]
    (args.out / "walks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
