"""Activation statistics of each layer's output, over real (unmasked) tokens."""

from __future__ import annotations

import numpy as np

from signals.registry import register_signal
from signals.capture import SignalContext


@register_signal("act_inhibition", family="activation", needs=("outputs",), rule="prune_lowest", default=True)
def act_inhibition(ctx: SignalContext) -> np.ndarray:
    """Mean of the layer's output activations over all real tokens and hidden units."""
    return ctx.act_sum / np.maximum(ctx.act_elems, 1)


@register_signal("act_intensity", family="activation", needs=("outputs",), rule="prune_lowest", default=True)
def act_intensity(ctx: SignalContext) -> np.ndarray:
    """Mean L2 norm of the layer's output token vectors."""
    return ctx.norm_sum / np.maximum(ctx.tokens, 1)


@register_signal("act_energy", family="activation", needs=("outputs",), rule="prune_lowest", default=True)
def act_energy(ctx: SignalContext) -> np.ndarray:
    """Mean over examples of the output's squared Frobenius norm divided by the example's token count."""
    return ctx.energy_sum / max(ctx.examples, 1)
