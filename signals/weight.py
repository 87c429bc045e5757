"""Data-free signals of each layer's weight matrices (biases and norm gains left out)."""

from __future__ import annotations

import numpy as np
import torch

from signals.registry import register_signal
from signals.capture import SignalContext

HIST_BINS = 256


@register_signal("weight_norm", family="weight", needs=("weights",), rule="prune_lowest", default=True)
def weight_norm(ctx: SignalContext) -> np.ndarray:
    """Frobenius norm of the layer's weights divided by sqrt(number of weights): their RMS."""
    out = []
    for i in range(ctx.n_layers):
        ws = ctx.layer_weights(i)
        out.append(float(sum((w.double() ** 2).sum() for w in ws) / sum(w.numel() for w in ws)) ** 0.5)
    return np.array(out)


def abs_entropy(values: torch.Tensor, bins: int = HIST_BINS) -> float:
    """Shannon entropy (nats) of the histogram of |values| over [0, max |values|]."""
    a = values.detach().abs().double().flatten()
    top = float(a.max())
    if top == 0:
        return 0.0
    p = torch.histc(a, bins=bins, min=0.0, max=top)
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


@register_signal("weight_entropy", family="weight", needs=("weights",), rule="prune_highest", default=True)
def weight_entropy(ctx: SignalContext) -> np.ndarray:
    """Entropy of the histogram of abs(weights) of all the layer's weight matrices."""
    return np.array([abs_entropy(torch.cat([w.flatten() for w in ctx.layer_weights(i)])) for i in range(ctx.n_layers)])
