"""Mutual information between each layer's pooled output and the labels or predictions.

Estimator (documented choice): mean-pooled layer outputs (N, hidden) are standardised and
projected to their first ``k = min(8, N - 1, hidden)`` principal components; scikit-learn's
``mutual_info_classif`` (k-NN estimator, 3 neighbours, fixed seed) gives the MI of each component
with the class, in nats, and the signal is their **mean**. Projecting first keeps the k-NN
estimator in a low dimension where it is usable with a few hundred examples.

For a causal LM the examples are predicting positions (see :mod:`signals.capture`) and the
"classes" are next tokens, bucketed: the ``LM_BUCKETS - 1`` most frequent gold next tokens of the
calibration sample keep their own class and every other token shares one "other" class; the
model's predicted tokens are bucketed with the same map.
"""

from __future__ import annotations

import numpy as np

from signals.registry import register_signal
from signals.capture import SignalContext

N_COMPONENTS = 8
LM_BUCKETS = 32


def bucket_tokens(gold: np.ndarray, other: np.ndarray, buckets: int = LM_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Map token ids to ``buckets`` classes: the ``buckets - 1`` most frequent ids of ``gold`` keep
    a class each (0 = most frequent), all others share class ``buckets - 1``."""
    values, counts = np.unique(gold, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[: buckets - 1]]
    index = {int(v): i for i, v in enumerate(top)}

    def f(a: np.ndarray) -> np.ndarray:
        return np.array([index.get(int(v), buckets - 1) for v in a], dtype=np.int64)

    return f(gold), f(other)


def pooled_mi(x: np.ndarray, y: np.ndarray, n_components: int = N_COMPONENTS, seed: int = 0) -> float:
    """Mean MI (nats) between the top principal components of ``x`` (N, D) and classes ``y`` (N,)."""
    from sklearn.decomposition import PCA
    from sklearn.feature_selection import mutual_info_classif

    # The k-NN estimator needs two members of a class to measure anything about it; next-token
    # "classes" of a language model are often singletons.
    values, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, values[counts >= 2])
    x, y = x[keep], y[keep]
    if len(np.unique(y)) < 2 or len(x) < 3:
        return 0.0
    x = x.astype(np.float64)
    std = x.std(0)
    x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    k = max(1, min(n_components, len(x) - 1, x.shape[1]))
    z = PCA(n_components=k, random_state=seed).fit_transform(x)
    return float(mutual_info_classif(z, y, n_neighbors=3, random_state=seed).mean())


def _mi(ctx: SignalContext, which: str) -> np.ndarray:
    y = ctx.target_array(which)
    if ctx.token_examples:  # next-token targets: a vocabulary of classes, bucketed
        gold, y = bucket_tokens(ctx.target_array("gold"), y)
        y = gold if which == "gold" else y
    return np.array([pooled_mi(ctx.pooled_array(i), y[: len(ctx.pooled_array(i))]) for i in range(ctx.n_layers)])


@register_signal("mi_task", family="information", needs=("pooled",), rule="prune_lowest", default=True)
def mi_task(ctx: SignalContext) -> np.ndarray:
    """MI between the layer's pooled output and the gold labels."""
    return _mi(ctx, "gold")


@register_signal("mi_prediction", family="information", needs=("pooled",), rule="prune_lowest", default=True)
def mi_prediction(ctx: SignalContext) -> np.ndarray:
    """MI between the layer's pooled output and the full model's predicted class."""
    return _mi(ctx, "predictions")
