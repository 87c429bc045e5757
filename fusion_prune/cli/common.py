"""What the command modules share: the error-handling group, options read from the config
dataclasses, the dataset and task options, and the output lock.

An option's default and help come from the dataclass field it sets (:class:`FieldOption`), read
when first needed, so ``fusionprune --help`` stays fast (no torch) and the CLI cannot drift from the
Python API (tests/test_cli_defaults.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import click

from fusion_prune.errors import BadInputError


class Group(click.Group):
    """A click group that turns :class:`BadInputError` into one line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BadInputError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except MemoryError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError; see below
            click.echo(f"Error: out of memory ({e}); expected a smaller --batch-size or --max-length.", err=True)
            ctx.exit(1)
        except RuntimeError as e:
            if type(e).__name__ != "OutOfMemoryError":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
            click.echo(f"Error: {first.split('. ')[0]}; expected a smaller --batch-size or --max-length "
                       "(or --mixed-precision bf16).", err=True)
            ctx.exit(1)


def _load(ref: str) -> Any:
    """``"module:Attr"`` -> the attribute (imported on first use)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class FieldOption(click.Option):
    """An option whose default and help are those of a config field, read on first use.

    ``source``: ``"module:Class"`` (or a factory of the default config) and ``path`` (a field or a dotted path into a nested config);
    ``help_extra`` is appended (e.g. the per-task defaults of a field whose default is None).
    """

    def __init__(self, *decls, source: str, path: str, help_extra: Callable[[], str] | None = None, **kw):
        self._source, self._path, self._help_extra, self._loaded = source, path, help_extra, None
        self._help_given = kw.pop("help", None)
        kw.setdefault("show_default", True)
        super().__init__(*decls, **kw)

    def _field(self) -> tuple[Any, str]:
        if self._loaded is None:
            from fusion_prune.config import path_default, path_help

            cls = _load(self._source)
            if callable(cls) and not isinstance(cls, type):  # a factory of the default config (teacher_config)
                cls = cls()
            self._loaded = (path_default(cls, self._path), path_help(cls, self._path))
        return self._loaded

    @property
    def help(self) -> str:  # type: ignore[override]
        text = self._help_given or self._field()[1]
        return text + (" " + self._help_extra() if self._help_extra else "")

    @help.setter
    def help(self, value) -> None:  # click's __init__ sets it; the field's help wins
        pass

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if self.multiple or (self.is_flag and not self.secondary_opts):  # an on/off pair takes the field's
            return super().get_default(ctx, call)
        return self._field()[0]


def field_option(*decls: str, source: str, path: str | None = None, **kw) -> Callable:
    """``@field_option("--lr", source="fusion_prune.loop:CompressConfig")``: the option for field ``lr``."""
    name = path or decls[0].lstrip("-").replace("-", "_")
    return click.option(*decls, cls=FieldOption, source=source, path=name, **kw)


def task_defaults(name: str) -> Callable[[], str]:
    """The note "[classification 50, causal-lm 0]" of a step field whose default is the task's."""
    def note() -> str:
        from fusion_prune.tasks import TASKS

        values = {t: c.step_defaults.get(name) for t, c in TASKS.items()}
        return "[" + ", ".join(f"{t} {'unset' if v is None else v}" for t, v in values.items()) + "]"
    return note


class RegistryChoice(click.Choice):
    """A click Choice whose values are a registry's keys (plus ``extra``), read on first use."""

    def __init__(self, ref: str, extra: tuple[str, ...] = (), case_sensitive: bool = True):
        self._ref, self._extra = ref, extra
        self.case_sensitive = case_sensitive

    @property
    def choices(self):  # type: ignore[override]
        return (*self._extra, *_load(self._ref))

    @choices.setter
    def choices(self, value) -> None:
        pass


class ParamChoice(RegistryChoice):
    """A click Choice of the values ``fusion_prune.params.CONSTRAINTS`` allows for ``name``."""

    def __init__(self, name: str):
        self._name = name
        self.case_sensitive = True

    @property
    def choices(self):  # type: ignore[override]
        from fusion_prune.params import CONSTRAINTS

        return CONSTRAINTS[self._name].values

    @choices.setter
    def choices(self, value) -> None:
        pass


def task_option(f):
    return click.option("--task", type=RegistryChoice("fusion_prune.tasks:TASKS"), default=None,
                        help="Default: causal-lm for a *ForCausalLM model (or a base decoder with an unlabelled "
                             "corpus), else classification.")(f)


def dataset_options(f=None, *, required: bool = True, help_extra: str = ""):  # noqa: A002
    def wrap(f):
        f = click.option("--label-column", default="label", show_default=True, help="Column holding the class.")(f)
        f = click.option("--text-column", default="text", show_default=True, help="Column holding the text.")(f)
        return click.option("--dataset", "-d", "dataset", required=required,
                            help="Asset name, CSV/TSV/JSON/JSONL/parquet/.txt file, folder, or hub name."
                                 + help_extra)(f)

    return wrap(f) if f is not None else wrap


def model_option(help: str = "Asset name, local folder, .gguf file or hub id."):  # noqa: A002
    return click.option("--model", "-m", required=True, help=help)


def output_option(help: str = "Output folder."):  # noqa: A002
    return click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help=help)


def overwrite_option(what: str = "output folder"):
    return click.option("--overwrite", is_flag=True, help=f"Replace an existing {what}.")


def teacher_options(source: str):
    """The teacher's fine-tuning budget (used only when the model has no head for the labels), from the
    run config ``source`` (compress and collect share the options, each with its own defaults)."""
    opts = [
        field_option("--teacher-epochs", source=source, path="teacher.epochs", type=float,
                     help="Budget of the teacher's fine-tuning in epochs (when the model has no head for the labels)."),
        field_option("--teacher-lr", source=source, path="teacher.lr", type=float),
        field_option("--teacher-patience", source=source, path="teacher.patience", type=int),
        field_option("--max-train-samples", source=source, path="teacher.max_train_samples", type=int,
                     help="Cap on the teacher's training examples."),
        field_option("--teacher-margin", source=source, type=float),
    ]

    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


def hold_output(path: Path, overwrite: bool, kind: str = "folder") -> None:
    """Check an output path and lock it until the command ends (released when click closes the context)."""
    from fusion_prune.utils import check_output, output_lock

    check_output(path, overwrite, kind)
    click.get_current_context().with_resource(output_lock(path))


def table_output(path: Path) -> None:
    """Refuse an output table that is neither .parquet nor .csv, before anything loads."""
    if path.suffix.lower() not in (".parquet", ".csv"):
        raise BadInputError(f"The '--output' option must end in .parquet or .csv. Got {path.name!r}.")


def echo_json(obj: Any) -> None:
    import json

    click.echo(json.dumps(obj, indent=2, sort_keys=True))
