"""Causal-LM healing methods side by side: LoRA, QLoRA (4-bit NF4 base) and full fine-tuning.

    python benchmarks/lm_heal.py --model smollm2-135m --corpus grimm-tales --steps 20

One pruned student (the ``--drop`` deepest layers but the last removed, as in
``lm_kd_cache.py``: every method starts from the same weights) is healed for ``--steps`` steps
of ``--batch-size`` windows of ``--max-length`` tokens on plain next-token loss, once per
method, each in a fresh subprocess so that its peak memory is its own. Reported per method:
seconds, peak resident memory above the level after loading, trainable parameters, the final
training loss, and held-out perplexity of the healed model after saving and reloading it (for
QLoRA that is the full-precision model the adapters were merged into, not the 4-bit one they
trained against). Results go to ``results/lm-heal/<model>-<corpus>.json``; the last lines print
each method against LoRA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm-heal"
METHODS = ("lora", "qlora", "full")


def run_method(args) -> dict:
    sys.path.insert(0, str(HERE))
    from lm_kd_cache import pruned_student
    from signals_cost import PeakRSS
    from transformers import AutoModelForCausalLM

    import torch

    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.lm import perplexity

    teacher, student, train, test = pruned_student(args)
    del teacher  # not used here: free its memory before healing
    device = next(student.parameters()).device
    pruned = perplexity(student, test, batch_size=args.batch_size)["perplexity"]
    cfg = HealConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0,
                     progress=False)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        healed, stats = heal(student, train, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # measured as a user gets it: saved, then reloaded
        healed.save_pretrained(tmp)
        again = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
    ppl = perplexity(again, test, batch_size=args.batch_size)["perplexity"]
    return {"method": args.method, "seconds": seconds, "peak_bytes": rss.delta,
            # on a GPU the accelerator's memory during the steps is what QLoRA saves, not the host's
            "gpu_peak_bytes": stats.get("gpu_peak_bytes"),
            "trainable_parameters": stats["trainable_parameters"], "first_loss": stats["first_loss"],
            "final_loss": stats["final_loss"], "pruned_perplexity": pruned, "perplexity": ppl,
            "steps": stats["steps"], "train_windows": len(train)}


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(HERE))
    from lm_kd_cache import add_student_args, print_against, student_argv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_student_args(ap, steps=20)
    ap.add_argument("--lr", type=float, default=2e-4, help="the same for every method (compress's default)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: results/lm-heal/<model>-<corpus>[-drop-...].json)")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # internal: one method in this process
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(run_method(args)))
        return {}
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: expected some of {', '.join(METHODS)}; received {', '.join(unknown)}")
    if args.out is not None and args.out.is_dir():  # checked now, not after the methods have run
        ap.error(f"--out: expected a JSON file path; received the folder {str(args.out)!r}")
    rows = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--method", method, *student_argv(args), "--lr", str(args.lr)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"method {method} failed:\n{proc.stderr[-3000:]}")
        rows[method] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{method:>6}: {r['seconds']:7.1f} s  peak +{r['peak_bytes'] / 2**20:7.1f} MiB  trainable "
              f"{r['trainable_parameters'] / 1e6:6.2f} M  loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}  "
              f"perplexity {r['pruned_perplexity']:.2f} -> {r['perplexity']:.2f}", flush=True)
    from fusion_prune.utils import machine_description, versions, write_json_atomic

    result = {"model": args.model, "corpus": args.corpus, "drop": args.drop, "drop_layers": args.drop_layers,
              "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
              "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "methods": rows, "versions": versions()}
    tag = f"-drop-{args.drop_layers.replace(',', '-')}" if args.drop_layers else ""
    out = args.out or RESULTS / f"{Path(args.model).name}-{Path(args.corpus).name}{tag}.json"
    write_json_atomic(out, result)
    if "lora" in rows:
        print_against(rows, "lora")
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
