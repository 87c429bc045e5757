"""Representation change across each layer."""

from __future__ import annotations

import numpy as np

from signals.registry import register_signal
from signals.capture import SignalContext


@register_signal("repr_angular", family="representation", needs=("inputs", "outputs"), rule="prune_lowest",
                 default=True)
def repr_angular(ctx: SignalContext) -> np.ndarray:
    """Mean over real tokens of arccos(cos(h_in, h_out)) / pi (ShortGPT's Block Influence, Gromov n=1)."""
    return ctx.angular_sum / np.maximum(ctx.tokens, 1)


@register_signal("block_influence", family="representation", needs=("inputs", "outputs"), rule="prune_lowest")
def block_influence(ctx: SignalContext) -> np.ndarray:
    """ShortGPT's Block Influence: mean over real tokens of 1 - cos(h_in, h_out) (opt-in)."""
    return ctx.influence_sum / np.maximum(ctx.tokens, 1)
