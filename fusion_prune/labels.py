"""Measured labels: the accuracy of a classifier with each single layer removed (no fine-tuning).

For every batch, one intact forward records each layer's input. The model with layer ``l``
removed computes exactly "the input of layer ``l``, then layers ``l+1..L-1``, then the head", so
for each candidate the layer list is swapped, for one forward, for ``[cached input of l] +
layers[l+1:]``: the model's own forward still builds masks, positions and the head, but only the
layers above ``l`` run. That is ``L (L + 1) / 2`` layer evaluations per batch instead of the
``L * L`` of dropping each layer and evaluating the whole model (``L`` intact + ``L (L - 1)``),
an ideal cost ratio of ``(L + 1) / (2 L)``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from fusion_prune.errors import BadInputError
from fusion_prune.finetune import label_map, make_loader
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
class DropLabels:
    """``acc_before`` of the intact model and, per layer, the accuracy with that layer removed."""

    acc_before: float
    table: pd.DataFrame  # columns: layer, orig_layer, acc_after_drop, loss_after_drop
    examples: int
    seconds: float


def _check_classifier(model) -> None:
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise BadInputError(f"The 'model' parameter must be a sequence classifier to measure accuracy labels; "
                            f"got {type(model).__name__}.")


def _batches(model, tokenizer, data: pd.DataFrame, data_labels: list[str], batch_size: int, max_length: int):
    mapping = torch.as_tensor(label_map(model.config, data_labels))
    device = next(model.parameters()).device
    for b in make_loader(data, tokenizer, batch_size, max_length):
        b["labels"] = mapping[b["labels"]]
        yield {k: v.to(device) for k, v in b.items()}


def _score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    return int((logits.argmax(-1) == labels).sum()), float(nn.functional.cross_entropy(
        logits.float(), labels, reduction="sum"))


@torch.no_grad()
def drop_one_labels(model, tokenizer, data: pd.DataFrame, data_labels: list[str], batch_size: int = 64,
                    max_length: int = 128, progress: bool = False) -> DropLabels:
    """Accuracy (and mean loss) of ``model`` on ``data`` with each single layer removed, cached."""
    from tqdm.auto import tqdm

    _check_classifier(model)
    layers = layer_list(model)
    n = len(layers)
    if n < 2:
        raise BadInputError("The 'model' parameter has 1 layer; expected at least 2 to remove one.")
    was_training = model.training
    model.eval()
    correct, loss = np.zeros(n), np.zeros(n)
    correct_before, total = 0, 0
    t0 = time.perf_counter()
    batches = list(_batches(model, tokenizer, data, data_labels, batch_size, max_length))
    try:
        for batch in tqdm(batches, desc="labels", disable=not progress, dynamic_ncols=True):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            seen: list = []
            hooks = [layer.register_forward_hook(lambda m, a, k, o, i=i: seen.append((i, _first(a, k), o)),
                                                 with_kwargs=True) for i, layer in enumerate(layers)]
            try:
                logits = model(**inputs, use_cache=False).logits if _takes_cache(model) else model(**inputs).logits
            finally:
                for h in hooks:
                    h.remove()
            c, _ = _score(logits, batch["labels"])
            correct_before += c
            total += len(batch["labels"])
            for l, h_in, out in seen:
                stand_in = _CachedInput(h_in, out, layers[l])
                with temporary_layers(model, [stand_in, *list(layers)[l + 1:]], list(range(l, n))):
                    kw = {"use_cache": False} if _takes_cache(model) else {}
                    c, s = _score(model(**inputs, **kw).logits, batch["labels"])
                correct[l] += c
                loss[l] += s
    finally:
        model.train(was_training)
    table = pd.DataFrame({"layer": np.arange(n), "orig_layer": kept_layers(model.config),
                          "acc_after_drop": correct / max(total, 1), "loss_after_drop": loss / max(total, 1)})
    return DropLabels(correct_before / max(total, 1), table, total, time.perf_counter() - t0)


@torch.no_grad()
def drop_one_labels_naive(model, tokenizer, data: pd.DataFrame, data_labels: list[str], batch_size: int = 64,
                          max_length: int = 128) -> DropLabels:
    """The same labels the slow way: drop each layer (a copy) and evaluate the whole model."""
    _check_classifier(model)
    n = len(layer_list(model))
    t0 = time.perf_counter()
    batches = list(_batches(model, tokenizer, data, data_labels, batch_size, max_length))

    def run(m):
        m.eval()
        c = s = 0
        for b in batches:
            ci, si = _score(m(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"])
            c, s = c + ci, s + si
        return c, s

    total = sum(len(b["labels"]) for b in batches)
    before, _ = run(model)
    rows = []
    for l in range(n):
        c, s = run(drop_layers(model, [l]))
        rows.append((l, c / total, s / total))
    table = pd.DataFrame(rows, columns=["layer", "acc_after_drop", "loss_after_drop"])
    table.insert(1, "orig_layer", kept_layers(model.config))
    return DropLabels(before / total, table, total, time.perf_counter() - t0)


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs["hidden_states"]
    return x[0] if isinstance(x, tuple) else x


def _takes_cache(model) -> bool:
    # Decoders build a KV cache by default; a scoring pass has no use for it. The forward's own
    # signature is the reliable test (config flags such as is_decoder are None on many decoders).
    return "use_cache" in inspect.signature(type(model).forward).parameters


def drop_one_labels_recovered(model, tokenizer, train_df: pd.DataFrame, data: pd.DataFrame, data_labels: list[str],
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

    from fusion_prune.finetune import FinetuneConfig, evaluate, make_accelerator, train

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
