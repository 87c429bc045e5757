"""Tasks: the registry and how a run finds its task.

``TASKS`` maps each task's name to its :class:`~fusion_prune.tasks.base.Task` subclass; one
module per task registers itself (:func:`register_task`). :func:`detect_task` picks the task from
the model's class and the dataset when the user names none.
"""

from __future__ import annotations

from pathlib import Path

from fusion_prune.errors import BadInputError, bad_choice
from fusion_prune.tasks.base import TASKS, FinishConfig, Task, register_task

# Importing a task module registers it (one line per task).
from fusion_prune.tasks.causal_lm import CausalLMFinish, CausalLMTask  # noqa: E402
from fusion_prune.tasks.classification import ClassificationFinish, ClassificationTask  # noqa: E402

#: the task of a model or dataset nothing else decides
DEFAULT_TASK = "classification"


def get_task(name: str) -> Task:
    """A fresh instance of the registered task ``name``."""
    if name not in TASKS:
        raise bad_choice("task", name, TASKS)
    return TASKS[name]()


def task_of_data(data) -> str | None:
    """The task whose loader returned ``data`` (a loaded dataset or corpus), or None."""
    for name, cls in TASKS.items():
        if isinstance(data, cls.data_type()):
            return name
    return None


def dataset_has_labels(spec: str, label_column: str = "label") -> bool:
    """Whether ``spec`` is a labelled dataset (its train split has ``label_column``)."""
    from fusion_prune import data as D
    from fusion_prune.corpus import CORPUS_SUFFIXES

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in CORPUS_SUFFIXES:
        return False
    if path.is_dir() and any(p.suffix.lower() in CORPUS_SUFFIXES for p in path.iterdir()) \
            and not any(path.glob("train.*")):
        return False
    raw = D._read_spec(spec, [])
    return label_column in raw.get("train", next(iter(raw.values()))).columns


def model_task(model_spec: str) -> str | None:
    """The task a model's own class implies (its head, :meth:`Task.head_suffixes`), None for a base
    model (no head)."""
    from fusion_prune.models import load_config

    archs = getattr(load_config(model_spec), "architectures", None) or []
    for name, cls in TASKS.items():
        if any(a.endswith(cls.head_suffixes) for a in archs):
            return name
    return None


def detect_task(model_spec: str, dataset_spec: str | None, task: str | None = None,
                label_column: str = "label") -> str:
    """The task to run: ``task`` when given; else from the model's class and the dataset.

    A model with a head of one task and a dataset another task's loader claims is ambiguous (a
    causal LM with labels: a head could be added, or the text could be modelled), so it needs
    ``--task``. A base model (no head) goes to the task that claims its data and kind
    (:meth:`Task.claims`); everything else is :data:`DEFAULT_TASK`.
    """
    from fusion_prune.models import load_config
    from fusion_prune.surgery import architecture_of

    if task is not None:
        if task not in TASKS:
            raise bad_choice("task", task, TASKS)
        return task
    implied = model_task(model_spec)
    labelled = dataset_has_labels(dataset_spec, label_column) if dataset_spec is not None else None
    if implied is not None and TASKS[implied].needs_unlabelled_data:
        if labelled:
            raise BadInputError(
                f"The model {model_spec!r} is a {TASKS[implied].description} and the dataset {dataset_spec!r} has "
                f"labels in column {label_column!r}; expected --task {implied} (model the text) or --task "
                f"{DEFAULT_TASK} (add a head).")
        return implied
    if implied is None and labelled is False:
        kind = architecture_of(load_config(model_spec)).kind
        for name, cls in TASKS.items():
            if cls.needs_unlabelled_data and kind in cls.model_kinds:
                return name
    return implied or DEFAULT_TASK


def task_for(model: str, dataset, task: str | None = None, text_column: str = "text", label_column: str = "label"):
    """(Task with its data loaded, data) for a dataset spec or an already loaded dataset."""
    loaded = task_of_data(dataset)
    if loaded is not None:
        t = get_task(task or loaded)
        t.data = dataset
        return t, dataset
    t = get_task(detect_task(str(model), str(dataset), task, label_column))
    return t, t.load_data(str(dataset), text_column, label_column)


def zero_shot_task() -> Task:
    """The task that scores zero-shot accuracy (``fusionprune evaluate --zero-shot``)."""
    return next(cls() for cls in TASKS.values() if cls.scores_zero_shot)


__all__ = ["DEFAULT_TASK", "TASKS", "CausalLMFinish", "CausalLMTask", "ClassificationFinish", "ClassificationTask",
           "FinishConfig", "Task", "dataset_has_labels", "detect_task", "get_task", "model_task", "register_task",
           "task_for", "task_of_data", "zero_shot_task"]
