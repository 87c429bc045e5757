"""fusion-verify's shortlist size, the ranking model, and transfer across tasks, on the shipped rows.

    python benchmarks/archive/fusion_verify.py

All numbers are leave-one-group-out on measured states (no new model runs):

* **fusion-verify at k** (classification rows, leave-one-dataset-out; LM rows, leave-one-corpus-
  out): the bundle's top k layers, the best of them by the measured drop-one label. Reported per
  k: regret, top-1, and the label cost against the oracle's: the share of layer evaluations the
  cached drop-one labels spend on the k candidates (removing layer l re-runs the L - 1 - l layers
  above it, plus one intact forward).
* **model types** including ``xgb-rank`` (pairwise ranking grouped by state), with the shipped
  configuration (min-max features, rank target).
* **leave-one-task-out**: a bundle fitted on the classification rows scored on the LM rows, and
  back; and the LM rows' own leave-one-corpus-out.
* **leave-one-family-out** (when ``fusion_data/rows-mpnet`` holds rows): a bundle fitted on the
  minilm-l6 rows scored on the mpnet-base rows, and back, beside the best single signal chosen on
  the training family, the best single signal on the scored rows themselves, and consensus.

Writes benchmarks/results/fusion/verify.csv, tasks.csv, families.csv and verify.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fusion"


def label_cost(n: int, layers) -> float:
    """Layer evaluations of cached drop-one labels for ``layers`` out of ``n``, over those for all."""
    per = lambda l: n - 1 - l  # noqa: E731  (the layers above l; the intact forward is shared)
    return (n + sum(per(l) for l in layers)) / (n + sum(per(l) for l in range(n)))


def verify_metrics(rows: pd.DataFrame, bundle, ks) -> list[dict]:
    from fusion_prune import fusion as F

    out = []
    for k in ks:
        regret, top1, cost = [], [], []
        for _, state in F.iter_states(rows):
            acc = state["score_after_drop"].to_numpy(dtype=np.float64)  # (LM rows: minus NLL, see use_measured)
            short = np.argsort(-bundle.predict(state), kind="stable")[:k]
            chosen = acc[short].max() if k > 1 else acc[short[0]]
            regret.append(acc.max() - chosen)
            top1.append(float(chosen == acc.max()))
            cost.append(0.0 if k == 1 else label_cost(len(acc), short))
        out.append({"k": k, "regret": float(np.mean(regret)), "top1": float(np.mean(top1)),
                    "label_cost": float(np.mean(cost)), "states": len(regret)})
    return out


def leave_one_out(rows: pd.DataFrame, model_type: str, norm: str, target: str, ks) -> pd.DataFrame:
    from fusion_prune import fusion as F

    res = []
    for held in sorted(rows.dataset.unique()):
        b = F.fit_bundle(rows[rows.dataset != held], model_type, F.DEFAULT_SIGNALS, norm, target)
        for m in verify_metrics(rows[rows.dataset == held], b, ks):
            res.append({"held_out": held, "model_type": model_type, **m})
    return pd.DataFrame(res)


def expected_random(rows: pd.DataFrame) -> dict:
    """Regret and top-1 of a uniformly random layer, in expectation: the scale a regret is read against."""
    from fusion_prune import fusion as F

    regret, top1 = [], []
    for _, state in F.iter_states(rows):
        acc = state["score_after_drop"].to_numpy(dtype=float)
        regret.append(acc.max() - acc.mean())
        top1.append(float(np.mean(acc == acc.max())))
    return {"spearman": 0.0, "top1": float(np.mean(top1)), "regret": float(np.mean(regret)), "states": len(regret)}


def family_transfer(cls: pd.DataFrame, other_dir: Path, norm: str, target: str) -> pd.DataFrame | None:
    """Bundles fitted on one model family's classification rows, scored on the other's, and back."""
    from fusion_prune import fusion as F

    paths = sorted(other_dir.glob("*.parquet"))
    if not paths:
        return None
    both = pd.concat([cls, F.use_measured(F.read_rows([str(p) for p in paths]), "acc_after_drop")], ignore_index=True)
    out = F.leave_one_out(both, "family", ["rf", "xgb-rank"], [norm], [target])
    fams = sorted(both.source_model.unique())
    out["test"] = out.held_out
    out["train"] = [next(f for f in fams if f != h) if m.startswith("fusion") or m == "best-signal" else "-"
                    for h, m in zip(out.held_out, out.method)]
    out.loc[out.method == "best-signal", "method"] = "best-signal (" + out.signal.astype(str) + ")"
    extra = []
    for fam in fams:  # what a single signal could do at best on the scored rows (chosen by looking at them)
        base = F.baseline_metrics(both[both.source_model == fam])
        best = min(base["signals"], key=lambda n: base["signals"][n]["regret"])
        extra.append({"train": "-", "test": fam, "method": f"best signal on the scored rows ({best})",
                      **base["signals"][best]})
        extra.append({"train": "-", "test": fam, "method": "random layer (expected)",
                      **expected_random(both[both.source_model == fam])})
    out = pd.concat([out, pd.DataFrame(extra)], ignore_index=True)
    return out[["train", "test", "method", "spearman", "top1", "regret", "states"]].sort_values(
        ["test", "regret"], kind="stable")


def main(argv: list[str] | None = None) -> None:
    from fusion_prune import fusion as F

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    root = F.DEFAULT_BUNDLE.parent
    cls = F.use_measured(F.read_rows([str(root / "rows" / "*.parquet")]), "acc_after_drop")
    lm = F.use_measured(F.read_rows([str(root / "rows-lm" / "*.parquet")]), "loss_after_drop")
    norm, target = "minmax", "retention_rank"  # the shipped configuration
    parts = []
    for task, rows in (("classification", cls), ("causal-lm", lm)):
        if rows.dataset.nunique() < 2:
            continue
        for mt in ("linear", "rf", "xgb", "xgb-rank"):
            parts.append(leave_one_out(rows, mt, norm, target, range(1, 7)).assign(task=task))
    verify = pd.concat(parts)
    tasks = []
    for train_name, train, test_name, test in (("classification", cls, "causal-lm", lm),
                                               ("causal-lm", lm, "classification", cls)):
        for mt in ("rf", "xgb-rank"):
            b = F.fit_bundle(train, mt, F.DEFAULT_SIGNALS, norm, target)
            m = F.choice_metrics(test, b.predict)
            tasks.append({"train": train_name, "test": test_name, "method": f"fusion-{mt}", **m})
        base = F.baseline_metrics(test)
        best = min(base["signals"], key=lambda n: base["signals"][n]["regret"])
        tasks.append({"train": "-", "test": test_name, "method": f"best signal on the test rows ({best})",
                      **base["signals"][best]})
        tasks.append({"train": "-", "test": test_name, "method": "consensus", **base["consensus"]})
    tasks = pd.DataFrame(tasks)
    families = family_transfer(cls, root / "rows-mpnet", norm, target)
    args.out.mkdir(parents=True, exist_ok=True)
    if families is not None:
        families.to_csv(args.out / "families.csv", index=False)
    verify.to_csv(args.out / "verify.csv", index=False)
    tasks.to_csv(args.out / "tasks.csv", index=False)
    mean = verify.groupby(["task", "model_type", "k"])[["regret", "top1", "label_cost"]].mean().reset_index()
    lines = ["# fusion-verify, ranking model, transfer across tasks", "",
             "Leave-one-dataset-out (classification: minilm-l6, 6 datasets, 30 states) and leave-one-corpus-out "
             f"(causal LM: smollm2-135m, {lm.dataset.nunique()} corpora, {lm.groupby(['dataset', 'step']).ngroups} "
             "states); shipped configuration (min-max features, rank target). Regret in accuracy (classification) "
             "or nats of validation NLL (LM); label cost = share of the oracle's layer evaluations.", "",
             "| task | model | k | regret | top-1 | label cost |", "|---|---|---|---|---|---|"]
    for r in mean.itertuples():
        lines.append(f"| {r.task} | {r.model_type} | {r.k} | {r.regret:.4f} | {r.top1:.2f} | {r.label_cost:.2f} |")
    lines += ["", "## Leave-one-task-out", "", "| trained on | scored on | method | Spearman | top-1 | regret |",
              "|---|---|---|---|---|---|"]
    for r in tasks.itertuples():
        lines.append(f"| {r.train} | {r.test} | {r.method} | {r.spearman:+.3f} | {r.top1:.2f} | {r.regret:.4f} |")
    if families is not None:
        lines += ["", "## Leave-one-family-out", "",
                  "| trained on | scored on | method | Spearman | top-1 | regret | states |", "|---|---|---|---|---|---|---|"]
        for r in families.itertuples():
            lines.append(f"| {r.train} | {r.test} | {r.method} | {r.spearman:+.3f} | {r.top1:.2f} | {r.regret:.4f} "
                         f"| {r.states} |")
    (args.out / "verify.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
