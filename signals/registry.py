"""The signal registry: :data:`SIGNALS`, :func:`register_signal` and the default 12.

Its own module so that each signal module registers into it without importing the package that
imports them (no cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from signals.capture import NEEDS, SignalContext

Rule = Literal["prune_lowest", "prune_highest"]
SignalFn = Callable[[SignalContext], np.ndarray]

#: The default 12-dimensional feature vector, in the order of docs/design.md ("The 12 signals").
DEFAULT_SIGNALS: tuple[str, ...] = (
    "act_inhibition", "act_intensity", "act_energy", "mi_task", "mi_prediction", "grad_norm", "grad_fisher",
    "grad_taylor", "weight_norm", "weight_entropy", "attn_entropy", "repr_angular",
)


@dataclass(frozen=True)
class Signal:
    name: str
    family: str
    rule: Rule
    needs: frozenset[str]
    fn: SignalFn
    default: bool
    doc: str
    in_analysis: bool = True

    def direction(self) -> int:
        """+1 if a high value means important (prune lowest), -1 otherwise."""
        return 1 if self.rule == "prune_lowest" else -1


SIGNALS: dict[str, Signal] = {}


def register_signal(name: str, family: str, needs: Sequence[str], rule: Rule,
                    default: bool = False, in_analysis: bool = True) -> Callable[[SignalFn], SignalFn]:
    """Register ``fn(ctx) -> (n_layers,)`` as signal ``name``; duplicate names are rejected.

    ``default``: one of the 12 (:data:`DEFAULT_SIGNALS`). ``in_analysis``: an opt-in extra that
    ``analyze`` computes unless told otherwise (:func:`analysis_extras`); False for extras whose
    cost is out of proportion to what they tell.
    """
    if rule not in ("prune_lowest", "prune_highest"):
        raise ValueError(f"rule must be 'prune_lowest' or 'prune_highest', got {rule!r}")
    if set(needs) - NEEDS:
        raise ValueError(f"unknown needs {sorted(set(needs) - NEEDS)}; expected a subset of {sorted(NEEDS)}")

    def wrap(fn: SignalFn) -> SignalFn:
        if name in SIGNALS:
            raise ValueError(f"signal {name!r} is registered twice")
        SIGNALS[name] = Signal(name, family, rule, frozenset(needs), fn, default, (fn.__doc__ or "").strip(),
                               in_analysis)
        return fn

    return wrap


def opt_in_signals(in_analysis_only: bool = False) -> list[str]:
    """Every registered signal beside the 12, or only those ``analyze`` computes by default."""
    return [n for n, s in SIGNALS.items() if not s.default and (s.in_analysis or not in_analysis_only)]


def analysis_extras() -> list[str]:
    """The opt-in extras ``analyze`` computes by default (registered with ``in_analysis``)."""
    return opt_in_signals(in_analysis_only=True)


def resolve_signals(names: Sequence[str] | None) -> list[Signal]:
    """The requested signals (default: the 12), checked against the registry."""
    from fusion_prune.errors import bad_choice

    names = list(DEFAULT_SIGNALS if names is None else names)
    for n in names:
        if n not in SIGNALS:
            raise bad_choice("signals", n, SIGNALS)
    return [SIGNALS[n] for n in dict.fromkeys(names)]


