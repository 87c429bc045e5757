"""Profile lm-cpu: causal-LM compression on real corpora, every strategy through the same loop.

    python benchmarks/lm_compress.py --corpora grimm-tales --strategies block-influence --depths 24,20
    python benchmarks/lm_compress.py --corpora grimm-tales,book-excerpts,bbc-news \\
        --strategies fusion,fusion-verify,block-influence,angular-block,deepest,sleb,taylor,best-signal,activation_patching,random

Budgets (fixed here, documented in benchmarks/journal.md): windows of 256 tokens; 4 calibration
windows per step; no recovery between removals; LoRA healing 40 steps of 4 windows (r 8, alpha 16,
all linear layers); distillation 20 steps (KL weight 0.5, T 2); perplexity on at most 8,192
held-out test tokens; zero-shot on 100 test examples each of rotten-tomatoes and bbc-news.

``fusion`` is the shipped LM configuration (the default LM bundle's model, normalisation and
target) fitted on the shipped LM rows **without** the evaluated corpus (leave-one-corpus-out);
``fusion-verify`` shortlists with that bundle and lets the measured drop-one NLL on the
validation windows decide (8, or ``--verify-windows N``: a row named ``fusion-verify-wN``);
``evo-search`` searches whole sets with that bundle as its prior; ``best-signal`` is the signal with the lowest regret on the other corpora's rows. No choice
reads a test split. A finished run (its folder under ``--runs``) is skipped, a stopped one
resumes; one row per run lands in ``results/lm-cpu/results.csv`` (``perplexity`` = after healing
and distillation; ``zero_shot_accuracy`` = the student's mean over the zero-shot sets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "lm-cpu"
# each task's own prompt and verbalisers (fusion_prune.lm.zero_shot_defaults: the record's protocol)
ZERO_SHOT = {"rotten-tomatoes": {"max_samples": 100, "max_length": 128},
             "bbc-news": {"max_samples": 100, "max_length": 256}}
KEY = ["dataset", "strategy", "seed", "target_layers"]
VERIFY_WINDOWS = 8  # validation windows fusion-verify measures its shortlist on (SLEB: the 4 calibration windows)


def _rows_without(corpus: str, rows_glob: str | None = None) -> pd.DataFrame:
    """The LM rows (default: the shipped ones) of every corpus but ``corpus``."""
    from fusion_prune import fusion as F

    rows = F.read_rows([rows_glob or str(F.DEFAULT_BUNDLE.parent / "rows-lm" / "*.parquet")])
    return rows[rows.dataset != corpus]


def _loco_bundle(corpus: str, work: Path, rows_glob: str | None = None) -> str:
    """The shipped LM configuration fitted on the LM rows of every corpus but ``corpus``."""
    from fusion_prune import fusion as F
    from fusion_prune.tasks import CausalLMTask

    path = work / "bundles" / f"loco-without-{Path(corpus).name}.npz"
    if not path.is_file():
        default = F.load_bundle(CausalLMTask.default_bundle)
        F.fit_bundle(_rows_without(corpus, rows_glob), default.model_type, default.features, default.feature_norm,
                     default.target, measured="loss_after_drop").save(path)
    return str(path)


def _best_signal(corpus: str, rows_glob: str | None = None) -> str:
    from fusion_prune import fusion as F

    return F.best_signal(F.use_measured(_rows_without(corpus, rows_glob), "loss_after_drop"))


def result_row(report: dict, corpus: str, strategy: str, seed: int, depth: int) -> dict:
    """One results.csv row from a compress report."""
    from fusion_prune.utils import machine_description

    zs = report.get("zero_shot") or {}
    student = [v["student"]["accuracy"] for v in zs.values()]
    return {"dataset": corpus, "strategy": strategy, "seed": seed, "target_layers": depth,
            "teacher_perplexity": report["teacher_perplexity"], "pruned_perplexity": report["pruned_perplexity"],
            "healed_perplexity": report["healed_perplexity"], "perplexity": report["student_perplexity"],
            "zero_shot_accuracy": sum(student) / len(student) if student else None,
            **{f"zero_shot_{k}_{stage}": v[stage]["accuracy"] for k, v in zs.items()
               for stage in ("teacher", "pruned", "student")},
            "finetune_steps": report["config"].get("finetune_steps", 0),
            "heal": (report.get("heal") or {}).get("method"), "heal_steps": (report.get("heal") or {}).get("steps"),
            "selection_seconds": report["selection_seconds"], "wall_seconds": report["wall_seconds"],
            "kept_layers": " ".join(map(str, report["kept_layers"])),
            "machine": machine_description()}


def run_one(model: str, corpus: str, strategy: str, seed: int, depth: int, runs: Path, out: Path, budgets: dict,
            rows_glob: str | None = None, log=print) -> dict:
    """Compress (or resume) one run and upsert its row into ``out/results.csv``."""
    from fusion_prune.heal import HealConfig
    from fusion_prune.loop import CompressConfig, compress_with_config
    from fusion_prune.report import write_table
    from fusion_prune.tasks import get_task

    labels = budgets.get("label_windows", VERIFY_WINDOWS) if strategy == "fusion-verify" else 0
    name = f"{strategy}-w{labels}" if labels and labels != VERIFY_WINDOWS else strategy  # its own row
    folder = runs / f"{Path(corpus).name}-l{depth}-{name}-s{seed}"
    if not (folder / "report.json").is_file():
        resolved, fusion_path = strategy, None
        if strategy in ("fusion", "fusion-verify", "evo-search"):
            fusion_path = _loco_bundle(corpus, runs, rows_glob)
        elif strategy == "best-signal":
            resolved = _best_signal(corpus, rows_glob)
        cfg = CompressConfig.from_options(target_layers=depth, strategy=resolved, fusion_path=fusion_path, task="causal-lm",
                             max_length=budgets["max_length"], batch_size=budgets["batch_size"],
                             signal_samples=budgets["signal_windows"], drop_one_samples=labels,
                             max_eval_tokens=budgets["max_eval_tokens"], seed=seed, progress=False,
                             finetune_steps=budgets.get("finetune_steps", 0),
                             heal=HealConfig(method=budgets.get("heal", "lora"), steps=budgets["heal_steps"],
                                             batch_size=budgets["batch_size"], progress=False),
                             lm_distill_steps=budgets["distill_steps"], kd_weight=0.5,
                             zero_shot=budgets["zero_shot"])
        task = get_task("causal-lm")
        compress_with_config(model, task.load_data(corpus), cfg, folder, resume=True, task=task)
    row = result_row(json.loads((folder / "report.json").read_text()), corpus, name, seed, depth)
    csv = out / "results.csv"
    old = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=list(row))
    if len(old):
        same = (old[KEY].astype(str).agg("|".join, axis=1) == "|".join(str(row[k]) for k in KEY))
        old = old[~same]
    write_table(pd.concat([old, pd.DataFrame([row])], ignore_index=True), csv)
    log(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpora", default="grimm-tales")
    ap.add_argument("--strategies", default="block-influence")
    ap.add_argument("--depths", default="24,20")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="full fine-tuning steps per removed layer between removals (0: none, the LM default)")
    ap.add_argument("--heal", default="lora", choices=["lora", "qlora", "full", "none"],
                    help="healing after the removals (compress's --heal)")
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--distill-steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-eval-tokens", type=int, default=8192)
    ap.add_argument("--zero-shot-samples", type=int, default=100, help="0: no zero-shot scoring")
    ap.add_argument("--verify-windows", type=int, default=VERIFY_WINDOWS,
                    help="validation windows fusion-verify measures its shortlist on; another count than "
                         f"{VERIFY_WINDOWS} is its own row, fusion-verify-wN")
    ap.add_argument("--rows", default=None, help="LM rows for the leave-one-corpus-out bundles (default: shipped)")
    ap.add_argument("--runs", type=Path, default=Path("runs") / "lm-cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    zero_shot = {k: {**v, "max_samples": args.zero_shot_samples} for k, v in ZERO_SHOT.items()} \
        if args.zero_shot_samples else {}
    budgets = {"max_length": args.max_length, "batch_size": 4, "signal_windows": 4,
               "label_windows": args.verify_windows,
               "max_eval_tokens": args.max_eval_tokens, "heal_steps": args.heal_steps,
               "distill_steps": args.distill_steps, "zero_shot": zero_shot, "finetune_steps": args.finetune_steps,
               "heal": args.heal}
    rows = []
    # seed 0 of everything first, then the extra seeds; the shallower depth last (the longer run)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for corpus in args.corpora.split(","):
            for strategy in args.strategies.split(","):
                for depth in [int(d) for d in args.depths.split(",")]:
                    rows.append(run_one(args.model, corpus, strategy, seed, depth, args.runs, args.out, budgets,
                                        args.rows, log=lambda m: print(m, flush=True)))
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
