"""The task seam: the one class that knows what differs between kinds of model.

A :class:`Task` owns, for its kind of model: data and model loading, the defaults of a pruning
step (:attr:`step_defaults`), the budget (field, direction, limit), the calibration batches and
the positions the loss scores (:attr:`score`), the drop-one measurement, the short recovery,
the validation metric of each step, the finish (distillation, healing) and its config, the
default fusion bundle, what ``fusionprune evaluate`` prints, and the report's section and
summary lines. The loop (:mod:`fusion_prune.loop`), the signals engine, surgery, the
strategies and the reports are shared, and no code outside ``fusion_prune/tasks/`` compares a
task's name.

Adding a task is one module with a subclass plus one :func:`register_task` line
(docs/design.md, "Adding a task").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import pandas as pd

from fusion_prune.config import StepConfig
from fusion_prune.errors import BadInputError

if TYPE_CHECKING:
    from fusion_prune.dropone import DropOne, Scorer
    from fusion_prune.finetune import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass
class FinishConfig:
    """What a task's finish needs (distillation, healing). Each task subclasses it.

    :attr:`flat` maps the flat option names that the CLI and ``compress()`` take to the field they
    set, as ``"field"`` or ``"field.sub_field"`` (a field of a nested config); their default and
    help are read from those fields, so the two entry points share them.
    """

    #: flat option name -> dotted path into the config
    flat: ClassVar[dict[str, str]] = {}
    #: flag options: flag name -> (field, the value the flag sets), e.g. no_distill -> (distill, None)
    flags: ClassVar[dict[str, tuple[str, Any]]] = {}
    #: nested config -> the run options (StepConfig fields) it takes from the run unless given whole
    shared: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        from fusion_prune.params import validate

        validate(self)  # ranges in fusion_prune/params.py

    def with_options(self, **options: Any) -> FinishConfig:
        """A copy with flat ``options`` applied (None leaves a field as it is)."""
        from fusion_prune.config import with_paths

        return with_paths(self, {self.flat.get(name, name): value for name, value in options.items()})

    @classmethod
    def flat_default(cls, name: str) -> Any:
        """The default of flat option ``name`` (read from the field it sets)."""
        from fusion_prune.config import path_default

        return path_default(cls, cls.flat.get(name, name))

    @classmethod
    def flat_help(cls, name: str) -> str:
        """The help of flat option ``name`` (the help of the field it sets)."""
        from fusion_prune.config import path_help

        return path_help(cls, cls.flat.get(name, name))

    @classmethod
    def field_names(cls) -> set[str]:
        """Every option name this config takes: its fields, flat options and flags."""
        return {f.name for f in fields(cls)} | set(cls.flat) | set(cls.flags)


class Task:
    """One kind of model and metric. Subclasses fill in every method (the contract test runs each)."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the headline metric of reports
    #: what one example of calibration and drop-one data is ("examples", "windows")
    unit: ClassVar[str] = "examples"
    #: drop-one table columns and orders that rank candidates, best to remove first; the first
    #: column is the measured value recorded for each step's choice
    drop_one_order: ClassVar[tuple[list[str], list[bool]]]
    #: report keys of one step: the validation metric after the step, the measured drop-one value of the choice
    step_metric_key: ClassVar[str]
    step_measured_key: ClassVar[str]
    #: the run config field of this task's budget, and the teacher's validation metric in ``info``
    budget_field: ClassVar[str]
    teacher_metric_key: ClassVar[str]
    higher_is_better: ClassVar[bool]  # of the step metric
    throughput_unit: ClassVar[str] = "examples/s"
    #: whether compress --max-memory can stream this task's models from disk (fusion_prune.streaming)
    streams_layers: ClassVar[bool] = False
    #: bytes from which every allocation gets its own mmap during a run (memory.fix_mmap_threshold);
    #: None keeps glibc's adaptive threshold
    mmap_threshold: ClassVar[int | None] = None
    #: strategy of ``compress`` when none is given
    default_strategy: ClassVar[str]
    #: the StepConfig values of this task where the config says None
    step_defaults: ClassVar[dict[str, Any]]
    #: the config of :meth:`finish`
    finish_config: ClassVar[type[FinishConfig]]
    #: the fusion bundle shipped for this task
    default_bundle: ClassVar[Path]
    #: spacing of the token positions the signals pool over (None: one pooled example per sequence)
    signal_token_stride: ClassVar[int | None] = None
    #: recompute each layer in the signals pass's backward instead of keeping its activations:
    #: the same statistics (to float rounding), one layer's activations held, one more forward
    signal_checkpoint_layers: ClassVar[bool] = False
    #: True: a sequence's representation is its last token's (it has seen the whole sequence), as
    #: Gromov et al. measure decoders; False: the mean over real tokens
    summary_at_last_token: ClassVar[bool] = False

    #: how a model of this task is described in messages, and the class-name endings of its heads
    description: ClassVar[str]
    head_suffixes: ClassVar[tuple[str, ...]]
    #: True: the task models unlabelled text (a base model with an unlabelled corpus is this task)
    needs_unlabelled_data: ClassVar[bool] = False
    #: model kinds (surgery.Architecture.kind) the task takes from a base model
    model_kinds: ClassVar[tuple[str, ...]] = ("encoder", "decoder")
    #: True: ``evaluate(zero_shot=True)`` scores zero-shot accuracy on labelled data
    scores_zero_shot: ClassVar[bool] = False

    def __init__(self) -> None:
        self.data = None
        self.memory = None  # a fusion_prune.memory.PhasePeaks while a run records peak memory per phase
        self.dtype = "float32"  # compress sets its --dtype here: how load_model loads (models.resolve_dtype)

    def phase(self, name: str):
        """A context that records peak memory as phase ``name`` of the run (nothing when none records)."""
        import contextlib

        return self.memory.phase(name) if self.memory is not None else contextlib.nullcontext()

    @classmethod
    def data_type(cls) -> type:
        """The class of what :meth:`load_data` returns."""
        raise NotImplementedError

    # ------------------------------------------------------------------ configs
    def resolve_step(self, cfg: StepConfig) -> None:
        """Fill the ``None`` fields of ``cfg`` (a StepConfig or a run config) with this task's defaults."""
        for name, value in self.step_defaults.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        if cfg.guard and not self.scores_zero_shot:
            guarding = sorted(name for name, t in TASKS.items() if t.scores_zero_shot)
            raise BadInputError(f"The 'guard' parameter guards zero-shot accuracy, which task(s) {guarding} score; "
                                f"expected no guard for task {self.name!r}. Got {cfg.guard!r}.")
        if cfg.calibration and not self.needs_unlabelled_data:
            texts = sorted(name for name, t in TASKS.items() if t.needs_unlabelled_data)
            raise BadInputError(f"The 'calibration' parameter names the text the choice measures on, which task(s) "
                                f"{texts} take; expected no calibration for task {self.name!r}. "
                                f"Got {cfg.calibration!r}.")

    def check_finish(self, step: StepConfig, finish: FinishConfig) -> None:
        """Refuse finish options that the step's options make meaningless, before any work."""

    # ------------------------------------------------------------------ data and models
    def load_data(self, spec: str, text_column: str = "text", label_column: str = "label"):
        raise NotImplementedError

    def load_model(self, spec: str):
        """``(model, tokenizer, ready)``: ready is False when the model needs training first."""
        raise NotImplementedError

    def prepare_teacher(self, model, tok, step: StepConfig, teacher: FinetuneConfig, teacher_margin: float,
                        ready: bool, model_spec: str) -> dict:
        """Make ``model`` a teacher (in place) and return facts for the report's ``info``."""
        raise NotImplementedError

    def prepare_choice(self, teacher: Callable[[], Any], tok, step: StepConfig) -> dict:
        """Build what the choice measures with beyond the dataset (the causal LM's zero-shot guard,
        its --calibration text) from the teacher, loaded by ``teacher()`` only when needed; facts for
        the report's ``info``. Called as the teacher is prepared, and again when a stopped run
        resumes (the state is rebuilt from the same seed, not saved)."""
        return {}

    # ------------------------------------------------------------------ one pruning step
    #: ``score(model, inputs, batch) -> (correct, loss sum, count)``: the forward, the loss and the
    #: positions it scores
    score: ClassVar[Scorer]

    def calibration_batches(self, model, tok, step: StepConfig, k: int) -> list[dict]:
        """The calibration batches of step ``k`` on the model's device."""
        raise NotImplementedError

    def signals(self, model, batches: list[dict], names: list[str], progress: bool = False) -> pd.DataFrame:
        """The signals table (n_layers, 2 + len(names)) on calibration ``batches``."""
        from signals import signals_on_batches

        return signals_on_batches(model, batches, names, token_stride=self.signal_token_stride,
                                  checkpoint_layers=self.signal_checkpoint_layers, progress=progress)

    def drop_one(self, model, tok, step: StepConfig, only: list[int] | None = None) -> DropOne:
        """The measured drop-one table on validation data, for every layer or just ``only``."""
        raise NotImplementedError

    def score_batches(self, model, batches: list[dict]) -> DropOne:
        """The drop-one table on given (calibration) batches: what SLEB ranks by."""
        from fusion_prune.dropone import drop_one_on_batches

        return drop_one_on_batches(model, batches, type(self).score)

    def kept_loss(self, model, batches: list[dict], keep: list[int]) -> float:
        """Mean loss of ``model`` run with only the current layers ``keep`` on (calibration) ``batches``:
        what a search over whole sets of layers (evo-search) minimises."""
        from fusion_prune.dropone import kept_scores

        _, total, count = kept_scores(model, batches, type(self).score, keep)
        return total / max(count, 1)

    def recover(self, model, tok, steps: int, step: StepConfig, seed: int, finish: FinishConfig | None = None
                ) -> None:
        """Train ``model`` in place for ``steps`` short recovery steps (``finish``: the run's finish
        config, for a task whose recovery shares its settings)."""
        raise NotImplementedError

    def step_metric(self, model, tok, step: StepConfig) -> float:
        """The validation metric recorded after each step (and checked against a budget)."""
        raise NotImplementedError

    def best_candidate(self, table: pd.DataFrame) -> int:
        """The current index of the best layer to remove by a measured drop-one table."""
        cols, asc = self.drop_one_order
        return int(table.sort_values(cols, ascending=asc).iloc[0]["layer"])

    def measured_value(self, table: pd.DataFrame, layer: int) -> float:
        """The recorded drop-one value of ``layer`` (the first column of :attr:`drop_one_order`)."""
        return float(table.set_index("layer")[self.drop_one_order[0][0]][layer])

    def row_extras(self, dropone: DropOne) -> dict[str, Any]:
        """Columns this task adds to every fusion-training row of a state (``collect``)."""
        return {}

    #: True: :meth:`recovered_drop_one` is available (``collect --recovery-steps``)
    measures_after_recovery: ClassVar[bool] = False

    def recovered_drop_one(self, model, tok, steps: int, step: StepConfig, seed: int) -> pd.DataFrame:
        """(layer, orig_layer, acc_after_recovery) after ``steps`` recovery steps per candidate."""
        raise BadInputError(f"The 'recovery_steps' parameter is not available for task {self.name!r}; expected 0. "
                            f"Got {steps}.")

    # ------------------------------------------------------------------ budget
    def budget_limit(self, info: dict, budget: float) -> float:
        """The worst validation metric ``budget`` allows, from the teacher's (same examples)."""
        raise NotImplementedError

    def within_budget(self, metric: float, info: dict, budget: float) -> bool:
        """Whether a step's validation metric stays within ``budget``."""
        limit = self.budget_limit(info, budget)
        return metric >= limit - 1e-9 if self.higher_is_better else metric <= limit + 1e-9

    # ------------------------------------------------------------------ the end
    def finish(self, teacher, student, tok, step: StepConfig, finish: FinishConfig, info: dict,
               prefinished: tuple[object, dict] | None = None) -> tuple[object, dict]:
        """Heal / distil ``student`` and evaluate both; returns (final student, report fields).

        ``prefinished``: (the finished model, its finish's record) from :meth:`finish_for_budget`,
        finished from this very ``student``: used instead of finishing again.
        """
        raise NotImplementedError

    #: whether :meth:`finish_for_budget` finishes a copy (else the budget is judged before the finish)
    judges_budget_after_finish: ClassVar[bool] = False

    def finish_for_budget(self, teacher, student, tok, step: StepConfig, finish: FinishConfig, info: dict,
                          ) -> tuple[object, dict, float]:
        """A copy of ``student`` finished as :meth:`finish` would (``finish`` has something to do), with
        its finish's record and its validation metric (the step metric's examples), so that a budget
        judges what the run ends with; ``student`` is left as it is. Called only when
        :attr:`judges_budget_after_finish`."""
        raise NotImplementedError

    def nothing_to_finish(self, finish: FinishConfig) -> FinishConfig:
        """The finish config for a student that *is* the teacher (no layer removed): no training."""
        raise NotImplementedError

    # ------------------------------------------------------------------ analysis (``fusionprune analyze``)
    #: analyze's batch size when none is given (None: the step default) and its drop-one sample for --measure
    analysis_batch_size: ClassVar[int | None] = None
    analysis_drop_one_samples: ClassVar[int]

    def analysis_signals(self, model, tok, step: StepConfig, names: list[str], split: str, progress: bool = True
                         ) -> tuple[pd.DataFrame, str, int]:
        """(signals table, the split it was drawn from, calibration examples used) for ``analyze``."""
        raise NotImplementedError

    def count_drop_one(self, step: StepConfig) -> int:
        """How many validation examples (windows) a drop-one measurement with ``step`` uses."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation and reports
    def evaluate(self, model_spec: str, dataset_spec: str, *, split: str = "test", text_column: str = "text",
                 label_column: str = "label", batch_size: int | None = None, max_length: int | None = None,
                 max_samples: int | None = None, max_eval_tokens: int | None = None, progress: bool = True,
                 **options: Any) -> dict:
        """What ``fusionprune evaluate`` prints as JSON for this task."""
        raise NotImplementedError

    def evaluation_line(self, result: dict) -> str:
        """One line of :meth:`evaluate`'s result for people."""
        raise NotImplementedError

    def summary_lines(self, report) -> list[str]:
        """The task's lines of ``compress``'s closing summary (a :class:`CompressReport`)."""
        raise NotImplementedError

    def report_section(self, report) -> list[str]:
        """The task's markdown at the top of report.md (results table)."""
        raise NotImplementedError

    def step_table(self, report) -> list[str]:
        """The markdown table of the steps."""
        raise NotImplementedError

    def report_plots(self, report, folder: Path) -> list[str]:
        """Write this task's plots into ``folder``; returns their markdown lines."""
        raise NotImplementedError


#: The registered tasks: name -> class.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Register a Task subclass under its ``name`` (duplicates are rejected)."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


Log = Callable[[str], None]
