"""Healed perplexity of each strategy's choice: the removals of ``lm-cpu-choice``, healed alike.

    python benchmarks/lm_heal_choice.py --steps 20                      # every row, one process
    python benchmarks/lm_heal_choice.py --steps 20 --worker 0/2 &       # or split over two cores
    python benchmarks/lm_heal_choice.py --steps 20 --worker 1/2 &

``lm_compress.py`` with ``--heal-steps 0`` measured what each strategy removes and how much
perplexity that costs before any training (``results/lm-cpu-choice``). A full ``lm-cpu`` run per
strategy and corpus (choice, LoRA 40, KD 20, zero-shot) takes about 33 minutes on the 2-core CPU,
so the healed comparison is made here instead, on exactly the layers each choice removed: the
teacher with those layers dropped is healed with LoRA (``--steps`` steps of 4 windows of 256
tokens, r 8, alpha 16, every linear layer, lr 2e-4; :func:`lm_heal.run_method`, the same code and
budget for every strategy) and scored on the same held-out test tokens (at most 8,192) after saving
and reloading. Two strategies that removed the same layers on a corpus share one healing run (also
when one of them is added to the choice results later).

One row per (corpus, strategy, seed, depth) of the choice results lands in
``results/lm-cpu-healed/results.csv`` with the ``lm-cpu`` columns (``perplexity`` = after
healing) plus ``heal_seconds`` and ``shared_with``, and ``results.md`` beside it
(``--summary-only`` rewrites it). Finished rows are skipped, so a stopped run
resumes; ``--worker i/n`` takes every n-th distinct removed set, so workers never overlap.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
CHOICE = HERE / "results" / "lm-cpu-choice" / "results.csv"
RESULTS = HERE / "results" / "lm-cpu-healed"
KEY = ["dataset", "strategy", "seed", "target_layers"]
# The weak and costly last: deepest's removals leave perplexity in the millions before healing.
ORDER = ["sleb", "fusion", "block-influence", "angular-block", "taylor", "fusion-verify", "best-signal",
         "activation_patching", "random", "deepest"]


def removed_layers(kept: str, depth: int) -> str:
    """``"3,13,14"``: the layers of a ``depth``-layer teacher missing from a ``kept_layers`` cell."""
    keep = {int(i) for i in str(kept).split()}
    return ",".join(str(i) for i in range(depth) if i not in keep)


def plan(choice: pd.DataFrame, depth: int) -> list[tuple[str, str, list[int]]]:
    """Distinct (corpus, removed set) in run order, each with the indices of the choice rows it
    serves (strategies in :data:`ORDER`, the first strategy's set first)."""
    rank = {s: i for i, s in enumerate(ORDER)}
    rows = choice.assign(_r=choice.strategy.map(lambda s: rank.get(s, len(rank)))).sort_values(["_r", "dataset"])
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in rows.iterrows():
        groups.setdefault((r.dataset, removed_layers(r.kept_layers, depth)), []).append(i)
    return [(corpus, gone, idx) for (corpus, gone), idx in groups.items()]


def upsert(rows: list[dict], csv: Path) -> None:
    """Replace the rows with the same :data:`KEY` in ``csv`` and rewrite ``results.md`` beside it
    (locked: workers share the files)."""
    from fusion_prune.report import write_table

    csv.parent.mkdir(parents=True, exist_ok=True)
    with open(csv.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=list(rows[0]))
        new = pd.DataFrame(rows)
        if len(old):
            key = lambda df: df[KEY].astype(str).agg("|".join, axis=1)  # noqa: E731
            old = old[~key(old).isin(set(key(new)))]
        write_table(pd.concat([old, new], ignore_index=True), csv)
        _write_summary(csv)  # under the lock: a later worker's table is never overwritten by an older one


def _write_summary(csv: Path) -> pd.DataFrame:
    from fusion_prune.utils import write_text_atomic

    table = pd.read_csv(csv)
    write_text_atomic(csv.with_name("results.md"), summary(table))
    return table


def summary(table: pd.DataFrame) -> str:
    """Markdown: per strategy and depth, pruned -> healed perplexity on each corpus and the
    geometric means over the corpora it has (sorted by the healed mean; a strategy missing a
    corpus is marked and sorted last)."""
    import numpy as np

    corpora = sorted(table.dataset.unique())
    out = []
    teacher = table.groupby("dataset").teacher_perplexity.first()  # a depth may lack a corpus so far
    for depth, d in table.groupby("target_layers"):
        out += [f"30 -> {depth} layers (seed {', '.join(map(str, sorted(d.seed.unique())))}): test perplexity "
                "after removal -> after healing", "",
                "| strategy | " + " | ".join(f"{Path(c).name} (teacher {teacher[c]:.1f})" for c in corpora)
                + " | geometric mean after removal | geometric mean healed | selection s (mean) |",
                "|---|" + "---|" * (len(corpora) + 3)]
        rows = []
        for strategy, g in d.groupby("strategy"):
            g = g.groupby("dataset").mean(numeric_only=True)  # seeds averaged
            full = set(g.index) == set(corpora)
            gm = lambda col: float(np.exp(np.log(g[col]).mean()))  # noqa: E731
            cells = [f"{g.pruned_perplexity[c]:.3g} -> **{g.perplexity[c]:.3g}**" if c in g.index else "—"
                     for c in corpora]
            rows.append((not full, gm("perplexity"), f"| `{strategy}` | " + " | ".join(cells)
                         + f" | {gm('pruned_perplexity'):.4g}{'' if full else ' (partial)'} | "
                         f"{gm('perplexity'):.4g}{'' if full else ' (partial)'} | {g.selection_seconds.mean():.0f} |"))
        out += [r for *_, r in sorted(rows)] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    sys.path.insert(0, str(HERE))
    from lm_heal import run_method

    from fusion_prune.utils import machine_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--choice", type=Path, default=CHOICE, help="results.csv of an lm_compress run with no healing")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--depth", type=int, default=30, help="the teacher's layer count")
    ap.add_argument("--steps", type=int, default=20, help="LoRA healing steps")
    ap.add_argument("--target-layers", default="", help="comma-separated depths to heal (default: every depth "
                    "in --choice)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per window (lm-cpu's)")
    ap.add_argument("--max-eval-tokens", type=int, default=8192, help="held-out test tokens at most (lm-cpu's)")
    ap.add_argument("--worker", default="0/1", help="i/n: this process takes every n-th removed set from the i-th")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--summary-only", action="store_true", help="rewrite results.md from results.csv and stop")
    args = ap.parse_args(argv)
    csv = args.out / "results.csv"
    if args.summary_only:
        if not csv.is_file():
            ap.error(f"--summary-only: expected {str(csv)!r} to exist; it does not (run without it first)")
        return _write_summary(csv)
    if not args.choice.is_file():
        ap.error(f"--choice: expected an existing results.csv; received {str(args.choice)!r}")
    try:
        i, n = (int(x) for x in args.worker.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        ap.error(f"--worker: expected i/n with 0 <= i < n; received {args.worker!r}")
    choice = pd.read_csv(args.choice)
    if args.target_layers:
        choice = choice[choice.target_layers.isin([int(d) for d in args.target_layers.split(",")])]
    healed = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=[*KEY, "kept_layers", "heal_steps"])
    done = set(healed[KEY].astype(str).agg("|".join, axis=1))
    out = []
    for j, (corpus, gone, idx) in enumerate(plan(choice, args.depth)):
        if j % n != i:
            continue
        todo = [k for k in idx if "|".join(str(choice.loc[k, c]) for c in KEY) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        same = healed[(healed.dataset == corpus) & (healed.heal_steps == args.steps)
                      & (healed.kept_layers.map(lambda k: removed_layers(k, args.depth)) == gone)]
        if len(same):  # a strategy added later removed a set already healed: its result is reused
            old = same.iloc[0]
            r = {"pruned_perplexity": old.pruned_perplexity, "perplexity": old.perplexity,
                 "steps": old.heal_steps, "seconds": old.heal_seconds, "machine": old.machine, "date": old.date}
        else:
            r = run_method(Namespace(model=args.model, corpus=corpus, drop=0, drop_layers=gone, steps=args.steps,
                                     batch_size=4, max_length=args.max_length,
                                     max_eval_tokens=args.max_eval_tokens, lr=2e-4, method="lora"))
        names = [choice.loc[k, "strategy"] for k in idx]
        rows = []
        for k in idx:
            c = choice.loc[k]
            rows.append({**{col: c[col] for col in KEY}, "teacher_perplexity": c.teacher_perplexity,
                         "pruned_perplexity": r["pruned_perplexity"], "perplexity": r["perplexity"],
                         "choice_pruned_perplexity": c.pruned_perplexity,
                         "selection_seconds": c.selection_seconds, "kept_layers": c.kept_layers,
                         "heal": "lora", "heal_steps": r["steps"], "heal_seconds": r["seconds"],
                         "shared_with": " ".join(s for s in names if s != c.strategy),
                         "machine": r.get("machine", machine_description()),
                         "date": r.get("date", time.strftime("%Y-%m-%d"))})
        upsert(rows, csv)
        out += rows
        print(json.dumps({"corpus": corpus, "removed": gone, "strategies": names, "pruned": r["pruned_perplexity"],
                          "healed": r["perplexity"], "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return pd.DataFrame(out)


if __name__ == "__main__":
    main()
