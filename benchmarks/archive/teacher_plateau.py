"""Validation curves of teacher fine-tuning, to choose the early-stopping defaults by measurement.

For each (dataset, train cap) the teacher (minilm-l6 + a new head) is trained for a fixed budget
with a validation check every ``--every`` steps and no stopping; the script then replays every
(patience, check interval) rule on the recorded curve and reports where each would have stopped
and how far its accuracy is from the best of the curve. Results: ``results/teacher_plateau/``.

    python benchmarks/archive/teacher_plateau.py            # resumable: finished curves are kept
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fusion_prune.data import load_dataset
from fusion_prune.finetune import FinetuneConfig, evaluate, majority_share, train
from fusion_prune.data import subsample
from fusion_prune.models import load_classifier

OUT = Path(__file__).parent / "results" / "teacher_plateau"
CASES = [("book-excerpts", None), ("rotten-tomatoes", 735), ("bbc-news", None), ("rotten-tomatoes", 3000)]


def curve(dataset: str, cap: int | None, steps: int, every: int, seed: int) -> dict:
    data = load_dataset(dataset)
    model, tok, _ = load_classifier("minilm-l6", data.labels, seed=seed)
    cfg = FinetuneConfig(max_steps=steps, lr=2e-4, max_train_samples=cap, seed=seed, patience=10**6,
                         eval_every=every, progress=False, max_length=128)
    t0 = time.perf_counter()
    stats = train(model, tok, data.train, cfg, val_df=data.validation, data_labels=data.labels)
    val = subsample(data.validation, cfg.early_stopping_samples, seed)
    test = evaluate(model, tok, subsample(data.test, 1000, seed), data.labels)
    return {"dataset": dataset, "train_cap": cap, "train_examples": stats["examples"],
            "steps_per_epoch": int(np.ceil(stats["examples"] / cfg.batch_size)), "every": every,
            "validation_examples": len(val), "majority": majority_share(val["label"].to_numpy()),
            "curve": stats["early_stopping"]["curve"], "test_accuracy_at_budget_end_best": test["accuracy"],
            "seconds": round(time.perf_counter() - t0, 1)}


def replay(c: dict, patience: int, every: int) -> tuple[int, float]:
    """(stop step, best accuracy seen by then) of a rule checking every ``every`` steps."""
    best, bad = -1.0, 0
    for step, acc in c["curve"]:
        if step % every:
            continue
        if acc > best + 1e-4:
            best, bad = acc, 0
        else:
            bad += 1
            if bad >= patience:
                return step, best
    return c["curve"][-1][0], best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    curves = []
    for dataset, cap in CASES:
        f = OUT / f"{dataset}-{cap or 'all'}-s{a.seed}.json"
        if not f.exists():
            c = curve(dataset, cap, a.steps, a.every, a.seed)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(c, indent=1))
            tmp.replace(f)
        curves.append(json.loads(f.read_text()))
    lines = ["| dataset (train examples) | steps/epoch | majority | best val acc (step) | "
             + " | ".join(f"p{p}/e{e}: stop, acc" for p, e in RULES) + " |",
             "|---" * (4 + len(RULES)) + "|"]
    for c in curves:
        accs = [a_ for _, a_ in c["curve"]]
        i = int(np.argmax(accs))
        cells = []
        for p, e in RULES:
            e_ = e or min(50, max(10, c["steps_per_epoch"] // 2))
            e_ = max(a.every, round(e_ / a.every) * a.every)  # the curve has a point every --every steps
            s, best = replay(c, p, e_)
            cells.append(f"{s}, {best:.3f}")
        lines.append(f"| {c['dataset']} ({c['train_examples']}) | {c['steps_per_epoch']} | {c['majority']:.3f} | "
                     f"{accs[i]:.3f} ({c['curve'][i][0]}) | " + " | ".join(cells) + " |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


RULES = [(2, 0), (3, 0), (5, 0), (3, 10), (3, 50)]  # (patience, check interval; 0 = the default rule)

if __name__ == "__main__":
    main()
