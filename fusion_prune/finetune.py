"""Fine-tune and evaluate sequence classifiers.

The loop runs on :class:`accelerate.Accelerator`, so the same code runs on CPU, on one GPU (bf16
autocast) and, under ``accelerate launch``, on several GPUs or processes. Batches are tokenised
on the fly with dynamic padding: short corpora (tweets, reviews) pay only for their real length.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fusion_prune.config import opt
from fusion_prune.data import TextDataset, label_map, make_loader, subsample
from fusion_prune.errors import BadInputError
from fusion_prune.models import save_model
from fusion_prune.params import TEACHER_DEFAULTS, validate
from fusion_prune.training import EarlyStopping, loss_summary, make_accelerator, run_steps, step_budget
from fusion_prune.utils import atomic_dir, check_output, output_lock, set_seed, versions, write_json_atomic

RUN_RECORD = "fusionprune_run.json"
log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. ``max_steps`` overrides ``epochs`` when given."""

    epochs: float = opt(1.0, help="Budget in epochs (see --min-steps); early stopping usually ends sooner.")
    max_steps: int | None = opt(None, help="Overrides --epochs.")
    batch_size: int = opt(32, help="Training batch size.")
    eval_batch_size: int = 64
    lr: float = opt(1e-4, help="Learning rate (small models like 2e-4, base-size ones ~5e-5 to 1e-4).")
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = opt(128, help="Tokens per example.")
    seed: int = opt(0, help="Seed of the sample and of training.")
    max_train_samples: int | None = opt(None, help="Cap on the training examples.")
    max_eval_samples: int | None = opt(None, help="Cap on the validation and test examples.")
    grad_clip: float = 1.0
    # Training batches of similar lengths (fusion_prune.data.LengthGroupedBatches): about half the
    # padded tokens on short texts; False: plain shuffled batches (results before 2026-12-03).
    group_by_length: bool = True
    mixed_precision: str = opt("auto", help="auto: bf16 on CUDA, none on the CPU; or no / bf16 / fp16.")
    progress: bool = True
    # Early stopping (off when patience is 0): validation accuracy on ``early_stopping_samples``
    # examples every ``eval_every`` steps (0: about twice an epoch, between 10 and 50 steps); stop
    # after ``patience`` checks without a gain and restore the best weights. ``min_steps`` raises
    # the epoch budget on small sets, where a few epochs are only a few dozen steps.
    patience: int = opt(0, help="Stop after this many validation checks without a gain and keep the best weights "
                                "(0: train the whole budget).")
    eval_every: int = 0
    min_steps: int = opt(0, help="Raise the epoch budget to at least this many steps (small sets).")
    early_stopping_samples: int = 500

    def __post_init__(self) -> None:
        validate(self)  # ranges in fusion_prune/params.py


def teacher_config(**overrides) -> FinetuneConfig:
    """A FinetuneConfig with the teacher defaults (:data:`TEACHER_DEFAULTS`), then ``overrides``."""
    return FinetuneConfig(**{**TEACHER_DEFAULTS, **overrides})


def train(model, tokenizer, train_df: pd.DataFrame, cfg: FinetuneConfig, accelerator=None,
          val_df: pd.DataFrame | None = None, data_labels: list[str] | None = None) -> dict:
    """Train ``model`` in place on ``train_df`` (cross-entropy); returns steps, losses and wall time.

    With ``cfg.patience`` > 0 and a validation frame ``val_df`` (labels named by ``data_labels``)
    it stops at a validation plateau and ends with the best checked weights.
    """
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    set_seed(cfg.seed)
    df = subsample(train_df, cfg.max_train_samples, cfg.seed)
    loader = make_loader(df, tokenizer, cfg.batch_size, cfg.max_length, shuffle=True, seed=cfg.seed,
                         group_by_length=cfg.group_by_length)
    stopper = None
    if cfg.patience and val_df is not None and len(val_df):
        every = cfg.eval_every or min(50, max(10, len(loader) // 2))
        val = subsample(val_df, cfg.early_stopping_samples, cfg.seed)
        stopper = EarlyStopping(model, lambda m: evaluate(m, tokenizer, val, data_labels, cfg.eval_batch_size,
                                                          cfg.max_length, accelerator)["accuracy"],
                                every, cfg.patience, "validation_accuracy")
    t0 = time.perf_counter()
    losses, steps_per_epoch = run_steps(
        model, loader, lambda m, batch: m(**batch).loss, accelerator, epochs=cfg.epochs, max_steps=cfg.max_steps,
        lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
        progress=cfg.progress, desc="fine-tune", min_steps=cfg.min_steps, on_step=stopper)
    if stopper is not None:
        stopper.restore(len(losses))
    return {"steps": len(losses), "examples": len(df), "epochs": round(len(losses) / steps_per_epoch, 3),
            **loss_summary(losses), "train_seconds": round(time.perf_counter() - t0, 2),
            **(stopper.record() if stopper is not None else {})}


def planned_steps(n_examples: int, cfg: FinetuneConfig) -> int:
    """The step budget :func:`train` gives ``n_examples`` (before any early stop)."""
    n = min(n_examples, cfg.max_train_samples or n_examples)
    return step_budget(math.ceil(n / cfg.batch_size), cfg.epochs, cfg.max_steps, cfg.min_steps)


def majority_share(labels: np.ndarray) -> float:
    """Share of the most frequent class among ``labels`` (N,)."""
    return float(np.bincount(np.asarray(labels, dtype=np.int64)).max() / len(labels)) if len(labels) else 0.0


def check_teacher(accuracy: float, majority: float, margin: float, what: str = "the teacher") -> None:
    """Refuse (exit 2) a classifier whose validation accuracy is within ``margin`` of the majority share.

    Such a model has learned little beyond the class prior: every drop-one label, signal and
    distillation target computed from it would be noise. ``margin`` 0 turns the check off.
    """
    if margin and accuracy < majority + margin:
        raise BadInputError(
            f"{what} has validation accuracy {accuracy:.3f}, within {margin} of the majority-class share "
            f"{majority:.3f}: it has not learned the task. Train longer or harder (--teacher-epochs, --teacher-lr, "
            f"--max-train-samples; for finetune --epochs, --lr), give a trained model, or pass --teacher-margin 0 "
            f"to go on anyway.")


@torch.no_grad()
def predict(model, tokenizer, df: pd.DataFrame, batch_size: int = 64, max_length: int = 128,
            accelerator=None, progress: bool = False) -> np.ndarray:
    """Predicted class ids (N,) of ``model`` on ``df``, in row order."""
    from tqdm.auto import tqdm

    accelerator = accelerator or make_accelerator()
    # Longest batches first, similar lengths together (about half the padded tokens on short texts);
    # each row's prediction goes back to its position through the batch's index.
    loader = accelerator.prepare(make_loader(df, tokenizer, batch_size, max_length, with_index=True,
                                             group_by_length=True))
    was_training = model.training
    model.eval()
    out = np.zeros(len(df), dtype=np.int64)
    try:
        for batch in tqdm(loader, desc="evaluate", disable=not (progress and accelerator.is_local_main_process),
                          dynamic_ncols=True):
            batch.pop("labels")
            idx = batch.pop("index")
            # The loader follows the accelerator's device; a model left elsewhere is evaluated where it is.
            device = next(model.parameters()).device
            with accelerator.autocast():
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            pred, idx = accelerator.gather_for_metrics((logits.argmax(-1), idx))
            out[idx.cpu().numpy()] = pred.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def evaluate(model, tokenizer, df: pd.DataFrame, data_labels: list[str], batch_size: int = 64,
             max_length: int = 128, accelerator=None, progress: bool = False) -> dict[str, Any]:
    """Accuracy and macro-F1 of ``model`` on ``df`` (labels named by ``data_labels``)."""
    from sklearn.metrics import accuracy_score, f1_score

    mapping = label_map(model.config, data_labels)
    y_true = mapping[df["label"].to_numpy()]
    t0 = time.perf_counter()
    y_pred = predict(model, tokenizer, df, batch_size, max_length, accelerator, progress)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Over the classes that occur in this split or its predictions: a capped evaluation set
        # can miss rare classes, and scoring those as F1 = 0 would only measure the cap.
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=np.union1d(y_true, y_pred),
                                   zero_division=0)),
        "examples": int(len(y_true)),
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }


@dataclass
class FinetuneResult:
    output_dir: Path
    record: dict = field(default_factory=dict)
    is_main_process: bool = True


def finetune(model_spec: str, data: TextDataset, cfg: FinetuneConfig, output_dir: str | Path,
             overwrite: bool = False, teacher_margin: float = 0.02) -> FinetuneResult:
    """Fine-tune ``model_spec`` on ``data`` and save a ``save_pretrained`` folder with a run record.

    The folder holds the model (with ``id2label``/``label2id``), its tokenizer and
    ``fusionprune_run.json`` (data, config, validation and test metrics, versions, wall time).
    It appears only when everything has been written. A model whose validation accuracy stays
    within ``teacher_margin`` of the majority-class share is refused (BadInputError) and not saved.
    """
    output_dir = check_output(output_dir, overwrite)
    accelerator = make_accelerator(cfg.mixed_precision)
    # Under `accelerate launch` only the main process writes, so only it holds the output's lock.
    with output_lock(output_dir) if accelerator.is_main_process else contextlib.nullcontext():
        return _finetune(model_spec, data, cfg, output_dir, overwrite, accelerator, teacher_margin)


def _finetune(model_spec: str, data: TextDataset, cfg: FinetuneConfig, output_dir: Path, overwrite: bool,
              accelerator, teacher_margin: float) -> FinetuneResult:
    from fusion_prune.models import load_classifier

    t0 = time.perf_counter()
    model, tokenizer, head_trained = load_classifier(model_spec, data.labels, seed=cfg.seed)
    log.info("data %s", data.summary())  # after the model loads: a bad model stays a one-line error
    stats = train(model, tokenizer, data.train, cfg, accelerator, val_df=data.validation, data_labels=data.labels)
    metrics = {}
    for split in ("validation", "test"):
        df = subsample(data.split(split), cfg.max_eval_samples, cfg.seed)
        metrics[split] = evaluate(model, tokenizer, df, data.labels, cfg.eval_batch_size, cfg.max_length,
                                  accelerator, progress=cfg.progress)
        metrics[split]["majority_share"] = majority_share(df["label"].to_numpy())
    check_teacher(metrics["validation"]["accuracy"], metrics["validation"]["majority_share"], teacher_margin,
                  f"The model fine-tuned from {model_spec!r}")
    record = {
        "command": "finetune",
        "model": str(model_spec),
        "had_trained_head": head_trained,
        "data": data.describe(),
        "config": asdict(cfg),
        "train": stats,
        "metrics": metrics,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "versions": versions(),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with atomic_dir(output_dir, overwrite=overwrite, lock=False) as tmp:
            save_model(unwrapped, tokenizer, tmp)
            write_json_atomic(tmp / RUN_RECORD, record)
    accelerator.wait_for_everyone()
    return FinetuneResult(output_dir, record, accelerator.is_main_process)
