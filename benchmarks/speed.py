"""Throughput of a model against its layer-pruned versions, next to the ideal speedup from FLOPs.

    python benchmarks/speed.py --model minilm-l6 --depths 6,3
    python benchmarks/speed.py --model mpnet-base --depths 12,6 --device cuda --dtype bf16

For each depth the model keeps its first ``d`` layers (which layers go does not change the cost).
The ideal speedup is FLOPs(full) / FLOPs(pruned), counted by ``torch.utils.flop_counter`` over one
whole forward pass (embeddings, pooler or LM head included; attention counted with the eager
implementation because SDPA is invisible to the counter on CPU). Timings interleave the depths
round by round, so slow drift of the machine hits every depth alike; the median is reported.
The last line is ``speedup/ideal: X`` for the worst pruned depth.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fusion_prune.models import attention_implementation, load_native
from fusion_prune.surgery import describe, drop_layers, num_layers
from fusion_prune.utils import versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "speed"


def inputs(model, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def flops(model, batch: dict) -> int:
    with attention_implementation(model, "eager"), torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(**batch)
    return fc.get_total_flops()


def time_once(model, batch: dict, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--depths", default=None, help="comma-separated depths; default: full and half")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bf16"])
    ap.add_argument("--out", type=Path, default=None, help="JSON result; default benchmarks/results/speed/")
    args = ap.parse_args(argv)

    base, _ = load_native(args.model, device=None)  # placed below with its dtype
    full = num_layers(base)
    depths = [int(d) for d in args.depths.split(",")] if args.depths else [full, full // 2]
    if any(not 1 <= d <= full for d in depths):
        ap.error(f"--depths must lie in [1, {full}]; got {depths}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    models = {}
    for d in depths:
        m = base if d == full else drop_layers(base, list(range(d, full)))
        models[d] = m.to(args.device, dtype).eval()
    batch = inputs(base, args.batch_size, args.seq_len, args.device)
    counted = {d: flops(m, batch) for d, m in models.items()}
    for m in models.values():
        for _ in range(args.warmup):
            time_once(m, batch, args.device)
    times: dict[int, list[float]] = {d: [] for d in depths}
    for _ in range(args.repeats):
        for d, m in models.items():
            times[d].append(time_once(m, batch, args.device))
    med = {d: statistics.median(t) for d, t in times.items()}
    ref = max(depths)
    rows = []
    for d in depths:
        ideal = counted[ref] / counted[d]
        measured = med[ref] / med[d]
        rows.append({"depth": d, "parameters": describe(models[d])["parameters"], "gflops": counted[d] / 1e9,
                     "median_seconds": med[d], "examples_per_second": args.batch_size / med[d],
                     "speedup": measured, "ideal_speedup": ideal, "speedup_over_ideal": measured / ideal,
                     "seconds": times[d]})
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {"model": args.model, "device": args.device, "device_name": device_name, "dtype": args.dtype,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
              "reference_depth": ref, "rows": rows, "versions": versions(),
              "date": time.strftime("%Y-%m-%d")}
    out = args.out or RESULTS / f"{args.model}-{args.device}-{args.dtype}-b{args.batch_size}-t{args.seq_len}.json"
    write_json_atomic(out, result)

    print(f"{args.model} on {device_name}, batch {args.batch_size}, length {args.seq_len}, {args.dtype}, "
          f"median of {args.repeats}")
    print(f"{'depth':>5} {'params':>12} {'GFLOPs':>8} {'ex/s':>8} {'speedup':>8} {'ideal':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['depth']:>5} {r['parameters']:>12,} {r['gflops']:>8.1f} {r['examples_per_second']:>8.1f} "
              f"{r['speedup']:>8.3f} {r['ideal_speedup']:>6.3f} {r['speedup_over_ideal']:>6.3f}")
    print(f"results: {out}")
    pruned = [r["speedup_over_ideal"] for r in rows if r["depth"] != ref]
    worst = min(pruned) if pruned else 1.0
    print(f"speedup/ideal: {worst:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
