"""Real causal-LM compression runs on this CPU: smollm2-135m on a prose corpus, to given depths.

    python benchmarks/lm_compress.py --depths 24,20 --corpus grimm-tales --strategy block-influence

Budgets (fixed here, documented in benchmarks/README.md): windows of 256 tokens; 4 calibration
windows per step; LoRA healing 40 steps of 4 windows (r 8, alpha 16, all linear layers);
distillation 20 steps (KL weight 0.5, T 2); perplexity on at most 8,192 held-out test tokens;
zero-shot on 100 test examples each of rotten-tomatoes and bbc-news. A finished run (its output
folder) is skipped, a stopped one resumes; one summary row per run lands in
``results/lm-cpu/runs.csv``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import pandas as pd

from fusion_prune.causal_lm import HealConfig
from fusion_prune.greedy import CompressConfig, compress
from fusion_prune.tasks import get_task
from fusion_prune.utils import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "lm-cpu"
ZERO_SHOT = {
    "rotten-tomatoes": {"prompt": "Review: {text}\nSentiment:", "verbalisers": "fresh=positive,rotten=negative",
                        "max_samples": 100, "max_length": 128},
    "bbc-news": {"prompt": "{text}\nTopic:", "verbalisers": None, "max_samples": 100, "max_length": 256},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="grimm-tales")
    ap.add_argument("--depths", default="24,20")
    ap.add_argument("--strategy", default="block-influence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--distill-steps", type=int, default=20)
    ap.add_argument("--runs", default=str(Path("runs") / "lm-cpu"))
    args = ap.parse_args(argv)
    for depth in [int(d) for d in args.depths.split(",")]:
        out = Path(args.runs) / f"{args.corpus}-l{depth}-{args.strategy}-s{args.seed}"
        if not (out / "report.json").is_file():
            cfg = CompressConfig(target_layers=depth, strategy=args.strategy, task="causal-lm", max_length=256,
                                 batch_size=4, signal_samples=4, max_eval_tokens=8192, seed=args.seed,
                                 heal=HealConfig(steps=args.heal_steps, batch_size=4),
                                 lm_distill_steps=args.distill_steps, kd_weight=0.5, zero_shot=ZERO_SHOT)
            task = get_task("causal-lm")
            compress(args.model, task.load_data(args.corpus), cfg, out, resume=True, task=task)
        r = json.loads((out / "report.json").read_text())
        row = {"dataset": args.corpus, "strategy": args.strategy, "seed": args.seed, "target_layers": depth,
               "teacher_perplexity": r["teacher_perplexity"], "pruned_perplexity": r["pruned_perplexity"],
               "healed_perplexity": r["healed_perplexity"], "perplexity": r["student_perplexity"],
               **{f"zero_shot_{k}_{stage}": v[stage]["accuracy"] for k, v in (r["zero_shot"] or {}).items()
                  for stage in ("teacher", "pruned", "student")},
               "selection_seconds": r["selection_seconds"], "wall_seconds": r["wall_seconds"],
               "kept_layers": " ".join(map(str, r["kept_layers"])), "machine": f"{platform.machine()} "
               f"{__import__('os').cpu_count()} cores (CPU)"}
        csv = RESULTS / "runs.csv"
        old = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
        key = ["dataset", "strategy", "seed", "target_layers"]
        if len(old):
            old = old[~(old[key].astype(str).agg("|".join, axis=1) ==
                        "|".join(str(row[k]) for k in key))]
        write_text_atomic(csv, pd.concat([old, pd.DataFrame([row])], ignore_index=True).to_csv(index=False))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
