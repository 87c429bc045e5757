"""Does training on length-grouped batches change the teacher it gives, and how much faster is it?

The demo's teacher (minilm-l6 on 3,000 Rotten Tomatoes reviews, 64 tokens, the teacher defaults:
early stopping on validation) trained with plain shuffled batches and with length-grouped ones,
for each seed, back to back; validation and full test accuracy and the training seconds.

    .venv/bin/python benchmarks/length_grouping.py [--seeds 0 1] [-o benchmarks/results/length-grouping]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from fusion_prune.data import load_dataset
    from fusion_prune.finetune import finetune, teacher_config
    from fusion_prune.utils import versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 50, 4],
                    help="grouping windows in batches (0: shuffled; results of the first runs: True = 50)")
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/length-grouping"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for r in rows:  # the first runs wrote True for transformers' window of 50
        r["grouped"] = 50 if r["grouped"] is True else r["grouped"]
    data = load_dataset("rotten-tomatoes")
    import fusion_prune.data as D

    for seed in args.seeds:
        for window in args.windows:  # 0: plain shuffled batches
            grouped = window if window else False
            if any(r["seed"] == seed and r["grouped"] == grouped for r in rows):
                continue
            D.GROUP_WINDOW = window or D.GROUP_WINDOW
            cfg = replace(teacher_config(max_train_samples=3000, max_length=64, seed=seed), group_by_length=bool(window),
                          progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                res = finetune("minilm-l6", data, cfg, Path(tmp) / "t")
            rows.append({"seed": seed, "grouped": grouped, "steps": res.record["train"]["steps"],
                         "train_seconds": res.record["train"]["train_seconds"],
                         "validation_accuracy": res.record["metrics"]["validation"]["accuracy"],
                         "test_accuracy": res.record["metrics"]["test"]["accuracy"],
                         "best_step": res.record["train"].get("early_stopping", {}).get("best_step")})
            print(rows[-1], flush=True)
            path.write_text(json.dumps({"rows": rows, "versions": versions()}, indent=1))
    rows.sort(key=lambda r: (r["seed"], r["grouped"]))
    lines = ["| seed | batches (grouped by length within) | steps (best) | train s | s / step | validation | test |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {'window ' + str(r['grouped']) if r['grouped'] else 'shuffled'} | {r['steps']} ({r['best_step']}) | "
                     f"{r['train_seconds']:.0f} | {r['train_seconds'] / r['steps']:.2f} | {r['validation_accuracy']:.4f} | "
                     f"{r['test_accuracy']:.4f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
