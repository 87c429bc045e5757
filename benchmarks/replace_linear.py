"""Test perplexity of a pruned causal LM with and without linear replacement (``--replace linear``).

    python benchmarks/replace_linear.py --model smollm2-135m --dataset grimm-tales --drop 12,13,14,15,16,17

The student is the model with ``--drop`` (original indices) removed. The replacement is fitted on
``--samples`` training windows of 512 tokens (seeded sample, as compress draws it) and scored on
the test split with fusionprune's perplexity protocol. With ``--heal-steps N`` both the plain and
the replaced student are then healed alike (LoRA, compress's defaults otherwise) and scored again:
whether replacement and healing add up. Result: ``benchmarks/results/replace/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from fusion_prune.corpus import load_corpus, token_windows
from fusion_prune.lm import perplexity
from fusion_prune.models import load_causal_lm
from fusion_prune.replace import replace_linear
from fusion_prune.surgery import drop_layers
from fusion_prune.utils import versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "replace"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="grimm-tales")
    ap.add_argument("--drop", default="12,13,14,15,16,17")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heal-steps", type=int, default=0, help="LoRA steps for both students afterwards (0: none)")
    ap.add_argument("--objective", default="linear", choices=["linear", "linear-cosine"],
                    help="least squares, or then the cosine objective (--replace linear-cosine)")
    a = ap.parse_args()
    drop = [int(x) for x in a.drop.split(",")]
    teacher, tok = load_causal_lm(a.model)
    corpus = load_corpus(a.dataset)
    train = token_windows(tok, corpus.split("train"), 512)
    test = token_windows(tok, corpus.split("test"), 512)
    pick = np.sort(np.random.default_rng(a.seed).choice(len(train), min(a.samples, len(train)), replace=False))
    student = drop_layers(teacher, drop)
    row = {"model": a.model, "dataset": a.dataset, "dropped": drop, "samples": int(len(pick)),
           "teacher": perplexity(teacher, test)["perplexity"], "pruned": perplexity(student, test)["perplexity"]}
    t0 = time.perf_counter()
    row["replacement"] = replace_linear(teacher, student, train[pick], objective=a.objective)
    row["replace_seconds"] = round(time.perf_counter() - t0, 1)
    row["replaced"] = perplexity(student, test)["perplexity"]
    if a.heal_steps:
        from fusion_prune.heal import HealConfig, heal

        cfg = HealConfig(steps=a.heal_steps, seed=a.seed, progress=False)
        healed, _ = heal(student, train, cfg)
        row["replaced_healed"] = perplexity(healed, test)["perplexity"]
        del healed, student
        healed, _ = heal(drop_layers(teacher, drop), train, cfg)
        row["pruned_healed"] = perplexity(healed, test)["perplexity"]
        row["heal_steps"] = a.heal_steps
        print(f"after {a.heal_steps} LoRA steps: pruned {row['pruned_healed']:.3f}, replaced {row['replaced_healed']:.3f}")
    print(f"{a.model} on {a.dataset}, without {drop}: teacher {row['teacher']:.3f}, pruned {row['pruned']:.3f}, "
          f"{a.objective} replacement {row['replaced']:.3f} ({row['replace_seconds']} s to fit)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / (f"{a.model}-{a.dataset}-drop-{'-'.join(map(str, drop))}-n{len(pick)}"
                      + (f"-heal{a.heal_steps}" if a.heal_steps else "")
                      + ("-cosine" if a.objective == "linear-cosine" else "") + ".json")
    write_json_atomic(dest, {**row, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
                             "versions": versions()})
    print(json.dumps(row["replacement"]["runs"]), f"-> {dest}")


if __name__ == "__main__":
    main()
