"""How a layer to remove is scored from one state's signals table.

Every scorer maps a state's table (one row per layer, the signal columns) to a *removability*
score per layer: the layer with the highest score is the one to drop. Single signals use their
registered rule (``prune_lowest`` means low values are removable); ``consensus`` is the mean of
the min-max normalised, direction-aligned signals (the layerwise-importance framework).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from signals import DEFAULT_SIGNALS, SIGNALS


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant vector becomes all 0.5."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min()
    return np.full_like(x, 0.5) if span == 0 else (x - x.min()) / span


def signal_removability(table: pd.DataFrame, name: str) -> np.ndarray:
    """Removability of each layer by one signal and its rule: (n_layers,)."""
    return -SIGNALS[name].direction() * table[name].to_numpy(dtype=np.float64)


def consensus_removability(table: pd.DataFrame, names: Sequence[str] = DEFAULT_SIGNALS) -> np.ndarray:
    """Minus the mean of min-max normalised importances (direction-aligned) over ``names``."""
    importance = np.mean([minmax(SIGNALS[n].direction() * table[n].to_numpy(dtype=np.float64)) for n in names],
                         axis=0)
    return -importance


# --------------------------------------------------------------------------- the strategy registry


@dataclass
class StrategyState:
    """What a strategy may look at when it chooses: the current model and its measurements."""

    model: object
    batches: list  # calibration batches on the model's device
    n_layers: int
    target_layers: int
    orig_layers: list[int]  # original index of each current layer
    signals: pd.DataFrame | None = None  # one row per current layer, when the strategy needs signals
    labels: pd.DataFrame | None = None  # drop-one accuracies, when the strategy needs labels
    bundle: object | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    full_layers: int | None = None  # depth of the original model (default: inferred from orig_layers)


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[StrategyState], list[int]]  # -> current indices of the layer(s) to drop now
    needs_signals: bool = False
    needs_labels: bool = False
    needs_bundle: bool = False
    one_shot: bool = False  # removes every layer down to the target in one step
    doc: str = ""
    extra_signals: tuple[str, ...] = ()  # opt-in signals (beside the 12) the loop must compute for it


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, needs_signals: bool = False, needs_labels: bool = False, needs_bundle: bool = False,
                      one_shot: bool = False, extra_signals: Sequence[str] = ()) -> Callable:
    def wrap(fn: Callable[[StrategyState], list[int]]) -> Callable:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = Strategy(name, fn, needs_signals, needs_labels, needs_bundle, one_shot,
                                    (fn.__doc__ or "").strip(), tuple(extra_signals))
        return fn
    return wrap


def _argmax(scores: np.ndarray) -> list[int]:
    return [int(np.argmax(scores))]


@register_strategy("fusion", needs_signals=True, needs_bundle=True)
def _fusion(s: StrategyState) -> list[int]:
    """The layer the fusion bundle predicts to keep the most accuracy without it."""
    return [s.bundle.choose(s.signals)]


# Every signal, the opt-in extras too, is a strategy by its own rule; an extra is computed only
# when its strategy (or a bundle trained on it) is used.
for _name in SIGNALS:
    register_strategy(_name, needs_signals=True, extra_signals=() if _name in DEFAULT_SIGNALS else (_name,))(
        lambda s, n=_name: _argmax(signal_removability(s.signals.sort_values("layer"), n)))


@register_strategy("consensus", needs_signals=True)
def _consensus(s: StrategyState) -> list[int]:
    """Mean of min-max normalised, direction-aligned signals."""
    return _argmax(consensus_removability(s.signals.sort_values("layer")))


@register_strategy("top")
def _top(s: StrategyState) -> list[int]:
    """The highest remaining layer (Sajjad et al.: top-layer dropping)."""
    return [s.n_layers - 1]


@register_strategy("bottom")
def _bottom(s: StrategyState) -> list[int]:
    """The lowest remaining layer."""
    return [0]


def _by_original_order(s: StrategyState, order: list[int]) -> list[int]:
    pos = {orig: i for i, orig in enumerate(s.orig_layers)}
    for orig in order:
        if orig in pos:
            return [pos[orig]]
    return [s.n_layers - 1]


def _full_depth(s: StrategyState) -> int:
    if s.full_layers is not None:
        return s.full_layers
    return max(s.orig_layers) + 1 if s.orig_layers else s.n_layers


@register_strategy("alternate")
def _alternate(s: StrategyState) -> list[int]:
    """Every other original layer from the top (L-1, L-3, ...), then the top."""
    L = _full_depth(s)
    return _by_original_order(s, list(range(L - 1, -1, -2)))


@register_strategy("symmetric")
def _symmetric(s: StrategyState) -> list[int]:
    """Middle original layers first, moving outwards: keep the bottom and the top."""
    L = _full_depth(s)
    centre = (L - 1) / 2
    return _by_original_order(s, sorted(range(L), key=lambda i: (abs(i - centre), -i)))


@register_strategy("angular-block", one_shot=True)
def _angular_block(s: StrategyState) -> list[int]:
    """Gromov et al.: the contiguous block of L - target layers whose input and output are closest."""
    from signals.capture import block_angular_distance

    n = s.n_layers - s.target_layers
    start = int(np.argmin(block_angular_distance(s.model, s.batches, n)))
    return list(range(start, start + n))


@register_strategy("random")
def _random(s: StrategyState) -> list[int]:
    """A uniformly random layer (seeded)."""
    return [int(s.rng.integers(s.n_layers))]


@register_strategy("oracle", needs_labels=True)
def _oracle(s: StrategyState) -> list[int]:
    """The layer whose removal measurably keeps the most validation accuracy."""
    t = s.labels.sort_values(["acc_after_drop", "loss_after_drop"], ascending=[False, True])
    return [int(t.layer.iloc[0])]
