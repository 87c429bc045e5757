"""Peak memory of one next-token loss forward and backward, head chunked by positions or by logits.

    python benchmarks/head_chunk.py --model gemma3-270m
    python benchmarks/head_chunk.py --model smollm2-135m

Each setting runs in a fresh process: the model (float32, layers checkpointed as healing and the
signals pass run them, only vectors trainable as under LoRA), B windows of T tokens of the asset corpus, then the summed next-token NLL
and its backward, with the head applied ``--chunk N`` positions at a time or, by default, as many
positions as make ``logits.CHUNK_ELEMENTS`` logits. The peak is the phase's resident high-water
mark (``memory.PhasePeaks``, Linux) minus the resident memory before it. Both settings must give
the same loss (relative 1e-5: only the order of the sums differs).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory"


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status (Linux only)")


def one(model_name: str, chunk: int | None, batch: int, seq: int) -> dict:
    import torch

    from fusion_prune.logits import causal_lm_of, chunk_positions, forward_hidden, next_token_sums
    from fusion_prune.memory import PhasePeaks, fix_mmap_threshold, release_free_memory
    from fusion_prune.models import load_native
    from fusion_prune.surgery import checkpointed_layers, layer_list

    fix_mmap_threshold(4 << 20)  # as a causal-LM run does
    model, _ = load_native(model_name, device="cpu")
    model.train()
    for p in model.parameters():  # as under LoRA: no weight matrix gets a gradient (the tied embedding's
        p.requires_grad_(p.ndim == 1)  # would be 0.67 GB on Gemma 3), the backward still runs every layer
    g = torch.Generator().manual_seed(0)
    vocab = causal_lm_of(model).get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    release_free_memory()
    before = _rss_now()
    peaks = PhasePeaks()
    t0 = time.perf_counter()
    with peaks.phase("loss"), checkpointed_layers(layer_list(model)):
        states, head, _ = forward_hidden(model, data)
        nll, _, count = next_token_sums(states, head, data, chunk_tokens=chunk)
        nll.backward()
    return {"model": model_name, "vocab": int(vocab), "positions_per_chunk": chunk or chunk_positions(vocab),
            "loss": float(nll) / count, "peak_above_load_bytes": peaks.record["loss"]["cpu_rss_bytes"] - before,
            "resident_after_load_bytes": before, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=None, help="(internal) one setting, printed as JSON")
    ap.add_argument("--one", action="store_true", help="(internal) run one setting in this process")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.chunk, a.batch_size, a.seq_len)))
        return
    rows = []
    for chunk in (512, None):  # the old fixed 512 positions, then the vocabulary-sized chunk
        cmd = [sys.executable, __file__, "--one", "--model", a.model, "--batch-size", str(a.batch_size),
               "--seq-len", str(a.seq_len)] + ([] if chunk is None else ["--chunk", str(chunk)])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['positions_per_chunk']:>4} positions per chunk: loss {r['loss']:.6f}, "
              f"peak above the loaded model {r['peak_above_load_bytes'] / 2**30:.2f} GiB, {r['seconds']} s")
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-5 * abs(rows[0]["loss"]), rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"head-chunk-{a.model}.json"
    dest.write_text(json.dumps({"rows": rows, "batch_size": a.batch_size, "seq_len": a.seq_len,
                                "machine": platform.processor() or platform.machine(),
                                "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"ratio (vocabulary-sized / 512): {rows[1]['peak_above_load_bytes'] / rows[0]['peak_above_load_bytes']:.2f}"
          f"  -> {dest}")


if __name__ == "__main__":
    main()
