"""Speed of a model and of its pruned depths, timed so that the numbers can be compared.

One timing taken in the middle of a run on a shared machine says more about the machine than about
the model. :func:`depth_speeds` times every depth a run went through at the end, back to back: each
round runs one forward of every depth in turn (so slow drift hits all alike), and each depth keeps
its fastest round (the least disturbed). Depths are views of the full model (its layer list swapped
for the kept layers, :func:`fusion_prune.surgery.temporary_layers`), so no copy is made. Beside
each measured speed-up stands the ideal one, FLOPs(full) / FLOPs(depth), counted by
``torch.utils.flop_counter`` on the same batch.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _sync(model: nn.Module) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def flops(model: nn.Module, batch: dict) -> int:
    """FLOPs of one forward of ``model`` on ``batch`` (attention counted with the eager implementation,
    which the counter sees; SDPA is invisible to it on the CPU)."""
    from fusion_prune.models import attention_implementation

    with attention_implementation(model, "eager"), torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(**batch)
    return fc.get_total_flops()


def time_forward(model: nn.Module, batch: dict) -> float:
    """Seconds of one forward of ``model`` on ``batch`` (the device synchronised around it)."""
    _sync(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**batch)
    _sync(model)
    return time.perf_counter() - t0


def prefill_kwargs(model: nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` for a causal LM: time its prefill as generation runs it (the head on the
    last position only), without the (B, T, V) logits a vocabulary of 262k tokens makes GiB-sized."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}


def depth_speeds(model: nn.Module, kept: list[list[int]], batch: dict, per_token: bool = False, repeats: int = 5,
                 warmup: int = 1) -> list[dict]:
    """One row per entry of ``kept`` (the current layer indices a depth keeps; ``model`` itself is the
    full model), timed in alternating rounds: ``{"layers", "throughput" (examples or, ``per_token``,
    tokens per second of the fastest round; a causal LM's prefill, :func:`prefill_kwargs`), "speedup"
    and "ideal_speedup" (against ``kept[0]``),
    "seconds" (every timed round)}``. ``batch``: model inputs, ``input_ids`` (B, T)."""
    from fusion_prune.models import no_cache_kwargs
    from fusion_prune.surgery import layer_list, temporary_layers

    inputs = {k: v for k, v in batch.items() if k != "labels"} | no_cache_kwargs(model) | prefill_kwargs(model)
    layers = list(layer_list(model))

    def view(idx: list[int]):
        return temporary_layers(model, [layers[i] for i in idx], list(idx))

    was_training = model.training
    model.eval()
    try:
        counted = []
        for idx in kept:
            with view(idx):
                counted.append(flops(model, inputs))
        times: list[list[float]] = [[] for _ in kept]
        for r in range(warmup + repeats):
            for d, idx in enumerate(kept):
                with view(idx):
                    t = time_forward(model, inputs)
                if r >= warmup:
                    times[d].append(t)
    finally:
        model.train(was_training)
    ids = inputs["input_ids"]
    n = ids.numel() if per_token else ids.shape[0]
    best = [min(t) for t in times]
    return [{"layers": len(idx), "throughput": n / b, "speedup": best[0] / b, "ideal_speedup": counted[0] / c,
             "gflops": c / 1e9, "seconds": t}
            for idx, b, c, t in zip(kept, best, counted, times)]
