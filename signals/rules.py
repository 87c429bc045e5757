"""Signals as rankings: each signal's rule turned into a removability score per layer.

Every scorer maps a state's table (one row per layer, the signal columns) to a *removability*
score per layer: the layer with the highest score is the one to drop. Single signals use their
registered rule (``prune_lowest`` means low values are removable); ``consensus`` is the mean of
the min-max normalised, direction-aligned signals (the layerwise-importance framework).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from signals.registry import DEFAULT_SIGNALS, SIGNALS


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
