"""Seeded compress runs on tiny models whose results tests/data/golden_compress.json holds.

(``resume``: continue a stopped run; tests/test_golden.py checks both ways give these values.)

The values were recorded on the code before the task-seam restructuring (issue 33), again on one
CPU thread on 2026-12-03 (float sums depend on the thread count: the tests run on one thread a
pytest-xdist worker), and the classifier cases once more that day because training and evaluation
batches are now grouped by length (other batches, so another trajectory; the causal-LM cases did
not move), and must not move: ``python tests/golden_runs.py OUT.json`` writes them again (only after a change that is
*meant* to change results, with the reason in the commit).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

CASES = [  # (name, task, strategy)
    ("classifier-oracle", "classification", "oracle"),
    ("classifier-fusion", "classification", "fusion"),
    ("lm-fusion-verify", "causal-lm", "fusion-verify"),
    ("lm-sleb", "causal-lm", "sleb"),
]


@contextlib.contextmanager
def one_thread():
    """Compute on one CPU thread inside the block: the recorded values do not depend on the machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_thread()
def make_inputs(root: Path) -> dict[str, Path]:
    """The tiny teacher classifier, its data, the tiny Llama and its corpus, all seeded."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tokenizer, sentiment_frame, train_tiny_classifier
    from test_causal_lm import prose, tiny_decoder

    data = root / "sentiment"
    data.mkdir(parents=True, exist_ok=True)
    sentiment_frame(400, seed=1).to_csv(data / "train.csv", index=False)
    sentiment_frame(100, seed=2).to_csv(data / "test.csv", index=False)
    teacher = train_tiny_classifier(root / "clf", data, layers=3)
    llama = root / "llama"
    tiny_decoder("llama").save_pretrained(llama)
    make_tokenizer(llama).save_pretrained(llama)
    corpus = root / "corpus" / "story.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n\n".join(prose(60)))
    return {"teacher": teacher, "data": data, "llama": llama, "corpus": corpus}


def options(task: str, strategy: str) -> dict:
    """compress() keywords of each case (the public API, stable across the restructuring)."""
    from distill import DistillConfig
    from fusion_prune.heal import HealConfig

    if task == "classification":
        return dict(target_layers=1, strategy=strategy, finetune_steps=2, signal_samples=32, drop_one_samples=40,
                    max_eval_samples=60, max_length=16, batch_size=8, lr=1e-3, seed=0,
                    distill=DistillConfig(max_steps=3, batch_size=8, progress=False), progress=False)
    return dict(target_layers=2, task="causal-lm", strategy=strategy, max_length=16, batch_size=2, signal_samples=2,
                drop_one_samples=2, max_eval_tokens=64, step_eval_samples=2,
                heal=HealConfig(steps=3, batch_size=2, progress=False), progress=False)


def summary(report: dict, model) -> dict:
    """What must not move: the kept layers, each step's choice, metric and drop-one losses, the final
    metrics and a fingerprint of the final weights (sum and sum of squares in float64)."""
    import torch

    metric_keys = ("teacher_accuracy", "pruned_accuracy", "student_accuracy", "teacher_perplexity",
                   "pruned_perplexity", "healed_perplexity", "student_perplexity")
    step_keys = ("validation_accuracy_after_finetune", "validation_perplexity", "measured_acc_after_drop",
                 "measured_nll_after_drop", "measured_after_drop")
    return {
        "kept_layers": report["kept_layers"],
        "dropped": [h["dropped_orig"] for h in report["history"]],
        "steps": [{**{k: h[k] for k in step_keys if k in h},
                   "drop_one_losses": (h.get("drop_one") or h.get("labels") or {}).get("loss_after_drop")} for h in report["history"]],
        "metrics": {k: report[k] for k in metric_keys if report.get(k) is not None},
        "weights": [float(sum(p.detach().double().sum() for p in model.parameters())),
                    float(sum(p.detach().double().pow(2).sum() for p in model.parameters()))],
    }


@one_thread()
def run_case(inputs: dict, name: str, task: str, strategy: str, out: Path, resume: bool = False):
    from fusion_prune import compress

    model, dataset = ((inputs["teacher"], inputs["data"]) if task == "classification"
                      else (inputs["llama"], inputs["corpus"]))
    kw = options(task, strategy)
    target = kw.pop("target_layers")
    result = compress(str(model), str(dataset), target, out / name, resume=resume, **kw)
    return result.report, result.model


if __name__ == "__main__":
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="golden-"))
    inputs = make_inputs(root)
    values = {name: summary(*run_case(inputs, name, task, strategy, root / "runs"))
              for name, task, strategy in CASES}
    Path(sys.argv[1]).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    print(json.dumps(values, indent=1))
