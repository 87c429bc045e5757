"""Does the choice of layers decide how much zero-shot ability a removal costs? (issue 36)

    python benchmarks/zero_shot_choice.py --corpus grimm-tales --depth 24

For every strategy's seed-0 choice at ``--depth`` on ``--corpus`` in ``results/lm-cpu-choice``
(distinct removed sets once), the pruned model before any healing: zero-shot accuracy on the
healing table's two labelled tasks (200 examples each, its prompts, with standard errors) and the
test perplexity on the corpus (compress's protocol, at most 8,192 tokens). Rows land in
``results/lm-heal-table/zero-shot-by-choice.csv`` (resumable: a set already there is skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heal_table import CHOICE, RESULTS, zero_shot_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="grimm-tales")
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=200, help="examples of each zero-shot task")
    ap.add_argument("--out", default=str(RESULTS / "zero-shot-by-choice.csv"))
    args = ap.parse_args()

    import pandas as pd
    import torch

    from fusion_prune.corpus import load_corpus, token_windows
    from fusion_prune.lm import perplexity
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import drop_layers, num_layers

    torch.manual_seed(0)
    d = pd.read_csv(CHOICE)
    d = d[(d.dataset == args.corpus) & (d.target_layers == args.depth) & (d.seed == 0)]
    teacher, tok = load_causal_lm(args.model)
    test = token_windows(tok, load_corpus(args.corpus).test, 512, 8192, what="test split")
    n = num_layers(teacher)
    sets: dict[tuple, list[str]] = {}
    for row in d.itertuples():
        keep = {int(i) for i in str(row.kept_layers).split()}
        sets.setdefault(tuple(i for i in range(n) if i not in keep), []).append(row.strategy)
    out = Path(args.out)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    for removed, strategies in [((), ["teacher"])] + sorted(sets.items(), key=lambda kv: kv[1]):
        key = " ".join(map(str, removed))
        if not done.empty and ((done.corpus == args.corpus) & (done.removed.fillna("").astype(str) == key)).any():
            continue
        model = drop_layers(teacher, list(removed)) if removed else teacher
        zs = zero_shot_all(model, tok, args.samples)
        row = {"corpus": args.corpus, "depth": n - len(removed), "removed": key, "strategies": " ".join(strategies),
               "perplexity": perplexity(model, test)["perplexity"]}
        for name, r in zs.items():
            row[f"zs_{name}"], row[f"zs_{name}_se"] = r["accuracy"], r["se"]
        print(row, flush=True)
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        tmp = out.with_suffix(".tmp")
        done.to_csv(tmp, index=False)
        tmp.replace(out)


if __name__ == "__main__":
    main()
