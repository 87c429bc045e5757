"""Gradient signals of the task loss with respect to each layer's parameters.

Per layer, ``ctx.mean_grad_sq`` is the squared norm of the gradient of the mean calibration loss,
``ctx.taylor_sum`` the sum of |theta * that gradient|, and ``ctx.grad_sq_sum`` the example-weighted
sum over batches of the squared norm of each batch's gradient. The pass reduces each parameter's
gradient to these as soon as it exists, so no whole-model gradient is kept for a single batch.
"""

from __future__ import annotations

import numpy as np

from signals.registry import register_signal
from signals.capture import SignalContext


@register_signal("grad_norm", family="gradient", needs=("grads",), rule="prune_lowest", default=True)
def grad_norm(ctx: SignalContext) -> np.ndarray:
    """L2 norm of d(mean loss)/d(theta) over all of the layer's parameters."""
    return np.sqrt(ctx.mean_grad_sq)


@register_signal("grad_fisher", family="gradient", needs=("grads",), rule="prune_lowest", default=True)
def grad_fisher(ctx: SignalContext) -> np.ndarray:
    """Empirical diagonal Fisher at batch level: sum over parameters of the mean squared gradient."""
    return ctx.grad_sq_sum / max(ctx.examples, 1)


@register_signal("grad_taylor", family="gradient", needs=("grads",), rule="prune_lowest", default=True)
def grad_taylor(ctx: SignalContext) -> np.ndarray:
    """First-order Taylor importance: sum of |theta * grad| over the layer's parameters."""
    return ctx.taylor_sum.copy()
