"""Peak memory of one distillation step of healing: full (B, T, V) logits against logits made a chunk
of positions at a time.

    python benchmarks/kd_chunk.py --model smollm2-135m

Each setting runs in a fresh process: the teacher (float32) and a student with six layers removed
(compress's guarded choice on grimm-tales), both resident as healing holds them; the student fully
trainable with its layers checkpointed (healing's ``--heal full``); ``--batch-size`` windows of
``--seq-len`` tokens of grimm-tales' train split; then healing's loss, ``0.5 * next-token CE + 0.5 *
KL(teacher || student)`` at temperature 2, and its backward. Two teachers:

- ``full``: the teacher beside the step, the KL over the whole vocabulary (``--kd-top-k 0``);
- ``topk``: the teacher's top 64 logits and the mass outside them, taken beside the step (healing
  under a time limit), the KL over those 65 bins.

Two ways to compute it:

- ``logits`` (healing before 2026-12-05): ``model(**batch).logits`` of both models, (B, T, V)
  each, and the losses of :mod:`distill.losses` over them (and for ``topk`` the teacher's top-k
  taken from its full logits, as ``teacher_topk_logits`` did);
- ``chunked`` (now): :func:`fusion_prune.heal.heal`'s own loss, the heads applied to
  :data:`fusion_prune.logits.CHUNK_ELEMENTS` logits at a time under checkpointing.

The peak is the phase's resident high-water mark (``memory.PhasePeaks``, Linux) minus the resident
memory before it. Both ways must give the same loss (relative 1e-4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from head_chunk import _rss_now  # noqa: E402  (the resident memory now, Linux)

RESULTS = HERE / "results" / "memory"
REMOVED = [17, 16, 18, 5, 25, 14]  # results/lm-e2e/grimm-tales24-oracle-guard2-kl: compress's guarded choice
TOP_K = 64
WEIGHT, TEMPERATURE = 0.5, 2.0


def _old_topk(teacher, ids, k: int, temperature: float):
    """The teacher's top-k, ids and log tail from its full (B, T, V) logits: the code before 2026-12-05."""
    import torch

    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        top = logits.topk(k, dim=-1)
        z = logits / temperature
        rest = torch.logsumexp(z.scatter(-1, top.indices, float("-inf")), -1) - torch.logsumexp(z, -1)
        return top.values.half(), top.indices.int(), rest.clamp_min(-80.0)


def one(model_name: str, teacher_kind: str, way: str, batch: int, seq: int) -> dict:
    import functools

    import torch

    from distill.losses import next_token_kl, teacher_kl, topk_kl_rows, topk_next_token_kl
    from distill.trainer import teacher_topk_logits
    from fusion_prune.corpus import load_corpus, token_windows
    from fusion_prune.logits import forward_hidden, next_token_kd_sums, next_token_loss
    from fusion_prune.memory import PhasePeaks, fix_mmap_threshold, release_free_memory
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import checkpointed_layers, drop_layers, layer_list

    fix_mmap_threshold(4 << 20)  # as a causal-LM run does
    teacher, tok = load_causal_lm(model_name)
    teacher.eval()
    student = drop_layers(teacher, REMOVED)
    student.train()
    ids = token_windows(tok, load_corpus("grimm-tales").train, seq, None, what="train split")[:batch]
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    release_free_memory()
    before = _rss_now()
    peaks = PhasePeaks()
    t0 = time.perf_counter()
    with peaks.phase("step"), checkpointed_layers(layer_list(student)):
        if way == "logits":
            logits = student(**data, use_cache=False).logits
            if teacher_kind == "full":
                with torch.no_grad():
                    t = teacher(**data, use_cache=False).logits
                kd = next_token_kl(logits, t, TEMPERATURE)
            else:
                values, idx, tail = _old_topk(teacher, ids, TOP_K, TEMPERATURE)
                kd = topk_next_token_kl(logits, values, idx, TEMPERATURE, teacher_log_tail=tail)
            loss = (1 - WEIGHT) * next_token_loss(logits, data) + WEIGHT * kd
        else:
            states, head, _ = forward_hidden(student, data)
            if teacher_kind == "full":
                with torch.no_grad():
                    t_states, t_head, _ = forward_hidden(teacher, data)
                described, kl = (t_states,), teacher_kl(t_head, TEMPERATURE)
            else:
                described = teacher_topk_logits(teacher, ids, TOP_K, batch, temperature=TEMPERATURE)
                kl = functools.partial(topk_kl_rows, temperature=TEMPERATURE)
            nll, kd_sum, count = next_token_kd_sums(states, head, data, described, kl)
            loss = ((1 - WEIGHT) * nll + WEIGHT * kd_sum) / count
        loss.backward()
    return {"model": model_name, "teacher": teacher_kind, "way": way, "loss": float(loss.detach()),
            "peak_above_load_bytes": peaks.record["step"]["cpu_rss_bytes"] - before,
            "resident_after_load_bytes": before, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--one", nargs=2, metavar=("TEACHER", "WAY"), help="(internal) one setting, printed as JSON")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, *a.one, a.batch_size, a.seq_len)))
        return
    from fusion_prune.utils import machine_description

    rows = []
    for kind in ("full", "topk"):
        for way in ("logits", "chunked"):
            cmd = [sys.executable, __file__, "--one", kind, way, "--model", a.model, "--batch-size",
                   str(a.batch_size), "--seq-len", str(a.seq_len)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                                   .stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{kind:>4} teacher, {way:>7}: loss {r['loss']:.5f}, peak above the loaded models "
                  f"{r['peak_above_load_bytes'] / 2**30:.2f} GiB, {r['seconds']} s", flush=True)
        old, new = rows[-2:]
        assert abs(old["loss"] - new["loss"]) <= 1e-4 * abs(old["loss"]), (old, new)
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"kd-chunk-{a.model}.json"
    from fusion_prune.utils import write_text_atomic

    write_text_atomic(dest, json.dumps({"rows": rows, "batch_size": a.batch_size, "seq_len": a.seq_len,
                                        "removed": REMOVED, "top_k": TOP_K, "machine": machine_description(),
                                        "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    for kind in ("full", "topk"):
        old, new = (r for r in rows if r["teacher"] == kind)
        print(f"{kind}: chunked / logits peak {new['peak_above_load_bytes'] / old['peak_above_load_bytes']:.2f}")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
