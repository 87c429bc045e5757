"""Search for a *set* of layers to remove at once, beyond one-at-a-time greedy removal.

EvoPress (Sieberling et al., 2024) shows that the error of removing several layers is not the sum
of the single removals, so greedy removal can miss better sets at deep cuts. This is its
level-switch evolution reduced to depth pruning: a (1 + lambda) elitist search whose mutation swaps
one removed layer for one kept layer. Candidates come from a prior (the fusion bundle's
removability), so that few sets are measured: the first parent is the prior's top set, and
swaps prefer removing what the prior rates removable and restoring what it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class SearchResult:
    """The best set found, its loss, and the trace: one (set, loss) per measured candidate."""

    removed: list[int]
    loss: float
    measured: int
    trace: list[tuple[list[int], float]] = field(default_factory=list)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def search_removal(loss: Callable[[list[int]], float], allowed: list[int], k: int, prior: np.ndarray | None = None,
                   seeds: list[list[int]] = (), generations: int = 12, offspring: int = 6,
                   rng: np.random.Generator | None = None) -> SearchResult:
    """The set of ``k`` layers from ``allowed`` of lowest ``loss(set)`` that the search finds.

    ``prior``: removability per layer index (higher: rather removed), None for uniform. ``seeds``:
    further starting sets (e.g. a contiguous block); the best seed is the first parent. Each
    generation measures up to ``offspring`` new sets one swap away from the parent and keeps the
    best if it improves; a set is never measured twice. At most 1 + len(seeds) + generations x
    offspring calls of ``loss``.
    """
    rng = rng or np.random.default_rng(0)
    allowed = sorted(int(a) for a in allowed)
    if not 0 < k <= len(allowed):
        raise ValueError(f"k must be in 1..{len(allowed)} (the allowed layers); got {k}")
    p = np.zeros(max(allowed) + 1) if prior is None else np.asarray(prior, dtype=np.float64)
    # a prior on the scale of one unit: a strong but not absolute preference
    scale = np.std(p[allowed]) or 1.0
    z = (p - np.mean(p[allowed])) / scale
    seen: dict[tuple[int, ...], float] = {}
    trace: list[tuple[list[int], float]] = []

    def measure(s) -> float:
        key = tuple(sorted(int(i) for i in s))
        if key not in seen:
            seen[key] = float(loss(list(key)))
            trace.append((list(key), seen[key]))
        return seen[key]

    starts = [sorted(allowed, key=lambda i: -z[i])[:k], *[sorted(s) for s in seeds if len(set(s)) == k
                                                          and set(s) <= set(allowed)]]
    parent = min(starts, key=measure)
    best = measure(parent)
    for _ in range(generations):
        out_ = [i for i in allowed if i not in parent]
        if not out_:
            break
        children = []
        for _ in range(offspring * 4):  # draws, of which up to `offspring` are new sets
            restore = rng.choice(parent, p=_softmax(-z[parent]))  # rather bring back what the prior would keep
            remove = rng.choice(out_, p=_softmax(z[out_]))
            child = tuple(sorted([i for i in parent if i != restore] + [int(remove)]))
            if child not in seen and child not in children:
                children.append(child)
            if len(children) == offspring:
                break
        if not children:
            break
        scored = [(measure(c), c) for c in children]
        value, child = min(scored)
        if value < best:
            best, parent = value, list(child)
    return SearchResult(sorted(int(i) for i in parent), best, len(seen), trace)
