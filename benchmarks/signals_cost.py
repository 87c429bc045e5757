"""Cost of the 12 signals in one shared pass, against a plain pass and against one pass per signal.

    python benchmarks/signals_cost.py --model minilm-l6 --dataset rotten-tomatoes

Three modes over the same calibration batches, each in a fresh subprocess so that its peak
memory is its own:

* ``plain``: one forward and one backward of the task loss per batch (the model as loaded);
* ``fused``: :func:`signals.compute_signals`'s engine, all 12 signals from one shared pass;
* ``separate``: each of the 12 signals computed with a pass of its own;
* any signal's name (``activation_patching``, ``mc_dropout``, ``layer_conductance``...): that
  signal alone, with the passes it needs (how an opt-in extra adds to a step's cost);
* a feature set, names joined by ``+`` (``12`` stands for the 12 defaults): those signals from one
  shared capture, as fusion computes a bundle's features (``12+activation_patching``,
  ``weight_norm+weight_entropy``): what each candidate feature set costs a step.

Wall time covers the passes and the signal functions (MI included), after one warm-up batch.
Peak memory is the highest resident set size (CPU, sampled every 2 ms) or allocated CUDA memory
above the level at the start of the measured work. The last line is ``signals/plain ratio: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "signals_cost"


class PeakRSS:
    """Peak resident memory above the level at start, sampled in a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def set_names(mode: str) -> list[str]:
    """Signal names of a feature-set mode: ``a+b+...``, where ``12`` stands for the 12 defaults."""
    from signals import DEFAULT_SIGNALS

    return list(dict.fromkeys(n for part in mode.split("+") for n in (DEFAULT_SIGNALS if part == "12" else [part])))


def run_mode(args) -> dict:
    import torch

    from fusion_prune.data import load_dataset
    from fusion_prune.data import make_loader, subsample
    from fusion_prune.models import load_classifier
    from signals import DEFAULT_SIGNALS, SIGNALS, signals_frame
    from signals.capture import capture, task_loss

    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    model, tok, _ = load_classifier(args.model, data.labels)
    device = "cuda" if args.device == "cuda" else "cpu"
    model.to(device).eval()
    df = subsample(data.validation, args.batches * args.batch_size, 0)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_loader(df, tok, args.batch_size, args.max_length)]
    chosen = [SIGNALS[n] for n in DEFAULT_SIGNALS]

    def plain(bs):
        for b in bs:
            res = task_loss(model, {k: v for k, v in b.items() if k != "labels"}, b)
            (res.loss_sum / res.count).backward()
        model.zero_grad(set_to_none=True)

    def separate(bs):
        for s in chosen:
            signals_frame(capture(model, bs, s.needs), [s])

    def feature_set(mode):
        group = [SIGNALS[n] for n in set_names(mode)]
        return lambda bs: signals_frame(capture(model, bs, frozenset().union(*(s.needs for s in group))), group)

    # "fused" is the feature set of the 12: their needs captured once, every signal from that pass
    work = {"plain": plain, "separate": separate}.get(args.mode) or feature_set("12" if args.mode == "fused"
                                                                                 else args.mode)
    work(batches[:1])  # warm-up: lazy allocations and kernels
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        work(batches)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else rss.delta
    return {"mode": args.mode, "seconds": seconds, "peak_bytes": peak, "batches": len(batches)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default="plain,fused,separate")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return {}

    from signals import SIGNALS

    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in ("plain", "fused", "separate")
               and not all(n in SIGNALS for n in set_names(m))]:
        sys.exit(f"--modes: expected plain, fused, separate or signal names joined by '+' ({', '.join(SIGNALS)}, "
                 f"or 12 for the defaults); got {bad[0]!r}")
    rows = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--dataset", args.dataset,
               "--batches", str(args.batches), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode:>9.40}: {rows[mode]['seconds']:8.2f} s  peak +{rows[mode]['peak_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    plain = rows.get("plain")
    result = {"model": args.model, "dataset": args.dataset, "batches": args.batches, "batch_size": args.batch_size,
              "max_length": args.max_length, "device": args.device,
              "machine": f"{platform.machine()} {os.cpu_count()} cores" if args.device == "cpu" else args.device,
              "date": time.strftime("%Y-%m-%d"), "modes": rows}
    if plain:
        for mode in rows:
            result[f"{mode}/plain time"] = rows[mode]["seconds"] / plain["seconds"]
            result[f"{mode}/plain peak memory"] = rows[mode]["peak_bytes"] / max(plain["peak_bytes"], 1)
    from fusion_prune.utils import versions, write_json_atomic

    result["versions"] = versions()
    out = args.out or RESULTS / f"{Path(args.model).name}-{args.device}-b{args.batch_size}-t{args.max_length}.json"
    write_json_atomic(out, result)
    print(f"results: {out}")
    if plain:
        for mode in rows:
            if mode != "plain":
                print(f"{mode}/plain: time {result[f'{mode}/plain time']:.2f}x, "
                      f"peak memory {result[f'{mode}/plain peak memory']:.2f}x")
        if "fused" in rows:
            print(f"signals/plain ratio: {result['fused/plain time']:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
