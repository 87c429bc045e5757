"""Collect fusion training rows: greedy pruning states with signals and measured labels.

A *state* is (source model, dataset, step, current model). At each state the 12 signals of every
layer are computed on a calibration sample of the train split and the drop-one labels on the
validation split; the layer whose removal keeps the most validation accuracy is dropped (the
oracle's walk; ``walk="random"`` or ``"top"`` visits states the oracle never reaches), the
model is fine-tuned for a few steps, and the next state follows, down to ``min_layers + 1``
layers. One row per state x layer (DESIGN.md §4).

The run is resumable state by state: after every state the rows so far and the current model are
written (atomically) next to the output, and a second call with the same arguments continues.
The test split is never read.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fusion_prune.errors import BadInputError
from fusion_prune.data import subsample
from fusion_prune.finetune import (FinetuneConfig, check_teacher, evaluate, majority_share, teacher_config,
                                   train)
from fusion_prune.training import make_accelerator
from fusion_prune.labels import drop_one_labels_recovered
from fusion_prune.report import write_table
from fusion_prune.surgery import num_layers
from fusion_prune.utils import check_output, output_lock, versions

ROW_KEYS = ["source_model", "dataset", "walk", "step", "layer", "orig_layer", "n_layers", "acc_before",
            "acc_after_drop", "loss_after_drop"]


def _walk_oracle(task, state: pd.DataFrame, rng) -> int:
    return task.best_candidate(state)


def _walk_random(task, state: pd.DataFrame, rng) -> int:
    return int(rng.choice(state["layer"].to_numpy()))


def _walk_top(task, state: pd.DataFrame, rng) -> int:
    return int(state["layer"].max())


#: How collect picks the layer to drop after labelling a state: ``walk(task, state, rng) -> layer``.
#: Every walk labels every layer of every state it visits; only the states differ.
WALKS = {"oracle": _walk_oracle, "random": _walk_random, "top": _walk_top}


@dataclass
class CollectConfig:
    """How a trajectory is walked; the teacher settings apply only when no trained head exists."""

    min_layers: int = 1
    finetune_steps: int = 50
    signal_samples: int = 256
    max_eval_samples: int | None = 500
    max_length: int = 128
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    # > 0: also label each candidate by its accuracy after this many recovery steps
    # (column acc_after_recovery; fit-fusion --label acc_after_recovery trains on it).
    recovery_steps: int = 0
    # opt-in extra signals (signals/extra.py) computed beside the 12, as further feature columns
    extra_signals: tuple[str, ...] = ()
    # which layer to drop after labelling a state (WALKS): the oracle's, or a random / top-first walk
    walk: str = "oracle"
    teacher: FinetuneConfig = field(default_factory=lambda: teacher_config(epochs=2, max_train_samples=4000))
    # refuse a teacher whose validation accuracy is within this of the majority share (0: no check)
    teacher_margin: float = 0.02
    progress: bool = True

    def __post_init__(self) -> None:
        from fusion_prune.params import validate

        validate(self)  # ranges in fusion_prune/params.py
        self.extra_signals = tuple(self.extra_signals)
        check_extra_signals(self.extra_signals)
        if self.walk not in WALKS:
            from fusion_prune.errors import bad_choice

            raise bad_choice("walk", self.walk, WALKS)


def check_extra_signals(names: Sequence[str]) -> None:
    """Refuse names that are not registered signals, or that are among the 12 computed anyway."""
    from signals import DEFAULT_SIGNALS, SIGNALS

    valid = sorted(n for n in SIGNALS if n not in DEFAULT_SIGNALS)
    for name in names:
        if name not in valid:
            raise BadInputError(f"The 'extra_signals' parameter must name opt-in signals, one of {valid}. "
                                f"Got {name!r}.")


def _state_dir(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def collect(model_spec: str, data, cfg: CollectConfig, out: str | Path, dataset_name: str | None = None,
            task=None, overwrite: bool = False) -> pd.DataFrame:
    """Walk the greedy trajectory and write the rows table to ``out`` (parquet or CSV).

    ``data`` is what ``task.load_data`` returned (default task: classification). Each state goes
    through the same pruning step as ``compress`` (:func:`fusion_prune.greedy.measure_state`, the
    oracle's choice, :func:`fusion_prune.greedy.apply_drop`). Causal-LM rows hold next-token
    accuracy in ``acc_before``/``acc_after_drop``, the mean next-token NLL in
    ``loss_before``/``loss_after_drop``, and ``task`` = "causal-lm"; the layer dropped is the one
    of lowest NLL. ``out`` is locked for the whole walk; an interrupted walk resumes from
    ``<out>.state`` (checked against the arguments and the data's content).
    """
    check_output(out, overwrite, kind="file")
    with output_lock(out):
        return _collect(model_spec, data, cfg, Path(out), dataset_name, task, overwrite)


def _collect(model_spec: str, data, cfg: CollectConfig, out: Path, dataset_name: str | None, task,
             overwrite: bool) -> pd.DataFrame:
    from fusion_prune.greedy import CompressConfig, apply_drop, load_checkpoint_record, measure_state, save_checkpoint
    from fusion_prune.strategies import STRATEGIES
    from fusion_prune.tasks import get_task
    from signals import DEFAULT_SIGNALS

    if task is None:
        task = get_task("classification")
    if task.data is None:
        task.data = data
    lm = task.name == "causal-lm"
    if lm and cfg.recovery_steps:
        raise BadInputError("The 'recovery_steps' parameter is for classifiers only; expected 0 for a causal LM. "
                            f"Got {cfg.recovery_steps}.")
    state_dir = _state_dir(out)
    dataset_name = dataset_name or data.spec
    meta = {"model": str(model_spec), "dataset": dataset_name, "data_sha256": data.content_hash(),
            "config": asdict(cfg)}
    meta["config"].pop("progress")
    if cfg.walk == "oracle":  # state folders from before walks existed stay resumable
        meta["config"].pop("walk")
    if lm:
        meta["task"] = task.name
        # A causal LM is never fine-tuned here: the teacher settings play no part in its rows.
        meta["config"].pop("teacher")
        meta["config"].pop("teacher_margin")
    # One pruning step for collect and compress: the oracle's walk with labels on every state.
    step_cfg = CompressConfig(target_layers=cfg.min_layers, strategy="oracle", task=task.name,
                              finetune_steps=cfg.finetune_steps, signal_samples=cfg.signal_samples,
                              label_samples=cfg.max_eval_samples or 0, max_length=cfg.max_length,
                              batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, teacher=cfg.teacher,
                              distill=None, progress=cfg.progress)
    rows = pd.DataFrame()
    checkpoint = state_dir / "checkpoint"  # model, rows and next step: swapped in together
    saved = load_checkpoint_record(checkpoint)
    if saved is not None:
        if saved["meta"] != json.loads(json.dumps(meta, default=str)):
            what = "data of other content" if saved["meta"].get("data_sha256") != meta["data_sha256"] else "other arguments"
            raise BadInputError(f"The state folder {str(state_dir)!r} belongs to a run with {what}; "
                                "expected the same arguments and data to resume (or delete it).")
        rows = pd.read_parquet(checkpoint / "rows.parquet")
        model, tok, _ = task.load_model(str(checkpoint))
        step = saved["next_step"]
        _log(f"resuming {dataset_name} at step {step} ({len(rows)} rows)")
    else:
        model, tok, trained = task.load_model(model_spec)
        step = 0
        if num_layers(model) <= cfg.min_layers:
            raise BadInputError(f"The 'min_layers' parameter must be below the model's depth {num_layers(model)}. "
                                f"Got {cfg.min_layers}.")
        if not trained:
            _log(f"{model_spec} has no head for {dataset_name}: fine-tuning a teacher first")
            tcfg = FinetuneConfig(**{**asdict(cfg.teacher), "max_length": cfg.max_length, "seed": cfg.seed,
                                     "progress": cfg.progress})
            train(model, tok, data.train, tcfg, make_accelerator(tcfg.mixed_precision), val_df=data.validation,
                  data_labels=data.labels)
        if not lm:
            val = subsample(data.validation, cfg.max_eval_samples, cfg.seed)
            acc = evaluate(model, tok, val, data.labels, cfg.batch_size * 2, cfg.max_length)["accuracy"]
            check_teacher(acc, majority_share(val["label"].to_numpy()), cfg.teacher_margin,
                          f"The teacher of {dataset_name!r}" + (" (fine-tuned here)" if not trained else ""))
    names = [*DEFAULT_SIGNALS, *cfg.extra_signals]
    while num_layers(model) > cfg.min_layers:
        t0 = time.perf_counter()
        n = num_layers(model)
        _, sig, lab, _ = measure_state(task, model, tok, step_cfg, step, STRATEGIES["oracle"], names,
                                       want_labels=True)
        state = lab.table.merge(sig, on=["layer", "orig_layer"])
        state.insert(0, "n_layers", n)
        state.insert(0, "step", step)
        state.insert(0, "walk", cfg.walk)
        state.insert(0, "dataset", dataset_name)
        state.insert(0, "source_model", str(model_spec))
        state["acc_before"] = lab.acc_before
        extra = []
        if lm:
            state["loss_before"] = lab.loss_before
            state["task"] = task.name
            extra = ["loss_before", "task"]
        if cfg.recovery_steps:
            rec = drop_one_labels_recovered(model, tok, data.train, subsample(data.validation, cfg.max_eval_samples,
                                                                               cfg.seed), data.labels,
                                            cfg.recovery_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                            max_length=cfg.max_length, seed=cfg.seed + step)
            state = state.merge(rec, on=["layer", "orig_layer"])
            extra = ["acc_after_recovery"]
        state = state[ROW_KEYS + extra + list(DEFAULT_SIGNALS) + list(cfg.extra_signals)]
        # seeded per step, so a resumed walk takes the same turns
        best = WALKS[cfg.walk](task, state, np.random.default_rng([cfg.seed, step]))
        if len(rows) and (rows.step == step).any():  # cannot happen with one-rename checkpoints; guards the rows
            raise RuntimeError(f"collect: state {step} of {dataset_name} is already in the rows")
        rows = pd.concat([rows, state], ignore_index=True)
        apply_drop(task, model, tok, [best], step_cfg, step)
        step += 1
        save_checkpoint(checkpoint, model, tok, {"meta": meta, "next_step": step, "versions": versions()},
                        {"rows.parquet": rows})
        _log(f"{dataset_name} step {step - 1}: {n} layers, accuracy before {lab.acc_before:.3f}, dropped layer "
             f"{best} (orig {state.orig_layer[state.layer == best].iloc[0]}), {time.perf_counter() - t0:.0f} s")
    write_table(rows, out, overwrite)
    shutil.rmtree(state_dir, ignore_errors=True)
    return rows


def _log(msg: str) -> None:
    import sys

    print(f"[fusionprune] {msg}", file=sys.stderr, flush=True)


def collect_many(models: dict[str, str | Path], cfg: CollectConfig, out: str | Path, log=_log) -> list[Path]:
    """Rows for several datasets, ``{dataset: model}``, into ``out/rows/<dataset>.parquet``.

    A finished dataset is skipped and an interrupted one resumes; a model folder that does not
    exist is reported and skipped. Returns the finished files.
    """
    from fusion_prune.data import load_dataset

    done = []
    for dataset, model in models.items():
        path = Path(out) / "rows" / f"{Path(dataset).name}.parquet"  # a dataset folder's name, not its path
        if not path.is_file():
            if not Path(model).is_dir():
                log(f"no model for {dataset} at {str(model)!r}: skipped")
                continue
            t0 = time.perf_counter()
            collect(str(model), load_dataset(dataset), cfg, path, dataset_name=dataset)
            log(f"{dataset}: rows in {time.perf_counter() - t0:.0f} s")
        done.append(path)
    return done
