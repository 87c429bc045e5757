"""Gradient signals of the task loss with respect to each layer's parameters.

``ctx.mean_grads`` is the gradient of the mean calibration loss; ``ctx.grad_sq_sum`` holds, per
layer, the example-weighted sum over batches of the squared norm of each batch's gradient.
"""

from __future__ import annotations

import numpy as np

from signals.registry import register_signal
from signals.capture import SignalContext


@register_signal("grad_norm", family="gradient", needs=("grads",), rule="prune_lowest", default=True)
def grad_norm(ctx: SignalContext) -> np.ndarray:
    """L2 norm of d(mean loss)/d(theta) over all of the layer's parameters."""
    return np.array([float(sum((g.double() ** 2).sum() for g in gs)) ** 0.5 for gs in ctx.mean_grads])


@register_signal("grad_fisher", family="gradient", needs=("grads",), rule="prune_lowest", default=True)
def grad_fisher(ctx: SignalContext) -> np.ndarray:
    """Empirical diagonal Fisher at batch level: sum over parameters of the mean squared gradient."""
    return ctx.grad_sq_sum / max(ctx.examples, 1)


@register_signal("grad_taylor", family="gradient", needs=("grads",), rule="prune_lowest", default=True)
def grad_taylor(ctx: SignalContext) -> np.ndarray:
    """First-order Taylor importance: sum of |theta * grad| over the layer's parameters."""
    out = []
    for layer, gs in zip(ctx.layers, ctx.mean_grads):
        out.append(float(sum((p.detach().double() * g.double()).abs().sum() for p, g in zip(layer.parameters(), gs))))
    return np.array(out)
