"""Attention signals, from the probabilities of the eager attention implementation."""

from __future__ import annotations

import numpy as np

from signals.registry import register_signal
from signals.capture import SignalContext


@register_signal("attn_entropy", family="attention", needs=("attentions",), rule="prune_highest", default=True)
def attn_entropy(ctx: SignalContext) -> np.ndarray:
    """Mean entropy (nats) of attention rows over heads and real query tokens; uniform rows are high."""
    return ctx.attn_entropy_sum / np.maximum(ctx.attn_rows, 1)
