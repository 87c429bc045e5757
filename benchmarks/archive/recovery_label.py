"""Does fusion choose better when a layer is labelled after a short recovery instead of at once?

    python benchmarks/archive/recovery_label.py --threads 1      # collect what is missing (resumable), then evaluate
    python benchmarks/archive/recovery_label.py --evaluate-only
    python benchmarks/archive/recovery_label.py --loop           # the in-loop profiles cpu-recovery(-at-once)

The shipped rows label a layer by the validation accuracy right after its removal
(``acc_after_drop``). The greedy loop, though, fine-tunes after every drop, and some layers (the
top one above all) cost much at once but recover in a few steps. Here every candidate is labelled
twice on the same states: at once, and after ``--recovery-steps`` steps of fine-tuning
(``acc_after_recovery``; the cpu comparison gives 25 steps per removed layer).

Rows: per dataset, the cpu comparison's teacher (the very model that benchmark compresses; run
``compare.py --profile cpu`` first), the states a 6 -> 3 run visits (6, 5 and 4 layers), the
comparison's caps (length 64, 128 calibration and 256 validation examples). Evaluation,
leave-one-dataset-out, every choice scored by the **recovered** accuracy of the layer it picks
(regret, top-1, Spearman per state, averaged): fusion-rf fitted on either label of the other
datasets' rows, the shipped-rows bundle the comparison used, the before-recovery oracle, top,
the best single signal (chosen on the training datasets) and consensus. No choice reads a test
split. Writes benchmarks/results/recovery/{rows/*.parquet, lodo.csv, lodo.md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "recovery"
TEACHERS = HERE.parent / "results" / "cpu" / "work" / "teachers"
DATASETS = ["rotten-tomatoes", "bbc-news", "election-tweets", "reuters-r8", "reuters-r52", "20newsgroups"]


def collect_rows(datasets: list[str], out: Path, recovery_steps: int, log=print) -> list[Path]:
    """Collect (or resume) the rows of every dataset whose teacher exists; returns the finished files."""
    from fusion_prune.collect import CollectConfig, collect_many

    cfg = CollectConfig(min_layers=3, finetune_steps=25, signal_samples=128, max_eval_samples=256, max_length=64,
                        lr=1e-4, recovery_steps=recovery_steps, progress=False)
    return collect_many({d: TEACHERS / d for d in datasets}, cfg, out, log=lambda m: log(f"[recovery] {m}"))


def evaluate(rows: pd.DataFrame, shipped: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-dataset-out table: one row per (held-out dataset, method)."""
    from fusion_prune import fusion as F
    from signals.rules import consensus_removability, signal_removability

    default = F.load_bundle()
    norm, target = default.feature_norm, default.target
    feats = list(F.DEFAULT_SIGNALS)
    out = []
    for held in sorted(rows.dataset.unique()):
        train, test = rows[rows.dataset != held], rows[rows.dataset == held]
        # every method is judged by what the loop lives with; the at-once label stays readable
        scored = F.use_measured(test.assign(acc_at_once=test["acc_after_drop"]), "acc_after_recovery")

        def add(method: str, scorer, **extra) -> None:
            out.append({"held_out": held, "method": method, **extra, **F.choice_metrics(scored, scorer)})

        for label in ("acc_after_drop", "acc_after_recovery"):  # the two classifier labels
            b = F.fit_bundle(train, "rf", feats, norm, target, measured=label)
            add(f"fusion-rf ({label})", b.predict)
        b = F.fit_bundle(shipped[shipped.dataset != held], "rf", feats, norm, target)
        add("fusion-rf (shipped rows)", b.predict)
        add("oracle before recovery", lambda s: s["acc_at_once"].to_numpy() - 1e-6 * s["loss_after_drop"].to_numpy())
        add("top", lambda s: s["layer"].to_numpy(dtype=np.float64))
        base = F.baseline_metrics(F.use_measured(train, "acc_after_recovery"), feats)["signals"]
        best = min(base, key=lambda n: (base[n]["regret"], -np.nan_to_num(base[n]["spearman"])))
        add("best-signal", lambda s, n=best: signal_removability(s, n), signal=best)
        add("consensus", lambda s: consensus_removability(s, feats))
    return pd.DataFrame(out)


# In the loop: the compare.py profiles whose fusion-rf bundles learn from these rows, and the arm
# each stands for (the cpu profile's own fusion-rf learns from the shipped rows).
LOOP_ARMS = {"cpu-recovery": "fusion-rf (acc_after_recovery)", "cpu-recovery-at-once": "fusion-rf (acc_after_drop)",
             "cpu": "fusion-rf (shipped rows)"}


def loop_table(results: dict[str, pd.DataFrame]) -> str:
    """The recovery label in the full loop: each arm's fusion-rf minus the others and ``top`` on
    the (dataset, seed) cells both ran (same seed: same teacher, budget and test sample).

    ``results``: compare.py results.csv frames by profile name (keys of ``LOOP_ARMS``)."""
    import importlib.util

    compare = sys.modules.get("benchmarks_compare")
    if compare is None:  # a sibling script, not a package: load it by path
        spec = importlib.util.spec_from_file_location("benchmarks_compare", HERE.parent / "compare.py")
        compare = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks_compare"] = compare  # dataclasses look their module up here
        spec.loader.exec_module(compare)
    parts = []
    for profile, arm in LOOP_ARMS.items():
        r = results.get(profile)
        if r is None or r.empty:
            continue
        r = r.copy()
        r.loc[r.strategy == "fusion-rf", "strategy"] = arm
        parts.append(r[(r.strategy == arm) | ((profile == "cpu") & (r.strategy == "top"))])
    if not parts:
        return ""
    allr = pd.concat(parts, ignore_index=True)
    datasets = [d for d in DATASETS if d in set(allr.dataset)]
    arms = [a for a in LOOP_ARMS.values() if a in set(allr.strategy)]
    # each arm against the arms after it and top, so no difference appears twice with its sign flipped
    tables = [compare.paired_table(allr, [arm], datasets, rivals=(*arms[i + 1:], "top")).splitlines()
              for i, arm in enumerate(arms[:-1])]
    return "\n".join(tables[0] + [line for t in tables[1:] for line in t[2:]]) if tables else ""


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from fusion_prune import fusion as F
    from fusion_prune.report import write_table
    from fusion_prune.utils import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--recovery-steps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the machine)")
    ap.add_argument("--evaluate-only", action="store_true")
    ap.add_argument("--loop", action="store_true",
                    help="only tabulate the in-loop profiles cpu-recovery and cpu-recovery-at-once (loop.md)")
    args = ap.parse_args(argv)
    if args.loop:
        found = {p: pd.read_csv(f) for p in LOOP_ARMS if (f := HERE.parent / "results" / p / "results.csv").is_file()}
        md = ("# Label after recovery, in the loop\n\nfusion-rf of each arm minus the other arms and `top`, on "
              "the cells both ran (same seed, teacher, budget and test sample). Arms: bundles fitted on "
              "these rows with the recovered label (`cpu-recovery`) or the label at once "
              "(`cpu-recovery-at-once`), and the cpu profile's on the shipped rows. Regenerate: "
              "`python benchmarks/archive/recovery_label.py --loop`.\n\n" + loop_table(found) + "\n")
        write_text_atomic(args.out / "loop.md", md)
        print(md)
        return pd.DataFrame()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    datasets = [d for d in args.datasets.split(",") if d]
    if args.evaluate_only:
        files = [p for d in datasets if (p := args.out / "rows" / f"{d}.parquet").is_file()]
    else:
        files = collect_rows(datasets, args.out, args.recovery_steps)
    if len(files) < 2:
        print(f"[recovery] rows for {len(files)} dataset(s); leave-one-dataset-out needs 2", file=sys.stderr)
        return pd.DataFrame()
    rows = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
    shipped = F.read_rows([str(F.DEFAULT_BUNDLE.parent / "rows" / "*.parquet")])
    res = evaluate(rows, shipped)
    write_table(res, args.out / "lodo.csv")
    md = (f"# Label after recovery ({len(files)} datasets, {F.count_states(rows)} states, "
          f"{args.recovery_steps} recovery steps)\n\nEach cell: regret / top-1 of the chosen layer, judged by "
          "its validation accuracy **after recovery**, averaged over the held-out dataset's states "
          "(6, 5, 4 layers). Regenerate: `python benchmarks/archive/recovery_label.py --evaluate-only`.\n\n"
          + F.lodo_markdown(res) + "\n")
    write_text_atomic(args.out / "lodo.md", md)
    print(md)
    return res


if __name__ == "__main__":
    main()
