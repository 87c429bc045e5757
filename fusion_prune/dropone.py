"""Drop-one measurement: the metric of a model with each single layer removed (no fine-tuning).

For every batch, one intact forward records each layer's input. The model with layer ``l``
removed computes exactly "the input of layer ``l``, then layers ``l+1..L-1``, then the head", so
for each candidate the layer list is swapped, for one forward, for ``[cached input of l] +
layers[l+1:]``: the model's own forward still builds masks, positions and the head, but only the
layers above ``l`` run. That is ``L (L + 1) / 2`` layer evaluations per batch instead of the
``L * L`` of dropping each layer and evaluating the whole model (``L`` intact + ``L (L - 1)``),
an ideal cost ratio of ``(L + 1) / (2 L)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from fusion_prune.errors import BadInputError
from fusion_prune.models import no_cache_kwargs
from fusion_prune.data import label_map, make_loader
from fusion_prune.surgery import drop_layers, kept_layers, layer_list, temporary_layers


class _CachedInput(nn.Module):
    """Stands in for the layers up to a removed one: returns the recorded output structure with
    the cached hidden states (the removed layer's input) in place of the real output."""

    def __init__(self, hidden: torch.Tensor, template_output, template_layer: nn.Module):
        super().__init__()
        self.hidden = hidden
        self.tail = tuple(template_output[1:]) if isinstance(template_output, tuple) else None
        # Decoder loops read per-layer attributes such as attention_type from each layer.
        for attr in ("attention_type", "layer_idx"):
            if hasattr(template_layer, attr):
                setattr(self, attr, getattr(template_layer, attr))

    def forward(self, *args, **kwargs):
        return self.hidden if self.tail is None else (self.hidden, *self.tail)


@dataclass
class DropOne:
    """``acc_before`` of the intact model and, per layer, the accuracy with that layer removed."""

    acc_before: float
    table: pd.DataFrame  # columns: layer, orig_layer, acc_after_drop, loss_after_drop
    examples: int
    seconds: float
    loss_before: float | None = None


def _check_classifier(model) -> None:
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise BadInputError(f"The 'model' parameter must be a sequence classifier to measure accuracy labels; "
                            f"got {type(model).__name__}.")


def _batches(model, tokenizer, data: pd.DataFrame, data_labels: list[str], batch_size: int, max_length: int):
    mapping = torch.as_tensor(label_map(model.config, data_labels))
    device = next(model.parameters()).device
    # Sums over rows: the order is free, so similar lengths share a batch (fewer padded tokens).
    for b in make_loader(data, tokenizer, batch_size, max_length, group_by_length=True):
        b["labels"] = mapping[b["labels"]]
        yield {k: v.to(device) for k, v in b.items()}


def _score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    return int((logits.argmax(-1) == labels).sum()), float(nn.functional.cross_entropy(
        logits.float(), labels, reduction="sum"))


#: a batch's entries that are targets of a scorer, not inputs of the model
TARGET_KEYS = ("labels", "teacher_logp")


def model_inputs(batch: dict) -> dict:
    """The entries of ``batch`` the model takes (all but :data:`TARGET_KEYS`)."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


#: ``score(model, inputs, batch) -> (correct, loss sum, count)``: run ``model`` on one batch's
#: ``inputs`` and score it; the count is examples for a classifier and predicted tokens for a
#: causal LM. The scorer runs the forward so that a task can avoid materialising what it does not need.
Scorer = Callable[[nn.Module, dict, dict], tuple[float, float, int]]


def classification_score(model: nn.Module, inputs: dict, batch: dict) -> tuple[float, float, int]:
    """Correct predictions, summed cross-entropy and examples of one classifier batch (logits (B, C))."""
    c, s = _score(model(**inputs).logits, batch["labels"])
    return c, s, len(batch["labels"])


def next_token_score(model: nn.Module, inputs: dict, batch: dict) -> tuple[float, float, int]:
    """Correct next-token predictions, summed next-token NLL and predicted tokens of one causal-LM
    batch (B, T): position t predicts token t + 1; padding (mask 0) is not predicted. The
    vocabulary's logits are computed a chunk of positions at a time (:mod:`fusion_prune.logits`)."""
    from fusion_prune.logits import forward_hidden, next_token_sums

    states, head, _ = forward_hidden(model, inputs)
    nll, correct, count = next_token_sums(states, head, batch)
    return correct, float(nll), count


@torch.no_grad()
def drop_one_scores(model, batches: list[dict], score: Scorer, progress: bool = False, desc: str = "drop-one",
                    only: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(before (3,), after (n_layers, 3)): summed ``score`` of the intact model and of the model
    without each single layer, over ``batches`` (on the model's device), with cached prefixes.

    Columns: correct, loss sum, count. ``only``: measure just these layers (the others' rows are
    NaN), at the cost of their removals alone. The model is not changed (its layer list is swapped
    for one forward at a time and put back).
    """
    from tqdm.auto import tqdm

    from signals.capture import record_layer_io

    layers = layer_list(model)
    n = len(layers)
    if n < 2:
        raise BadInputError("The 'model' parameter has 1 layer; expected at least 2 to remove one.")
    was_training = model.training
    model.eval()
    kw = no_cache_kwargs(model)
    before, after = np.zeros(3), np.zeros((n, 3))
    wanted = set(range(n)) if only is None else {int(l) for l in only}
    if only is not None:
        after[sorted(set(range(n)) - wanted)] = np.nan
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True):
            inputs = model_inputs(batch) | kw
            with record_layer_io(model) as seen:
                before += score(model, inputs, batch)
            for l, h_in, out in seen:
                if l not in wanted:
                    continue
                stand_in = _CachedInput(h_in, out, layers[l])
                with temporary_layers(model, [stand_in, *list(layers)[l + 1:]], list(range(l, n))):
                    after[l] += score(model, inputs, batch)
    finally:
        model.train(was_training)
    return before, after


@torch.no_grad()
def kept_scores(model, batches: list[dict], score: Scorer, keep: Sequence[int]) -> np.ndarray:
    """Summed ``score`` (correct, loss sum, count) of ``model`` run with only the current layers
    ``keep`` (in order) over ``batches``; the model is not changed (a view, put back after)."""
    layers = list(layer_list(model))
    keep = [int(i) for i in keep]
    was_training = model.training
    model.eval()
    kw = no_cache_kwargs(model)
    total = np.zeros(3)
    try:
        with temporary_layers(model, [layers[i] for i in keep], keep):
            for batch in batches:
                total += score(model, model_inputs(batch) | kw, batch)
    finally:
        model.train(was_training)
    return total


def drop_one_on_batches(model, batches: list[dict], score: Scorer, progress: bool = False,
                        desc: str = "drop-one", only: Sequence[int] | None = None) -> DropOne:
    """:func:`drop_one_scores` as a :class:`DropOne` table: accuracy and mean loss per removal."""
    t0 = time.perf_counter()
    before, after = drop_one_scores(model, batches, score, progress, desc, only)
    return _drop_one_table(model, before, after, time.perf_counter() - t0)


def drop_one_accuracy(model, tokenizer, data: pd.DataFrame, data_labels: list[str], batch_size: int = 64,
                    max_length: int = 128, progress: bool = False, only: Sequence[int] | None = None) -> DropOne:
    """Accuracy (and mean loss) of ``model`` on ``data`` with each single layer (or each of ``only``)
    removed, cached."""
    _check_classifier(model)
    batches = list(_batches(model, tokenizer, data, data_labels, batch_size, max_length))
    return drop_one_on_batches(model, batches, classification_score, progress, only=only)


def drop_one_nll(model, batches: list[dict], progress: bool = False, only: Sequence[int] | None = None) -> DropOne:
    """Next-token accuracy (``acc_after_drop``) and mean next-token NLL (``loss_after_drop``) of a
    causal LM with each single layer (or each of ``only``) removed, on token-window ``batches``;
    cached prefixes. ``examples`` counts predicted tokens."""
    return drop_one_on_batches(model, batches, next_token_score, progress, desc="drop-one NLL", only=only)


def _drop_one_table(model, before: np.ndarray, after: np.ndarray, seconds: float) -> DropOne:
    count = max(before[2], 1)
    table = pd.DataFrame({"layer": np.arange(len(after)), "orig_layer": kept_layers(model.config),
                          "acc_after_drop": after[:, 0] / count, "loss_after_drop": after[:, 1] / count})
    return DropOne(before[0] / count, table, int(before[2]), seconds, loss_before=before[1] / count)


@torch.no_grad()
def drop_one_naive(model, batches: list[dict], score: Scorer) -> DropOne:
    """The labels the slow way: drop each layer (a copy) and evaluate the whole model."""
    t0 = time.perf_counter()
    kw = no_cache_kwargs(model)

    def run(m) -> np.ndarray:
        m.eval()
        return sum((np.asarray(score(m, model_inputs(b) | kw, b))
                    for b in batches), np.zeros(3))

    n = len(layer_list(model))
    after = np.stack([run(drop_layers(model, [l])) for l in range(n)])
    return _drop_one_table(model, run(model), after, time.perf_counter() - t0)


def drop_one_accuracy_naive(model, tokenizer, data: pd.DataFrame, data_labels: list[str], batch_size: int = 64,
                          max_length: int = 128) -> DropOne:
    """:func:`drop_one_accuracy` the slow way (the reference its tests compare with)."""
    _check_classifier(model)
    return drop_one_naive(model, list(_batches(model, tokenizer, data, data_labels, batch_size, max_length)),
                          classification_score)


def drop_one_nll_naive(model, batches: list[dict]) -> DropOne:
    """:func:`drop_one_nll` the slow way."""
    return drop_one_naive(model, batches, next_token_score)


def drop_one_recovered(model, tokenizer, train_df: pd.DataFrame, data: pd.DataFrame, data_labels: list[str],
                              steps: int, batch_size: int = 32, lr: float = 1e-4, max_length: int = 128,
                              seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Accuracy on ``data`` of each single-layer removal **after** ``steps`` recovery steps.

    The label the greedy loop actually lives with: a layer whose removal hurts at once may
    recover in a few steps (the top layers often do). Every candidate gets the same batches,
    learning rate and seed, so the only difference between candidates is the layer removed.
    Cost: ``L`` short fine-tunes plus ``L`` evaluations; ``model`` itself is not changed.
    Returns a table (layer, orig_layer, acc_after_recovery), one row per current layer.
    """
    from tqdm.auto import tqdm

    from fusion_prune.finetune import FinetuneConfig, evaluate, train
    from fusion_prune.training import make_accelerator

    _check_classifier(model)
    n = len(layer_list(model))
    if n < 2:
        raise BadInputError("The 'model' parameter has 1 layer; expected at least 2 to remove one.")
    if steps < 1:
        raise BadInputError(f"The 'steps' parameter must be at least 1. Got {steps}.")
    cfg = FinetuneConfig(max_steps=steps, batch_size=batch_size, lr=lr, max_length=max_length, seed=seed,
                         warmup_ratio=0.0, progress=False)
    acc = []
    for layer in tqdm(range(n), desc="recovered labels", disable=not progress, dynamic_ncols=True):
        candidate = drop_layers(model, [layer])  # a copy: the input model stays as it is
        train(candidate, tokenizer, train_df, cfg, make_accelerator(cfg.mixed_precision))
        acc.append(evaluate(candidate, tokenizer, data, data_labels, batch_size=batch_size * 2,
                            max_length=max_length, progress=False)["accuracy"])
        del candidate
    return pd.DataFrame({"layer": np.arange(n), "orig_layer": kept_layers(model.config), "acc_after_recovery": acc})
