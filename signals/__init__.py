"""Layer-importance signals: a registry and :func:`compute_signals`.

A signal is a function from a :class:`~signals.capture.SignalContext` to one value per layer,
registered with the statistics it ``needs`` and its rule when used alone to pick a layer to
remove (``prune_lowest`` or ``prune_highest``). :func:`compute_signals` takes the union of the
needs of the requested signals and runs **one** shared pass (:func:`signals.capture.capture`).

Adding a signal is one decorated function::

    @register_signal("act_intensity", family="activation", needs=("outputs",), rule="prune_lowest")
    def act_intensity(ctx: SignalContext) -> np.ndarray:   # -> (n_layers,)
        return ctx.norm_sum / ctx.tokens
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from signals import capture  # the engine module (signals.capture.capture runs the pass)
from signals.capture import SignalContext
from signals.registry import (DEFAULT_SIGNALS, SIGNALS, Rule, Signal, SignalFn, analysis_extras, opt_in_signals,
                              register_signal, resolve_signals)

def compute_signals(model, tokenizer, data: pd.DataFrame, signals: Sequence[str] | None = None, *,
                    batch_size: int = 16, max_length: int = 128, max_samples: int | None = 256, seed: int = 0,
                    mi_cap: int = 2048, head_trained: bool = True, progress: bool = True) -> pd.DataFrame:
    """One row per layer of a **classifier**: ``layer``, ``orig_layer`` and one column per signal.

    ``data`` has columns ``text`` and ``label`` (class ids of the model's head). At most
    ``max_samples`` rows are used, drawn with ``seed``. The model is handed back as it came
    (mode, attention implementation, flags). Causal LMs: :func:`signals_on_batches` with
    token windows (``fusion_prune.tasks.CausalLMTask.signals`` builds them).
    """
    from fusion_prune.errors import BadInputError
    from fusion_prune.data import make_loader, subsample

    resolve_signals(signals)
    _check_head(model)
    if not head_trained:
        warnings.warn("the classification head was never trained for these labels: gradient and prediction-MI "
                      "signals refer to an untrained head", stacklevel=2)
    df = subsample(data, max_samples, seed)
    if len(df) == 0:
        raise BadInputError("The 'data' parameter has no rows; expected at least one calibration example.")
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in make_loader(df, tokenizer, batch_size, max_length)]
    return signals_on_batches(model, batches, signals, mi_cap=mi_cap, progress=progress)


def signals_on_batches(model, batches: list[dict], signals: Sequence[str] | None = None, *, mi_cap: int = 2048,
                       token_stride: int | None = None, checkpoint_layers: bool = False,
                       progress: bool = True) -> pd.DataFrame:
    """The signals table of ``model`` from ready batches on its device: one shared pass.

    Each batch holds ``input_ids``/``attention_mask`` (B, T) and ``labels`` (B,) (classifier) or
    is a batch of token windows (causal LM, ``token_stride`` = spacing of the predicting positions
    used by the MI signals). ``checkpoint_layers``: recompute each layer in the backward pass
    instead of keeping its activations (:func:`signals.capture.capture`).
    """
    from tqdm.auto import tqdm

    chosen = resolve_signals(signals)
    _check_head(model)
    needs = frozenset().union(*(s.needs for s in chosen))
    bar = tqdm(total=len(batches), desc="signals", disable=not progress, dynamic_ncols=True)
    try:
        ctx = capture.capture(model, batches, needs, mi_cap=mi_cap, progress=bar.update, token_stride=token_stride,
                              checkpoint_layers=checkpoint_layers)
        return signals_frame(ctx, chosen)
    finally:
        bar.close()


def _check_head(model) -> None:
    from fusion_prune.errors import BadInputError

    if getattr(model, "config", None) is None or not _has_head(model):
        raise BadInputError(
            f"The 'model' parameter must have a classification or language-model head; got {type(model).__name__}. "
            "Load it with fusion_prune.models.load_classifier or load_causal_lm."
        )


def signals_frame(ctx: SignalContext, chosen: Sequence[Signal]) -> pd.DataFrame:
    """Evaluate ``chosen`` on a captured context: the (n_layers, 2 + len(chosen)) table."""
    out = {"layer": np.arange(ctx.n_layers), "orig_layer": np.asarray(ctx.orig_layers)}
    for s in chosen:
        values = np.asarray(s.fn(ctx), dtype=np.float64)
        if values.shape != (ctx.n_layers,):
            raise RuntimeError(f"signal {s.name!r} returned shape {values.shape}, expected ({ctx.n_layers},)")
        if not np.isfinite(values).all():
            # Almost always non-finite activations (fp16 overflow, a diverged fine-tune), not a bug here.
            from fusion_prune.errors import BadInputError

            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise BadInputError(f"The signal {s.name!r} is {values[bad]} at layer {bad} (original layer "
                                f"{ctx.orig_layers[bad]}); expected finite values: check that the model's outputs "
                                "are finite on this data (a diverged fine-tune or fp16 overflow gives NaN).")
        out[s.name] = values
    return pd.DataFrame(out)


def _has_head(model) -> bool:
    name = type(model).__name__
    return name.endswith(("ForSequenceClassification", "ForCausalLM", "LMHeadModel"))


# Importing the signal modules registers them (in the order of docs/design.md, "The 12 signals").
from signals import activation, information, gradient, weight, attention, representation, extra  # noqa: E402,F401

__all__ = ["DEFAULT_SIGNALS", "SIGNALS", "Signal", "SignalContext", "analysis_extras", "compute_signals",
           "opt_in_signals", "register_signal", "resolve_signals", "signals_frame", "signals_on_batches"]
