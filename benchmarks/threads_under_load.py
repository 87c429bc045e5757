"""How much a second job on the cores slows a fusionprune command, with torch's default thread count
(one per core) and with fusionprune's (the CPUs free when the command starts).

The command: ``fusionprune signals`` on minilm-l6 and rotten-tomatoes (one shared pass: forward,
backward, the 12 signals). The second job: a single-threaded torch matmul loop (another user's
work). Each condition runs ``--repeats`` times, alternating, and the fastest is kept.

    .venv/bin/python benchmarks/threads_under_load.py [--samples 256] [--repeats 2] [-o results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).with_name("fusionprune"))
HOG = ("import torch, time\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
       "while True:\n    a = torch.tanh(a @ a / 512)\n")


def run(samples: int, threads: str | None, load: bool, out: Path) -> tuple[float, str]:
    """Seconds of one command, and the thread line it logged; ``threads`` None: fusionprune's choice."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FUSIONPRUNE_THREADS")}
    if threads is not None:
        env["FUSIONPRUNE_THREADS"] = threads
    hog = subprocess.Popen([sys.executable, "-c", HOG], env={**env, "OMP_NUM_THREADS": "1"}) if load else None
    try:
        if hog is not None:
            time.sleep(3)  # the second job is running when the command starts
        t0 = time.perf_counter()
        res = subprocess.run([CLI, "signals", "-m", "minilm-l6", "-d", "rotten-tomatoes", "--samples", str(samples),
                              "-o", str(out), "--overwrite"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if res.returncode:
        raise SystemExit(res.stderr)
    said = [line for line in res.stderr.splitlines() if "thread" in line]
    return seconds, said[0] if said else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/threads/threads_under_load.json"))
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    conditions = {"alone, default": (None, False), "second job, torch default (a thread per core)": (str(cores), True),
                  "second job, fusionprune's choice": (None, True)}
    best: dict[str, float] = {}
    said: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, (threads, load) in conditions.items():
                s, line = run(args.samples, threads, load, Path(tmp) / "s.parquet")
                print(f"round {r}: {name}: {s:.1f} s {line}", flush=True)
                best[name] = min(best.get(name, s), s)
                said[name] = line
    alone = best["alone, default"]
    rows = [{"condition": k, "seconds": round(v, 2), "slowdown": round(v / alone, 2), "log": said[k]}
            for k, v in best.items()]
    from fusion_prune.utils import machine_description

    record = {"command": f"fusionprune signals -m minilm-l6 -d rotten-tomatoes --samples {args.samples}",
              "second_job": "one single-threaded torch matmul loop", "repeats": args.repeats,
              "machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    for row in rows:
        print(f"{row['condition']:50s} {row['seconds']:7.1f} s  {row['slowdown']:.2f}x")


if __name__ == "__main__":
    main()
