"""Cost of cached drop-one labels against dropping each layer and evaluating the whole model.

    python benchmarks/archive/labels_cost.py --model minilm-l6 --dataset rotten-tomatoes

Both compute the same numbers (tests assert it); the ideal time ratio is (L + 1) / (2 L): the
cached way runs L (L + 1) / 2 layers per batch, the naive way L * L. Embeddings and heads run
once per candidate in both, so the measured ratio sits a little above the ideal.
The last line is ``labels cached/naive ratio: X``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "labels_cost"


def main(argv: list[str] | None = None) -> dict:
    import torch

    from fusion_prune.data import load_dataset
    from fusion_prune.data import subsample
    from fusion_prune.dropone import drop_one_accuracy, drop_one_accuracy_naive
    from fusion_prune.models import load_classifier
    from fusion_prune.surgery import num_layers
    from fusion_prune.utils import versions, write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    model, tok, _ = load_classifier(args.model, data.labels)
    df = subsample(data.validation, args.samples, 0)
    kw = dict(batch_size=args.batch_size, max_length=args.max_length)
    drop_one_accuracy(model, tok, df.iloc[: args.batch_size], data.labels, **kw)  # warm-up
    t0 = time.perf_counter()
    cached = drop_one_accuracy(model, tok, df, data.labels, **kw)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = drop_one_accuracy_naive(model, tok, df, data.labels, **kw)
    t_naive = time.perf_counter() - t0
    L = num_layers(model)
    same = cached.table["acc_after_drop"].tolist() == naive.table["acc_after_drop"].tolist()
    result = {"model": args.model, "dataset": args.dataset, "layers": L, "examples": cached.examples,
              "batch_size": args.batch_size, "max_length": args.max_length, "cached_seconds": t_cached,
              "naive_seconds": t_naive, "ratio": t_cached / t_naive, "ideal_ratio": (L + 1) / (2 * L),
              "identical_accuracies": same, "acc_before": cached.acc_before,
              "acc_after_drop": cached.table["acc_after_drop"].tolist(), "date": time.strftime("%Y-%m-%d"),
              "versions": versions()}
    out = args.out or RESULTS / f"{Path(args.model).name}-{args.dataset}.json"
    write_json_atomic(out, result)
    print(f"{args.model}: L={L}, {cached.examples} examples, cached {t_cached:.1f} s, naive {t_naive:.1f} s, "
          f"identical accuracies: {same}")
    print(f"ideal (L+1)/(2L) = {result['ideal_ratio']:.3f}; measured/ideal = {result['ratio'] / result['ideal_ratio']:.3f}")
    print(f"results: {out}")
    print(f"labels cached/naive ratio: {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
