"""Every numeric and enumerated parameter's valid range, in one table (scikit-learn's way).

The configs (``FinetuneConfig``, ``CompressConfig``, ``CollectConfig``, ``DistillConfig``,
``HealConfig``) call :func:`validate` on themselves; the CLI gives every option whose name is in
:data:`CONSTRAINTS` a click type built from the same entry (:func:`apply_to_cli`), so a bad
number fails before any model is loaded, with one message shape:
``The 'batch_size' parameter must be an int >= 1. Got 0.`` (``'--batch-size' option`` on the CLI).
Adding a parameter is one row here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from numbers import Integral, Real
from typing import Any

from fusion_prune.errors import BadInputError


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (int or float) between ``left`` and ``right`` (None: unbounded)."""

    kind: type
    left: float | None = None
    right: float | None = None
    closed: str = "both"  # which ends belong to the interval: "both", "left", "right", "neither"
    none_ok: bool = False

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.none_ok
        if isinstance(v, bool) or not isinstance(v, Integral if self.kind is int else Real):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        lo_ok = self.left is None or (v >= self.left if self.closed in ("both", "left") else v > self.left)
        hi_ok = self.right is None or (v <= self.right if self.closed in ("both", "right") else v < self.right)
        return lo_ok and hi_ok

    def describe(self, allow_none: bool = True) -> str:
        kind = "an int" if self.kind is int else "a number"
        if self.left is not None and self.right is not None:
            lb = "[" if self.closed in ("both", "left") else "("
            rb = "]" if self.closed in ("both", "right") else ")"
            text = f"{kind} in {lb}{self.left}, {self.right}{rb}"
        elif self.left is not None:
            text = f"{kind} {'>=' if self.closed in ('both', 'left') else '>'} {self.left}"
        elif self.right is not None:
            text = f"{kind} {'<=' if self.closed in ('both', 'right') else '<'} {self.right}"
        else:
            text = kind
        return text + (" or None" if self.none_ok and allow_none else "")


@dataclass(frozen=True)
class Options:
    values: tuple

    def ok(self, v: Any) -> bool:
        return v in self.values

    def describe(self, allow_none: bool = True) -> str:
        return "one of {" + ", ".join(repr(v) for v in sorted(self.values, key=str)) + "}"


def _count(least: int = 1, none_ok: bool = False) -> Interval:
    return Interval(int, least, None, none_ok=none_ok)


#: How compress, collect and finetune train a teacher by default: up to ``epochs`` (at least
#: ``min_steps`` steps on small sets), stopped at a validation plateau (``patience`` checks without
#: a gain). Chosen by measurement: benchmarks/archive/teacher_plateau.py, benchmarks/journal.md; patience
#: 2, not 3: on every curve recorded (bbc-news, book-excerpts, rotten-tomatoes) the same weights were kept
#: one check sooner (journal, "The first hour, timed").
TEACHER_DEFAULTS = {"epochs": 3.0, "lr": 2e-4, "patience": 2, "min_steps": 150}

_POSITIVE = Interval(float, 0, None, "neither")
_WEIGHT = Interval(float, 0, None, "left")
_FRACTION = Interval(float, 0, 1, "both")

#: parameter (config field or CLI option name, with underscores) -> its constraint.
CONSTRAINTS: dict[str, Interval | Options] = {
    # sizes and counts
    "batch_size": _count(), "eval_batch_size": _count(), "max_length": Interval(int, 2, None),
    "target_layers": _count(none_ok=True), "min_layers": _count(),
    "signal_samples": _count(), "samples": _count(), "drop_one_samples": _count(0),
    "max_steps": _count(none_ok=True), "max_train_samples": _count(none_ok=True),
    "max_eval_samples": _count(none_ok=True), "max_samples": _count(none_ok=True),
    "step_eval_samples": _count(none_ok=True), "distill_samples": _count(none_ok=True),
    "zero_shot_samples": _count(), "lm_eval_limit": _count(none_ok=True), "limit": _count(none_ok=True), "max_eval_tokens": _count(none_ok=True),
    "finetune_steps": _count(0, none_ok=True), "recovery_steps": _count(0), "lm_distill_steps": _count(0),
    "heal_steps": _count(0), "steps": _count(0), "top_layers": _count(), "replace_samples": _count(), "lora_r": _count(), "lora_alpha": _count(),
    "patience": _count(0), "teacher_patience": _count(0), "eval_every": _count(0), "min_steps": _count(0),
    "early_stopping_samples": _count(), "verify_k": _count(), "guard_samples": _count(), "heal_guard_samples": _count(), "guard_shortlist": _count(0),
    "heal_eval_every": _count(0), "heal_patience": _count(0),
    # rates and weights
    "epochs": _POSITIVE, "teacher_epochs": _POSITIVE, "distill_epochs": _POSITIVE,
    "lr": _POSITIVE, "teacher_lr": _POSITIVE, "heal_lr": _POSITIVE, "temperature": _POSITIVE,
    "weight_decay": _WEIGHT, "guard_weight": _WEIGHT, "heal_guard_weight": _WEIGHT, "grad_clip": _POSITIVE, "warmup_ratio": Interval(float, 0, 1, "left"),
    "soft_weight": _WEIGHT, "hard_weight": _WEIGHT, "hidden_weight": _WEIGHT,
    "train_layers": _count(none_ok=True), "distill_layers": _count(none_ok=True),
    "max_seconds": _WEIGHT, "heal_seconds": _WEIGHT,
    "kd_weight": _FRACTION, "heal_kd_weight": _FRACTION, "kd_top_k": _count(0), "lora_dropout": Interval(float, 0, 1, "left"),
    "seed": Interval(int, 0, 2**32 - 1),
    "teacher_margin": _FRACTION, "max_accuracy_drop": Interval(float, 0, 1, "both", none_ok=True),
    "max_perplexity_increase": Interval(float, 0, None, "left", none_ok=True),
    # enumerations
    "mixed_precision": Options(("auto", "no", "bf16", "fp16")),
    "cache_teacher_logits": Options(("auto", "yes", "no")),
    "distill_data": Options(("all", "unseen")), "guard_target": Options(("labels", "teacher")),
}


def check(name: str, value: Any, label: str | None = None) -> None:
    """Raise a one-line BadInputError if ``value`` is outside ``name``'s constraint."""
    c = CONSTRAINTS[name]
    if not c.ok(value):
        # On the command line "None" is leaving the option out, so it is not offered as a value.
        raise BadInputError(f"The {label or repr(name) + ' parameter'} must be {c.describe(label is None)}. "
                            f"Got {value!r}.")


def validate(config: Any) -> None:
    """Check every field of a config dataclass that has a row in :data:`CONSTRAINTS`."""
    assert is_dataclass(config)
    for f in fields(config):
        if f.name in CONSTRAINTS:
            check(f.name, getattr(config, f.name))


def apply_to_cli(group) -> None:
    """Give every option of every command of ``group`` named in the table a checking click type."""
    import click

    class Checked(click.ParamType):
        def __init__(self, base: click.ParamType, name: str, flag: str) -> None:
            self.base, self.key, self.flag, self.name = base, name, flag, base.name

        def convert(self, value, param, ctx):
            v = self.base.convert(value, param, ctx)
            check(self.key, v, label=f"{self.flag!r} option")
            return v

    for command in group.commands.values():
        if isinstance(command, click.Group):
            apply_to_cli(command)
        for p in command.params:
            if isinstance(p, click.Option) and p.name in CONSTRAINTS and not isinstance(p.type, Checked) \
                    and not p.is_flag and not isinstance(CONSTRAINTS[p.name], Options):
                p.type = Checked(p.type, p.name, max(p.opts, key=len))
