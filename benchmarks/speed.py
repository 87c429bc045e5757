"""Throughput of a model against its layer-pruned versions, next to the ideal speedup from FLOPs.

    python benchmarks/speed.py --model minilm-l6 --depths 6,3
    python benchmarks/speed.py --model mpnet-base --depths 12,6 --device cuda --dtype bf16
    python benchmarks/speed.py --model smollm2-135m --depths 30,24,20 --batch-size 1 --seq-len 512 --generate 32

For a causal LM the forward over ``seq_len`` tokens is the prefill (reported as tokens/s), and
``--generate N`` also times greedy generation of N new tokens with the KV cache (tokens/s), its
ideal speedup counted from the FLOPs of one cached decoding step.

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
from fusion_prune.speed import flops, time_forward
from fusion_prune.surgery import describe, drop_layers, num_layers
from fusion_prune.utils import versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "speed"


def inputs(model, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def decode_flops(model, batch: dict) -> int:
    """FLOPs of one cached decoding step after a prefill of ``batch`` (causal LM)."""
    with torch.inference_mode():
        past = model(**batch, use_cache=True).past_key_values
        nxt = batch["input_ids"][:, -1:]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        with attention_implementation(model, "eager"), FlopCounterMode(display=False) as fc:
            model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
    return fc.get_total_flops()


def time_generate(model, batch: dict, n: int, device: str) -> float:
    """Seconds to generate ``n`` new tokens greedily with the KV cache (prefill included)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                       pad_token_id=model.config.pad_token_id or 0)
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
    ap.add_argument("--generate", type=int, default=0, help="causal LM: also time generating N new tokens")
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
            time_forward(m, batch)
    times: dict[int, list[float]] = {d: [] for d in depths}
    for _ in range(args.repeats):
        for d, m in models.items():
            times[d].append(time_forward(m, batch))
    med = {d: statistics.median(t) for d, t in times.items()}
    ref = max(depths)
    gen = {}
    if args.generate:
        gen_flops = {d: decode_flops(m, batch) for d, m in models.items()}
        gen_times: dict[int, list[float]] = {d: [] for d in depths}
        for _ in range(max(1, args.repeats // 2)):
            for d, m in models.items():
                gen_times[d].append(time_generate(m, batch, args.generate, args.device))
        for d in depths:
            g = statistics.median(gen_times[d])
            gen[d] = {"generate_tokens_per_second": args.batch_size * args.generate / g,
                      "generate_speedup": statistics.median(gen_times[ref]) / g,
                      "generate_ideal_speedup": gen_flops[ref] / gen_flops[d]}
    rows = []
    for d in depths:
        ideal = counted[ref] / counted[d]
        measured = med[ref] / med[d]
        rows.append({"depth": d, "parameters": describe(models[d])["parameters"], "gflops": counted[d] / 1e9,
                     "median_seconds": med[d], "examples_per_second": args.batch_size / med[d],
                     "tokens_per_second": args.batch_size * args.seq_len / med[d],
                     "speedup": measured, "ideal_speedup": ideal, "speedup_over_ideal": measured / ideal,
                     "seconds": times[d], **gen.get(d, {})})
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
    if gen:
        print(f"prefill {args.seq_len} tokens and generation of {args.generate} tokens (KV cache, greedy):")
        print(f"{'depth':>5} {'prefill tok/s':>14} {'gen tok/s':>10} {'gen speedup':>12} {'ideal':>6} {'ratio':>6}")
        for r in rows:
            print(f"{r['depth']:>5} {r['tokens_per_second']:>14.1f} {r['generate_tokens_per_second']:>10.1f} "
                  f"{r['generate_speedup']:>12.3f} {r['generate_ideal_speedup']:>6.3f} "
                  f"{r['generate_speedup'] / r['generate_ideal_speedup']:>6.3f}")
    print(f"results: {out}")
    pruned = [r["speedup_over_ideal"] for r in rows if r["depth"] != ref]
    worst = min(pruned) if pruned else 1.0
    print(f"speedup/ideal: {worst:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
