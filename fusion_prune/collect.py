"""Collect fusion training rows: pruning states with signals and measured drop-one values.

A *state* is (source model, dataset, step, current model). At each state the 12 signals of every
layer are computed on a calibration sample of the train split and the drop-one table on the
validation split; a *walk* picks the layer to drop (the oracle's: the measured best;
``walk="random"`` or ``"top"`` visits states the oracle never reaches), the model recovers for a
few steps, and the next state follows, down to ``min_layers + 1`` layers. One row per state x
layer (docs/design.md, "Rows").

``collect`` is the pruning loop of ``compress`` (:func:`fusion_prune.loop.prune_loop`) with a hook
that writes the rows: the same step, the same checkpoint after every state (model and rows
swapped in together), the same resume check. A second call with the same arguments continues an
interrupted walk. The test split is never read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fusion_prune.config import StepConfig, opt
from fusion_prune.errors import BadInputError
from fusion_prune.finetune import FinetuneConfig, teacher_config
from fusion_prune.report import write_table
from fusion_prune.surgery import num_layers
from fusion_prune.utils import check_output, output_lock

log = logging.getLogger(__name__)

ROW_KEYS = ["source_model", "dataset", "walk", "step", "layer", "orig_layer", "n_layers", "acc_before",
            "acc_after_drop", "loss_after_drop"]


def _walk_random(m, seed: int, k: int) -> list[int]:
    # Its own generator (seeded by [seed, step]), as the shipped random-walk rows were collected with.
    return [int(np.random.default_rng([seed, k]).choice(m.drop_one.table["layer"].to_numpy()))]


#: How collect picks the layer to drop after measuring a state: a strategy (its name in
#: fusion_prune.strategies.STRATEGIES) or, for the random walk, its own chooser. Every walk measures
#: every layer of every state it visits; only the states differ.
WALKS: dict[str, str | Callable] = {"oracle": "oracle", "top": "top", "random": _walk_random}


@dataclass
class CollectConfig:
    """How a trajectory is walked; the teacher settings apply only when no trained head exists."""

    min_layers: int = opt(1, help="Stop at this depth.")
    finetune_steps: int = opt(50, help="Recovery steps after each drop.")
    signal_samples: int = opt(256, help="Calibration examples (windows) for the signals.")
    max_eval_samples: int | None = opt(500, help="Validation examples (windows) for the drop-one measurements.")
    max_length: int = opt(128, help="Tokens per example (window).")
    batch_size: int = opt(32, help="Batch size of every pass.")
    lr: float = opt(1e-4, help="Learning rate of the recovery steps.")
    seed: int = opt(0, help="Seed of every sample and of training.")
    recovery_steps: int = opt(0, help="Also measure each candidate after this many recovery steps (column "
                                      "acc_after_recovery; fit-fusion --measured acc_after_recovery learns from it).")
    extra_signals: tuple[str, ...] = opt(tuple, help="Also compute this opt-in signal as a column (repeatable).")
    walk: str = opt("oracle", help="Which layer to drop after measuring a state: oracle (the measured best), random "
                                   "(seeded) or top (the deepest); random and top visit states the oracle never "
                                   "reaches.")
    # The same teacher as compress's (one default per option); the shipped rows were collected with
    # --teacher-epochs 2 --max-train-samples 2000, pinned in the Makefile's COLLECT_ARGS.
    teacher: FinetuneConfig = opt(lambda: teacher_config(max_train_samples=3000),
                                  help="The teacher's fine-tuning (only when the model has no head for the labels).")
    teacher_margin: float = opt(0.02, help="Exit 2 when the teacher's validation accuracy is within this of the "
                                          "majority-class share (0: no check).")
    progress: bool = True

    @classmethod
    def from_options(cls, **options) -> CollectConfig:
        """A config from flat options: the fields above and the teacher's
        (:data:`~fusion_prune.config.TEACHER_OPTIONS`), as the CLI passes them."""
        from fusion_prune.config import TEACHER_OPTIONS, field_default, with_paths

        teacher = {TEACHER_OPTIONS[k].partition(".")[2]: options.pop(k) for k in list(options) if k in TEACHER_OPTIONS}
        if teacher and options.get("teacher") is None:
            options["teacher"] = with_paths(field_default(cls, "teacher"), teacher)
        return cls(**options)

    def step(self) -> StepConfig:
        """The settings of one pruning step of the walk (every state is measured on
        ``max_eval_samples`` validation examples)."""
        return StepConfig(finetune_steps=self.finetune_steps, signal_samples=self.signal_samples,
                          drop_one_samples=self.max_eval_samples or 0, max_eval_samples=self.max_eval_samples,
                          max_length=self.max_length, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                          progress=self.progress)

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
    from signals import opt_in_signals

    valid = sorted(opt_in_signals())
    for name in names:
        if name not in valid:
            raise BadInputError(f"The 'extra_signals' parameter must name opt-in signals, one of {valid}. "
                                f"Got {name!r}.")


def _state_dir(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def run_collect(model_spec: str, dataset, out: str | Path, *, task: str | None = None, text_column: str = "text",
                label_column: str = "label", overwrite: bool = False, **options) -> pd.DataFrame:
    """``fusionprune collect``: find the task, load the data, build the config from flat ``options``
    (:meth:`CollectConfig.from_options`) and collect the rows of ``dataset`` into ``out``."""
    from fusion_prune.tasks import task_for

    check_output(out, overwrite, kind="file")  # before anything loads
    cfg = CollectConfig.from_options(**options)
    t, data = task_for(str(model_spec), dataset, task, text_column, label_column)
    return collect(str(model_spec), data, cfg, out, dataset_name=str(dataset), task=t, overwrite=overwrite)


def collect(model_spec: str, data, cfg: CollectConfig, out: str | Path, dataset_name: str | None = None,
            task=None, overwrite: bool = False) -> pd.DataFrame:
    """Walk the pruning trajectory and write the rows table to ``out`` (parquet or CSV).

    ``data`` is what ``task.load_data`` returned (default task: classification). Causal-LM rows
    hold next-token accuracy in ``acc_before``/``acc_after_drop``, the mean next-token NLL in
    ``loss_before``/``loss_after_drop``, and ``task``; the oracle's walk drops the layer of lowest
    NLL. ``out`` is locked for the whole walk; an interrupted walk resumes from ``<out>.state``
    (checked against the arguments and the data's content).
    """
    check_output(out, overwrite, kind="file")
    with output_lock(out):
        return _collect(model_spec, data, cfg, Path(out), dataset_name, task, overwrite)


def _collect(model_spec: str, data, cfg: CollectConfig, out: Path, dataset_name: str | None, task,
             overwrite: bool) -> pd.DataFrame:
    from fusion_prune.checkpoint import RunFolder
    from fusion_prune.loop import config_defaults, prune_loop, run_meta
    from fusion_prune.report import StepRecord
    from fusion_prune.strategies import STRATEGIES
    from fusion_prune.tasks import DEFAULT_TASK, get_task
    from signals import DEFAULT_SIGNALS

    if task is None:
        task = get_task(DEFAULT_TASK)
    if task.data is None:
        task.data = data
    step = cfg.step()
    if cfg.recovery_steps and not task.measures_after_recovery:
        raise BadInputError(f"The 'recovery_steps' parameter is not available for task {task.name!r}; expected 0. "
                            f"Got {cfg.recovery_steps}.")
    dataset_name = dataset_name or data.spec
    meta = run_meta(model_spec, data, cfg) | {"dataset": dataset_name, "task": task.name}
    run = RunFolder(_state_dir(out), meta, resume="auto", overwrite=False, current="checkpoint",
                    defaults={"config": config_defaults(cfg)})
    saved = run.start()
    if saved is not None:
        rows = pd.read_parquet(run.current / "rows.parquet")
        model, tok, _ = task.load_model(str(run.current))
        history = [StepRecord.from_dict(h, task.step_measured_key, task.step_metric_key) for h in saved["history"]]
        info = saved["info"]
        log.info("resuming %s at step %d (%d rows)", dataset_name, len(history), len(rows))
    else:
        model, tok, ready = task.load_model(model_spec)
        if num_layers(model) <= cfg.min_layers:
            raise BadInputError(f"The 'min_layers' parameter must be below the model's depth {num_layers(model)}. "
                                f"Got {cfg.min_layers}.")
        # Trains the teacher when the model has no head, and refuses one that learned nothing; collect
        # keeps none of its facts.
        task.prepare_teacher(model, tok, step, cfg.teacher, cfg.teacher_margin, ready, str(model_spec))
        info = {"teacher_layers": num_layers(model)}
        rows, history = pd.DataFrame(), []
    names = [*DEFAULT_SIGNALS, *cfg.extra_signals]
    walk = WALKS[cfg.walk]
    choose = ((lambda m: walk(m, cfg.seed, len(history))) if callable(walk)
              else (lambda m: STRATEGIES[walk].fn(m.state)))

    def on_state(k: int, m, drop: list[int]) -> dict:
        nonlocal rows
        t0 = time.perf_counter()
        state = m.drop_one.table.merge(m.signals, on=["layer", "orig_layer"])
        for i, (name, value) in enumerate((("source_model", str(model_spec)), ("dataset", dataset_name),
                                           ("walk", cfg.walk), ("step", k), ("n_layers", m.state.n_layers))):
            state.insert(i, name, value)
        state["acc_before"] = m.drop_one.acc_before
        extras = task.row_extras(m.drop_one)
        for name, value in extras.items():
            state[name] = value
        extra = list(extras)
        if cfg.recovery_steps:
            rec = task.recovered_drop_one(m.state.model, tok, cfg.recovery_steps, step, cfg.seed + k)
            state = state.merge(rec, on=["layer", "orig_layer"])
            extra = ["acc_after_recovery"]
        state = state[ROW_KEYS + extra + list(DEFAULT_SIGNALS) + list(cfg.extra_signals)]
        if len(rows) and (rows.step == k).any():  # cannot happen with one-rename checkpoints; guards the rows
            raise RuntimeError(f"collect: state {k} of {dataset_name} is already in the rows")
        rows = pd.concat([rows, state], ignore_index=True)
        log.info("%s step %d: %d layers, accuracy before %.3f, dropped layer %d (orig %d), %.0f s", dataset_name,
                 k, m.state.n_layers, m.drop_one.acc_before, drop[0], m.state.orig_layers[drop[0]],
                 time.perf_counter() - t0)
        return {"rows.parquet": rows}

    prune_loop(task, model, tok, step, choose, run, history, info, floor=cfg.min_layers, signal_names=names,
               needs=STRATEGIES["oracle"], want_drop_one=True, record_metric=False, on_state=on_state)
    write_table(rows, out, overwrite)
    run.done()
    return rows


def collect_many(models: dict[str, str | Path], cfg: CollectConfig, out: str | Path,
                 log: Callable[[str], None] = log.info) -> list[Path]:
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
