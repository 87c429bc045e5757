"""onnxruntime CPU latency of a model against its layer-pruned student, next to PyTorch's.

    python benchmarks/onnx_latency.py --model minilm-l6 --drop 1,3,5
    python benchmarks/onnx_latency.py --model minilm-l6 --drop 1,3,5 --batch-sizes 1,32 --seq-len 128

Both models are exported with ``fusionprune.export.to_onnx`` (checked against PyTorch there); which
layers go does not change the cost. Each (runtime, model, batch size) is timed in interleaved
rounds so slow drift of the machine hits all alike; the median of the rounds is reported, and the
speed-up is teacher time / student time measured in the same rounds. Results go to
``benchmarks/results/onnx/``; absolute times hold for the machine named there only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fusion_prune.api import prune_to_folder
from fusion_prune.export import onnx_session, to_onnx
from fusion_prune.models import load_native
from fusion_prune.utils import versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "onnx"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--drop", default="1,3,5", help="layers the student lacks (current indices)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    drop = [int(x) for x in a.drop.split(",")]
    with tempfile.TemporaryDirectory(prefix="fusionprune-onnx-") as tmp:
        tmp = Path(tmp)
        prune_to_folder(a.model, drop, tmp / "student")
        exports = {"teacher": to_onnx(a.model, tmp / "teacher-onnx"),
                   "student": to_onnx(str(tmp / "student"), tmp / "student-onnx")}
        sessions = {k: onnx_session(tmp / f"{k}-onnx" / "model.onnx", a.threads) for k in exports}
        torch_models = {"teacher": load_native(a.model, device="cpu")[0].eval(),
                        "student": load_native(str(tmp / "student"), device="cpu")[0].eval()}
        g = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {}
        for b in map(int, a.batch_sizes.split(",")):
            ids = torch.randint(1000, 20000, (b, a.seq_len), generator=g)
            feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
            for r in range(a.rounds + 1):  # round 0 warms every path up and is not kept
                for who in ("teacher", "student"):
                    t0 = time.perf_counter()
                    sessions[who].run(None, feed)
                    t1 = time.perf_counter()
                    with torch.no_grad():
                        torch_models[who](input_ids=ids, attention_mask=torch.ones_like(ids))
                    t2 = time.perf_counter()
                    if r:
                        times.setdefault(f"onnxruntime/{who}/{b}", []).append(t1 - t0)
                        times.setdefault(f"pytorch/{who}/{b}", []).append(t2 - t1)
    rows = []
    for key in sorted(times):
        runtime, who, b = key.split("/")
        if who != "teacher":
            continue
        t, s = statistics.median(times[key]), statistics.median(times[f"{runtime}/student/{b}"])
        rows.append({"runtime": runtime, "batch_size": int(b), "seq_len": a.seq_len, "teacher_ms": round(t * 1e3, 2),
                     "student_ms": round(s * 1e3, 2), "speedup": round(t / s, 3)})
        print(f"{runtime:>11} batch {b:>3}: teacher {t * 1e3:8.2f} ms, student {s * 1e3:8.2f} ms, speed-up {t / s:.2f}x")
    onnx_vs_torch = {f"{r['batch_size']}/{who}": round(
        statistics.median(times[f"pytorch/{who}/{r['batch_size']}"]) /
        statistics.median(times[f"onnxruntime/{who}/{r['batch_size']}"]), 3)
        for r in rows if r["runtime"] == "onnxruntime" for who in ("teacher", "student")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"{a.model}-drop-{a.drop.replace(',', '-')}.json"
    write_json_atomic(dest, {"model": a.model, "dropped": drop, "rows": rows,
                             "pytorch_over_onnxruntime_time": onnx_vs_torch, "rounds": a.rounds,
                             "threads": a.threads, "exports": exports, "machine": platform.processor() or
                             platform.machine(), "cpus": torch.get_num_threads(),
                             "date": time.strftime("%Y-%m-%d"),
                             "versions": {**versions(), "onnxruntime": _ort_version()}})
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
