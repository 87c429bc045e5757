"""Causal-LM distillation with the teacher beside each step against a top-k teacher cache.

    python benchmarks/lm_kd_cache.py --model smollm2-135m --corpus grimm-tales --steps 10 --top-k 16,64

One pruned student (the deepest layers but the last removed, ``--drop`` of them: no signals, so
every mode starts from the same weights) is distilled from its teacher for ``--steps`` steps of
``--batch-size`` windows of ``--max-length`` tokens, once per mode, each mode in a fresh
subprocess so that its peak memory is its own: ``beside`` (the teacher's full-vocabulary logits
computed at every step, the default) and ``top-K`` for each K (the teacher's K largest logits per
token cached once before the steps, ``--kd-top-k K``). Reported per mode: seconds (cache + steps),
peak resident memory above the level after loading both models, the cache's size, the final
training loss and the held-out perplexity after distillation. Results go to
``results/lm-kd-cache/<model>-<corpus>.json``; the last lines print each mode against ``beside``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm-kd-cache"


def pruned_student(args):
    """(teacher, student, train windows (N, T), test windows (M, T)): ``args.model`` with its
    ``args.drop`` deepest layers but the last removed, or the layers ``args.drop_layers`` names
    (no signals: every mode starts alike)."""
    import torch

    from fusion_prune.corpus import token_windows
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import drop_layers
    from fusion_prune.tasks import get_task

    torch.manual_seed(0)
    data = get_task("causal-lm").load_data(args.corpus)
    teacher, tok = load_causal_lm(args.model)  # this process's GPU when it has one, else the CPU
    n = teacher.config.num_hidden_layers
    gone = [int(i) for i in args.drop_layers.split(",")] if args.drop_layers else list(range(n - 1 - args.drop, n - 1))
    student = drop_layers(teacher, gone)
    train = token_windows(tok, data.train, args.max_length, None, what="train split")
    test = token_windows(tok, data.test, args.max_length, args.max_eval_tokens, what="test split")
    return teacher, student, train, test


def add_student_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The options of :func:`pruned_student` and of the training budget, shared by the LM benchmarks."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="grimm-tales")
    ap.add_argument("--drop", type=int, default=6, help="deepest layers (but the last) removed first")
    ap.add_argument("--drop-layers", default="", help="comma-separated layer indices to remove instead of --drop "
                    "(e.g. the layers a compress run removed)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-eval-tokens", type=int, default=8192)


def student_argv(args) -> list[str]:
    """The command-line form of :func:`add_student_args`'s options, for a per-mode subprocess."""
    return ["--model", args.model, "--corpus", args.corpus, "--drop", str(args.drop), "--drop-layers", args.drop_layers,
            "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--max-eval-tokens", str(args.max_eval_tokens)]


def print_against(rows: dict[str, dict], reference: str) -> None:
    """One line per row but ``reference``: its time, peak memory and perplexity against the reference's."""
    ref = rows[reference]
    for name, r in rows.items():
        if name != reference:
            print(f"{name}/{reference}: time {r['seconds'] / ref['seconds']:.2f}x, peak memory "
                  f"{r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x, perplexity "
                  f"{r['perplexity'] - ref['perplexity']:+.2f}")


def run_mode(args) -> dict:
    sys.path.insert(0, str(HERE))
    from signals_cost import PeakRSS

    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.lm import perplexity

    teacher, student, train, test = pruned_student(args)
    k = 0 if args.mode == "beside" else int(args.mode.split("-")[1])
    cfg = HealConfig(method="full", steps=args.steps, batch_size=args.batch_size, kd_weight=0.5, kd_top_k=k,
                     seed=0, progress=False)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        student, stats = heal(student, train, cfg, teacher=teacher)
        seconds = time.perf_counter() - t0
    ppl = perplexity(student, test, batch_size=args.batch_size)["perplexity"]
    return {"mode": args.mode, "seconds": seconds, "peak_bytes": rss.delta, "final_loss": stats["final_loss"],
            "cache_bytes": stats.get("cache_bytes", 0), "cache_seconds": stats.get("cache_seconds", 0.0),
            "perplexity": ppl, "steps": stats["steps"], "train_windows": len(train)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_student_args(ap, steps=10)
    ap.add_argument("--top-k", default="16,64", help="comma-separated cache sizes")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: results/lm-kd-cache/<model>-<corpus>.json)")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: one mode in this process
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return {}
    if args.out is not None and args.out.is_dir():  # checked now, not after the modes have run
        ap.error(f"--out: expected a JSON file path; received the folder {str(args.out)!r}")
    modes = ["beside", *[f"top-{int(k)}" for k in args.top_k.split(",") if k]]
    rows = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--mode", mode, *student_argv(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rows[mode]
        print(f"{mode:>8}: {r['seconds']:7.1f} s  peak +{r['peak_bytes'] / 2**20:7.1f} MiB  cache "
              f"{r['cache_bytes'] / 2**20:6.1f} MiB  loss {r['final_loss']:.4f}  perplexity {r['perplexity']:.2f}",
              flush=True)
    from fusion_prune.utils import machine_description, versions, write_json_atomic

    result = {"model": args.model, "corpus": args.corpus, "drop": args.drop, "drop_layers": args.drop_layers,
              "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length,
              "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "modes": rows, "versions": versions()}
    out = args.out or RESULTS / f"{Path(args.model).name}-{Path(args.corpus).name}.json"
    write_json_atomic(out, result)
    print_against(rows, "beside")
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
