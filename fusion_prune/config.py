"""Configs, layered, and the one place their defaults and help live.

Three layers (docs/design.md, "Configs"):

- :class:`StepConfig`: what one pruning step needs (calibration sample, drop-one measurement,
  short recovery, the step's record). Every :class:`~fusion_prune.tasks.Task` method takes it.
  ``None`` means "the task's default" (:attr:`Task.step_defaults`), filled in by
  :meth:`Task.resolve_step`.
- the run (:class:`fusion_prune.loop.CompressConfig`, :class:`fusion_prune.collect.CollectConfig`):
  what a whole run adds (target, strategy, budget, teacher).
- each task's finish (:attr:`Task.finish_config`): distillation for classifiers, healing for
  causal LMs.

The CLI reads the default and help of each option from these fields (``field(metadata={"help":
...})``, :func:`field_default`, :func:`field_help`), so the command line and the Python API
cannot disagree; ``tests/test_cli_defaults.py`` holds them equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any


def opt(default: Any = None, help: str = "", **kw) -> Any:  # noqa: A002  (the word click uses)
    """A dataclass field with its CLI help in the metadata; a callable default (a class, a lambda) is
    the field's factory."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (calling its factory)."""
    f = _field(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__}.{name} has no default")


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls`` ("" when none)."""
    return _field(cls, name).metadata.get("help", "")


@dataclass
class StepConfig:
    """What one pruning step needs. ``None``: the task's default (``Task.step_defaults``)."""

    finetune_steps: int | None = opt(help="Recovery steps per removed layer, after each drop.")
    signal_samples: int | None = opt(help="Calibration examples (classifier) or token windows of --max-length "
                                          "(causal LM) for the signals.")
    drop_one_samples: int | None = opt(help="Validation examples (windows) for the measured drop-one metric of "
                                            "each candidate (0: only when the strategy needs it).")
    max_eval_samples: int | None = opt(help="Cap on the validation/test examples of reported accuracies.")
    step_eval_samples: int | None = opt(help="Cap on the validation examples (windows) recorded after each step.")
    max_length: int | None = opt(help="Tokens per example (classifier) or per window (causal LM).")
    batch_size: int | None = opt(help="Batch size of every pass of the run.")
    lr: float = opt(1e-4, help="Learning rate of the recovery steps (and of distillation).")
    seed: int = opt(0, help="Seed of every sample and of training; step k uses seed + k.")
    max_eval_tokens: int | None = opt(8192, help="Causal LM: cap on the held-out tokens for perplexity.")
    verify_k: int = opt(3, help="fusion-verify: the bundle's shortlist, among which the measured drop-one "
                               "metric decides.")
    guard: str | None = opt(help="Causal LM: labelled datasets (comma-separated) whose zero-shot loss on "
                                 "validation examples joins every candidate's measured loss (--guard-weight "
                                 "times their mean), so the measuring strategies (fusion-verify, oracle, sleb, "
                                 "evo-search) keep the layers those tasks need: the zero-shot guard of the choice.")
    guard_weight: float = opt(1.0, help="Causal LM: weight of the --guard loss beside the next-token NLL.")
    guard_samples: int = opt(128, help="Causal LM: validation examples of each --guard dataset that every "
                                       "candidate is scored on (time grows with them).")
    # 12: in the guarded oracle runs of the record (11 steps, smollm2-135m) the chosen layer was at
    # most the 9th lowest NLL; the guard's prompts are most of a guarded step's time, and 12 of 30
    # candidates (the low-NLL ones sit mid-depth, where a removal's suffix is long) cost about half
    guard_shortlist: int = opt(12, help="Causal LM: the --guard scores only the K measured candidates of lowest "
                                       "next-token NLL, which the rest is unlikely to beat (0: every candidate).")
    # teacher: with two tasks guarded by the gold labels, a gain on bbc-news topics paid for a loss
    # on sentiment (journal, "A guarded choice within the budget")
    guard_target: str = opt("teacher", help="Causal LM: what the --guard loss measures: teacher (KL from the "
                                            "teacher's answers over the verbalisers: any departure costs) or labels "
                                            "(cross-entropy of the gold class: a gain on one guarded task can pay "
                                            "for a loss on another).")
    # self-calibration (Williams et al. 2025): the corpus's windows alone choose the layers its own
    # text needs; windows the teacher writes are its general text, available offline
    calibration: str | None = opt(help="Causal LM: the text the choice measures on (the signals, the drop-one "
                                       "losses of oracle and fusion-verify, sleb's and evo-search's losses): the "
                                       "dataset's own windows by default; another corpus's, or 'teacher' for windows "
                                       "the teacher samples itself (self-calibration). The per-step perplexity, the "
                                       "budget and healing stay on the dataset.")
    progress: bool = True

    def step(self) -> StepConfig:
        """Just the step's fields (a run config is a StepConfig too)."""
        return StepConfig(**{f.name: getattr(self, f.name) for f in fields(StepConfig)})


# --------------------------------------------------------------------------- flat options

def path_default(cls: type | Any, path: str) -> Any:
    """The default at dotted ``path`` of dataclass ``cls`` ("teacher.epochs": the default teacher's epochs),
    or the value there of a config instance."""
    head, _, rest = path.partition(".")
    obj = field_default(cls, head) if isinstance(cls, type) else getattr(cls, head)
    for part in rest.split(".") if rest else []:
        obj = getattr(obj, part)
    return obj


def path_help(cls: type, path: str) -> str:
    """The help of the field at dotted ``path`` of dataclass ``cls``."""
    parts = path.split(".")
    owner: type = cls if isinstance(cls, type) else type(cls)
    for part in parts[:-1]:
        owner = type(path_default(owner, part))
    return field_help(owner, parts[-1])


def with_paths(obj: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass ``obj`` with each dotted path set (None values are skipped; a nested config
    that is None takes nothing)."""
    for path, value in values.items():
        if value is None:
            continue
        head, _, rest = path.partition(".")
        if not rest:
            obj = dataclasses.replace(obj, **{head: value})
            continue
        inner = getattr(obj, head)
        if inner is not None:
            obj = dataclasses.replace(obj, **{head: with_paths(inner, {rest: value})})
    return obj


#: flat options shared by the runs that may fine-tune a teacher: option -> path in the run config
TEACHER_OPTIONS = {"teacher_epochs": "teacher.epochs", "teacher_lr": "teacher.lr",
                   "teacher_patience": "teacher.patience", "max_train_samples": "teacher.max_train_samples"}
