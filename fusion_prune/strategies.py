"""How a layer to remove is scored from one state's signals table.

Every scorer maps a state's table (one row per layer, the signal columns) to a *removability*
score per layer: the layer with the highest score is the one to drop. Single signals use their
registered rule (``prune_lowest`` means low values are removable); ``consensus`` is the mean of
the min-max normalised, direction-aligned signals (the layerwise-importance framework).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from signals import DEFAULT_SIGNALS, SIGNALS
from signals.rules import consensus_removability, signal_removability

log = logging.getLogger(__name__)


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
    drop_one: pd.DataFrame | None = None  # the drop-one table, when the strategy needs it
    bundle: object | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    full_layers: int | None = None  # depth of the original model (default: inferred from orig_layers)
    task: object | None = None  # the fusion_prune.tasks.Task being compressed (strategies that measure need it)
    # measure(layers) -> drop-one table with only those (current) layers measured on validation data
    measure: Callable[[list[int]], pd.DataFrame] | None = None
    verify_k: int = 3  # fusion-verify's shortlist
    #: what the choice was made by, column -> one value per current layer (NaN: not scored); the
    #: last column noted decides. Written to the step's candidate table in report.md.
    evidence: dict[str, list[float]] = field(default_factory=dict)

    def note(self, column: str, values) -> None:
        """Record one score per current layer (array (n_layers,), or {layer: value} for some layers)."""
        if isinstance(values, dict):
            values = [values.get(i, np.nan) for i in range(self.n_layers)]
        self.evidence[column] = [float(v) for v in np.asarray(values, dtype=np.float64)]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[StrategyState], list[int]]  # -> current indices of the layer(s) to drop now
    needs_signals: bool = False
    needs_drop_one: bool = False
    needs_bundle: bool = False
    one_shot: bool = False  # removes every layer down to the target in one step
    doc: str = ""
    extra_signals: tuple[str, ...] = ()  # opt-in signals (beside the 12) the loop must compute for it


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, needs_signals: bool = False, needs_drop_one: bool = False,
                      needs_bundle: bool = False, one_shot: bool = False, extra_signals: Sequence[str] = ()) -> Callable:
    def wrap(fn: Callable[[StrategyState], list[int]]) -> Callable:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = Strategy(name, fn, needs_signals, needs_drop_one, needs_bundle, one_shot,
                                    (fn.__doc__ or "").strip(), tuple(extra_signals))
        return fn
    return wrap


def _argmax(scores: np.ndarray) -> list[int]:
    return [int(np.argmax(scores))]


def _noted_argmax(s: StrategyState, column: str, scores: np.ndarray, allowed: np.ndarray | None = None) -> list[int]:
    """Note ``scores`` (n_layers,) as the deciding evidence and choose its highest allowed layer."""
    s.note(column, scores)
    return _argmax(scores if allowed is None else np.where(allowed, scores, -np.inf))


def _note_measured(s: StrategyState, table: pd.DataFrame) -> None:
    """Note the task's measured drop-one value of each layer a (possibly partial) drop-one table holds."""
    col = s.task.drop_one_order[0][0]
    s.note(f"measured ({col})", {int(l): float(v) for l, v in zip(table["layer"], table[col])})


@register_strategy("fusion", needs_signals=True, needs_bundle=True)
def _fusion(s: StrategyState) -> list[int]:
    """The layer the fusion bundle predicts to keep the most accuracy without it."""
    return _noted_argmax(s, "predicted", s.bundle.predict(s.signals.sort_values("layer")))


@register_strategy("fusion-verify", needs_signals=True, needs_bundle=True)
def _fusion_verify(s: StrategyState) -> list[int]:
    """The fusion bundle shortlists its top k layers (--verify-k); the measured drop-one metric
    (as the oracle's, on k of the L layers) decides among them."""
    scores = s.bundle.predict(s.signals.sort_values("layer"))
    s.note("predicted", scores)
    short = [int(i) for i in np.argsort(-scores, kind="stable")[: s.verify_k]]
    if len(short) == 1:
        return short
    table = s.measure(short).dropna(subset=["loss_after_drop"])
    _note_measured(s, table)
    return [s.task.best_candidate(table)]


# Every signal, the opt-in extras too, is a strategy by its own rule; an extra is computed only
# when its strategy (or a bundle trained on it) is used. Signals that are a paper's criterion are
# registered below under the name users know (block_influence -> block-influence).
_NAMED_BELOW = {"block_influence"}
for _name in (n for n in SIGNALS if n not in _NAMED_BELOW):
    register_strategy(_name, needs_signals=True, extra_signals=() if _name in DEFAULT_SIGNALS else (_name,))(
        lambda s, n=_name: _noted_argmax(s, f"removability ({n})",
                                         signal_removability(s.signals.sort_values("layer"), n)))


@register_strategy("consensus", needs_signals=True)
def _consensus(s: StrategyState) -> list[int]:
    """Mean of min-max normalised, direction-aligned signals."""
    return _noted_argmax(s, "removability (consensus)", consensus_removability(s.signals.sort_values("layer")))


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
    # Gromov et al. measure decoders at the last token (it has seen the whole sequence); where the
    # task reads every position (classifiers) the mean over real tokens is kept (what every measured
    # result used). The task says which.
    start = int(np.argmin(block_angular_distance(s.model, s.batches, n,
                                                 last_token=getattr(s.task, "summary_at_last_token", False))))
    return list(range(start, start + n))


@register_strategy("random")
def _random(s: StrategyState) -> list[int]:
    """A uniformly random layer (seeded)."""
    return [int(s.rng.integers(s.n_layers))]


@register_strategy("oracle", needs_drop_one=True)
def _oracle(s: StrategyState) -> list[int]:
    """The layer whose removal measurably keeps the most validation accuracy (causal LM: the
    lowest validation NLL): the task's order of the drop-one table."""
    _note_measured(s, s.drop_one)
    return [s.task.best_candidate(s.drop_one)]


# --------------------------------------------------------------------------- criteria from the LLM papers


@register_strategy("block-influence", needs_signals=True, extra_signals=("block_influence",))
def _block_influence(s: StrategyState) -> list[int]:
    """ShortGPT (Men et al., 2024): the layer of lowest Block Influence, 1 - E[cos(h_in, h_out)]."""
    return _noted_argmax(s, "removability (block_influence)",
                         signal_removability(s.signals.sort_values("layer"), "block_influence"))


@register_strategy("deepest")
def _deepest(s: StrategyState) -> list[int]:
    """The deepest layer but the last (the last layer feeds the head and stays)."""
    return [max(s.n_layers - 2, 0)]


def _allowed(s: StrategyState, keep_first: int, keep_last: int) -> np.ndarray:
    """Mask (n_layers,) of current layers outside the first ``keep_first`` and last ``keep_last``
    *original* layers; all True when that would leave nothing."""
    L = _full_depth(s)
    orig = np.asarray(s.orig_layers)
    ok = (orig >= keep_first) & (orig < L - keep_last)
    return ok if ok.any() else np.ones_like(ok)


@register_strategy("sleb")
def _sleb(s: StrategyState) -> list[int]:
    """SLEB (Song et al., 2024): remove the layer whose removal least raises the loss on the
    calibration batches (next-token NLL for LMs), re-scored after every removal; the first and
    the last layer are kept."""
    table = s.task.score_batches(s.model, s.batches).table.sort_values("layer")
    loss = table["loss_after_drop"].to_numpy(dtype=np.float64)
    s.note("calibration loss after drop", loss)
    measured = np.isfinite(loss)  # a --guard-shortlist leaves the rest unmeasured (NaN)
    allowed = _allowed(s, 1, 1) & measured
    return _argmax(np.where(allowed if allowed.any() else measured, -loss, -np.inf))


@register_strategy("taylor", needs_signals=True)
def _taylor(s: StrategyState) -> list[int]:
    """Shortened LLaMA's Taylor+ (Kim et al., 2024): the lowest sum |theta * dL/dtheta| over the
    layer's weights, keeping the first 4 and last 2 original layers."""
    score = signal_removability(s.signals.sort_values("layer"), "grad_taylor")
    return _noted_argmax(s, "removability (grad_taylor)", score, _allowed(s, 4, 2))


# --------------------------------------------------------------------------- search beyond greedy


@register_strategy("evo-search", needs_signals=True, needs_bundle=True, one_shot=True)
def _evo_search(s: StrategyState) -> list[int]:
    """EvoPress-style search (Sieberling et al., 2024) for the whole set of L - target layers at once,
    by calibration loss with the set removed; the fusion bundle proposes the first set and guides
    the swaps, so few sets are measured. Keeps the first and last layers (as SLEB). The loss is the
    task's (:meth:`~fusion_prune.tasks.base.Task.kept_loss`: with a causal LM's --guard, it holds it)."""
    from fusion_prune.search import search_removal

    n, k = s.n_layers, s.n_layers - s.target_layers
    prior = s.bundle.predict(s.signals.sort_values("layer"))
    allowed = [int(i) for i in np.flatnonzero(_allowed(s, 1, 1))]
    if len(allowed) < k:
        allowed = list(range(n))

    def loss(removed: list[int]) -> float:
        return s.task.kept_loss(s.model, s.batches, [i for i in range(n) if i not in set(removed)])

    deepest = list(range(max(allowed) - k + 1, max(allowed) + 1))  # the contiguous block below the last layer
    result = search_removal(loss, allowed, k, prior=prior, seeds=[deepest], rng=s.rng)
    s.note("predicted", prior)
    s.note("removed in the best set", [float(i in result.removed) for i in range(n)])
    deepest_loss = next((v for r, v in result.trace if r == deepest), float("nan"))
    log.info("evo-search: measured %d sets of %d layers; best calibration loss %.4f (deepest block %.4f)",
             result.measured, k, result.loss, deepest_loss)
    return result.removed
