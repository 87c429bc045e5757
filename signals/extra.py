"""Opt-in signals from the layerwise-importance literature, each needing passes of its own.

Not in the default vector; select them by name (``--extra activation_patching``). All hooks come
from :mod:`signals.capture` and are removed when each pass ends.
"""

from __future__ import annotations

import numpy as np
import torch

from signals.registry import register_signal
from fusion_prune.models import no_cache_kwargs
from signals.capture import SignalContext, restored_state, scale_output, skip_layer, task_loss

MC_SAMPLES = 8
IG_STEPS = 8


def _probs(ctx: SignalContext, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = ctx.model(**inputs, **no_cache_kwargs(ctx.model)).logits
    if logits.ndim == 3:  # causal LM: the next-token distribution after the last real token
        last = batch["attention_mask"].sum(1) - 1
        logits = logits[torch.arange(len(last), device=last.device), last]
    return logits.float().softmax(-1)


@register_signal("activation_patching", family="extra", needs=("passes",), rule="prune_lowest")
def activation_patching(ctx: SignalContext) -> np.ndarray:
    """Mean KL(p_full || p_skip) of the output distribution when the layer is replaced by identity."""
    kl = np.zeros(ctx.n_layers)
    with restored_state(ctx.model), torch.no_grad():
        ctx.model.eval()
        for batch in ctx.batches:
            p = _probs(ctx, batch)
            for i, layer in enumerate(ctx.layers):
                with skip_layer(layer):
                    q = _probs(ctx, batch)
                kl[i] += float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum())
    # KL is non-negative; float error can leave -1e-9 where the layer changes nothing.
    return np.maximum(kl, 0.0) / max(sum(len(b["input_ids"]) for b in ctx.batches), 1)


# mc_dropout and layer_conductance are left out of `analyze`'s default: 14x and 22x the cost of the
# shared pass, and the two worst rankers of the layer to remove (Spearman 0.21 and 0.23 with the
# measured drop-one accuracy, against 0.84 for activation_patching; benchmarks/results/extra-signals).
@register_signal("mc_dropout", family="extra", needs=("passes",), rule="prune_lowest", in_analysis=False)
def mc_dropout(ctx: SignalContext) -> np.ndarray:
    """Predictive variance when dropout is active in this layer only (MC dropout, 8 samples)."""
    out = np.zeros(ctx.n_layers)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with restored_state(ctx.model), torch.no_grad():
            ctx.model.eval()
            for i, layer in enumerate(ctx.layers):
                drops = [m for m in layer.modules() if isinstance(m, torch.nn.Dropout)]
                for m in drops:
                    m.train()
                try:
                    for batch in ctx.batches:
                        samples = torch.stack([_probs(ctx, batch) for _ in range(MC_SAMPLES)])  # (S, B, C)
                        out[i] += float(samples.var(0).sum(-1).sum())
                finally:
                    for m in drops:
                        m.eval()
    finally:
        torch.random.set_rng_state(gen_state)
    return out / max(sum(len(b["input_ids"]) for b in ctx.batches), 1)


@register_signal("layer_conductance", family="extra", needs=("passes",), rule="prune_lowest", in_analysis=False)
def layer_conductance(ctx: SignalContext) -> np.ndarray:
    """Integrated gradients through the layer: mean |sum_alpha h * dL/d(alpha h)| / steps (baseline 0)."""
    out = np.zeros(ctx.n_layers)
    with restored_state(ctx.model):
        ctx.model.eval()
        for i, layer in enumerate(ctx.layers):
            for batch in ctx.batches:
                total = None
                for step in range(1, IG_STEPS + 1):
                    kept: list = []
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    with scale_output(layer, step / IG_STEPS, kept):
                        res = task_loss(ctx.model, inputs, batch)
                        loss = res.loss_sum / res.count
                    (grad,) = torch.autograd.grad(loss, kept[0])
                    contrib = (kept[0].detach() / (step / IG_STEPS) * grad).sum(-1)  # (B, T)
                    total = contrib if total is None else total + contrib
                m = batch["attention_mask"].float()
                out[i] += float(((total / IG_STEPS).abs() * m).sum() / m.sum())
    return out / max(len(ctx.batches), 1)
