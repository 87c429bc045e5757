"""The Python API: the CLI's main jobs as functions that take names or objects and return objects.

    from fusion_prune import compress, compute_signals, load_fusion, prune

    table = compute_signals("minilm-l6", "rotten-tomatoes", samples=64)    # (6 layers, 14 columns)
    scores = load_fusion().predict(table)                                  # removability per layer
    result = compress("minilm-l6", "rotten-tomatoes", target_layers=4)     # a CompressResult
    result.report["student_accuracy"], result.model, result.save("minilm-4")

Models and datasets are anything the CLI accepts (asset names, folders, files, hub names);
every field of :class:`fusion_prune.loop.CompressConfig` and of the task's finish config
(:class:`~fusion_prune.tasks.ClassificationFinish`, :class:`~fusion_prune.tasks.CausalLMFinish`) is a
keyword of :func:`compress`, with the defaults ``fusionprune compress`` has.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from fusion_prune.errors import BadInputError
from fusion_prune.fusion import FusionBundle, load_bundle
from fusion_prune.report import CompressReport
from fusion_prune.tasks import task_for

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """What :func:`compress` made: the pruned (healed, distilled) model, its tokenizer and report.

    ``path`` is the folder it was saved to (a temporary one when ``compress`` got no ``output``);
    :meth:`save` copies it to a folder of your choice, atomically.
    """

    model: Any  # None after a streamed run (max_memory): load it from ``path`` where it fits
    tokenizer: Any
    report: CompressReport | dict  # dict: a streamed run's report.json (fusion_prune.streaming)
    path: Path

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Copy the saved folder (model, tokenizer, README.md model card, report.json, report.md, plots) to ``path``."""
        from fusion_prune.utils import atomic_dir

        path = Path(path)
        if path.resolve() == self.path.resolve():
            return path
        with atomic_dir(path, overwrite=overwrite) as tmp:
            shutil.copytree(self.path, tmp, dirs_exist_ok=True)
        return path

    def __repr__(self) -> str:
        metric = {k: self.report.get(k) for k in ("student_accuracy", "student_perplexity") if k in self.report}
        return (f"CompressResult({self.report.get('teacher_layers')} -> {self.report.get('student_layers')} layers, "
                f"kept {self.report.get('kept_layers')}, {metric}, saved at {str(self.path)!r})")


def compress(model: str, dataset, target_layers: int | None = None, output: str | Path | None = None, *,
             task: str | None = None, text_column: str = "text", label_column: str = "label",
             resume: bool = False, overwrite: bool = False, **options: Any) -> CompressResult:
    """Remove layers from ``model`` greedily until ``target_layers`` remain (or a budget such as
    ``max_accuracy_drop=0.01`` would be broken, whichever comes first), then heal / distil.

    ``dataset``: a spec (asset, file, folder) or a loaded ``TextDataset`` / ``TextCorpus``.
    ``options``: fields of :class:`~fusion_prune.loop.CompressConfig` (``strategy``,
    ``finetune_steps``, ...) and of the task's finish config (``distill``, ``heal``,
    ``heal_steps``, ...), as :meth:`CompressConfig.from_options` reads them. Returns a
    :class:`CompressResult`; the folder ``output`` (or a temporary one) holds the model and
    ``report.json``.
    """
    from fusion_prune.loop import run_compress

    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="fusionprune-")) / "model"
    report, t = run_compress(str(model), dataset, out, task=task, text_column=text_column, label_column=label_column,
                             resume=resume, overwrite=overwrite, target_layers=target_layers, **options)
    if isinstance(report, dict):  # max_memory: the model may not fit, so it is not loaded back
        return CompressResult(None, None, report, out)
    net, tok, _ = t.load_model(str(out))
    return CompressResult(net, tok, report, out)


def compute_signals(model: str, dataset, *, samples: int | None = None, signals: Sequence[str] | None = None,
                    task: str | None = None, text_column: str = "text", label_column: str = "label",
                    batch_size: int | None = None, max_length: int | None = None, seed: int = 0,
                    split: str | None = None, progress: bool = False) -> pd.DataFrame:
    """The (n_layers, 2 + n_signals) signals table of ``model`` on a calibration sample of ``dataset``.

    The same table ``compress`` computes at each step (columns ``layer``, ``orig_layer``, then the
    12 defaults and any opt-in ``signals``). ``samples``: calibration examples (classifiers,
    default 256) or token windows of ``max_length`` (causal LMs, default 4). ``split``: draw the
    classifier's sample from this split (as ``fusionprune signals`` and ``analyze`` do) instead of
    the train split ``compress`` calibrates on.
    """
    from fusion_prune.config import StepConfig
    from signals import DEFAULT_SIGNALS, resolve_signals

    names = list(dict.fromkeys([*DEFAULT_SIGNALS, *(signals or [])]))
    resolve_signals(names)
    t, _ = task_for(model, dataset, task, text_column, label_column)
    net, tok, ready = t.load_model(str(model))
    if not ready:
        log.warning("%s has no head trained for these labels; gradient and prediction-MI signals refer to an "
                    "untrained head", model)
    if batch_size is None and split is not None:  # the analysis sample: batched as `analyze` batches it
        batch_size = t.analysis_batch_size
    step = StepConfig(signal_samples=samples, batch_size=batch_size, max_length=max_length, seed=seed, progress=False)
    t.resolve_step(step)
    if split is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the untrained head is logged above
            return t.analysis_signals(net, tok, step, names, split, progress)[0]
    return t.signals(net, t.calibration_batches(net, tok, step, 0), names)


def inspect_model(model: str) -> dict:
    """What ``fusionprune inspect`` shows: family, kind, class, depth, width, parameters, kept-layer
    history and the task the model's class implies."""
    from fusion_prune.models import load_native
    from fusion_prune.surgery import describe
    from fusion_prune.tasks import TASKS, DEFAULT_TASK, model_task

    net, _ = load_native(model)
    d = {"model": model, **describe(net)}
    implied = model_task(model)
    if implied is None:
        unlabelled = [n for n, c in TASKS.items() if c.needs_unlabelled_data and d["kind"] in c.model_kinds]
        implied = (f"{unlabelled[0]} (with an unlabelled corpus) or {DEFAULT_TASK}" if unlabelled
                   else f"{DEFAULT_TASK} (a head is added)")
    d["task"] = implied
    return d


def evaluate(model: str, dataset: str | None = None, *, task: str | None = None, zero_shot: bool = False,
             label_column: str = "label", dtype: str = "auto", lm_eval: str | None = None, **options: Any):
    """(task, result) of ``fusionprune evaluate``: the task's own metric of ``model`` on a split of
    ``dataset`` (accuracy; perplexity; with ``zero_shot``, zero-shot accuracy of a causal LM), or with
    ``lm_eval`` (comma-separated task names) lm-evaluation-harness results ``{"lm_eval": {task:
    {metric: value}}}`` (no dataset needed; ``lm_eval_include``, ``limit``: :mod:`fusion_prune.harness`).
    ``dtype``: one of ``fusion_prune.models.DTYPES`` (checked when the model is loaded)."""
    from fusion_prune.tasks import detect_task, get_task, zero_shot_task

    if lm_eval:
        t = zero_shot_task()  # the causal-LM task: the harness scores language models
        t.dtype = dtype
        return t, t.evaluate(model, dataset, lm_eval=lm_eval, **options)
    if dataset is None:
        raise BadInputError("The '--dataset' option is needed (or --lm-eval TASKS); expected a dataset. Got none.")
    t = zero_shot_task() if zero_shot else get_task(detect_task(model, dataset, task, label_column))
    t.dtype = dtype
    return t, t.evaluate(model, dataset, label_column=label_column, zero_shot=zero_shot, **options)


def load_fusion(path: str | Path | None = None, trust_pickle: bool = False, task: str | None = None
                ) -> FusionBundle:
    """A fusion bundle (default: the one shipped for ``task``, a name in ``fusion_prune.tasks.TASKS``;
    None: the default task's). ``bundle.predict(table)`` scores a signals table."""
    from fusion_prune.tasks import DEFAULT_TASK, TASKS, bad_choice

    task = task or DEFAULT_TASK
    if path is None and task not in TASKS:
        raise bad_choice("task", task, TASKS)
    return load_bundle(path if path is not None else TASKS[task].default_bundle, trust_pickle=trust_pickle)


def prune(model, layers: Sequence[int]):
    """A copy of ``model`` (a loaded model, or a spec to load) without ``layers`` (current indices).

    The input is not changed; ``save_pretrained`` on the result gives a folder that plain
    transformers loads.
    """
    from fusion_prune.surgery import drop_layers

    if isinstance(model, (str, Path)):
        from fusion_prune.models import load_native

        model, _ = load_native(model)
    return drop_layers(model, list(layers))


def prune_to_folder(model: str, layers: Sequence[int], output: str | Path, overwrite: bool = False) -> dict:
    """Load ``model``, remove ``layers`` (current indices) and save a folder of the same class that
    plain transformers loads, with ``fusionprune_prune.json`` (before, after, versions); returns that record."""
    from fusion_prune.card import architecture_of, invocation, write_model_card
    from fusion_prune.models import load_native, save_model
    from fusion_prune.surgery import check_layers, describe, drop_layers_, kept_layers, num_layers
    from fusion_prune.utils import atomic_dir, versions, write_json_atomic

    net, tok = load_native(str(model))
    before = describe(net)
    check_layers(list(layers), num_layers(net), param="--drop")
    removed = [kept_layers(net)[i] for i in layers]  # original indices, also for a model pruned before
    drop_layers_(net, list(layers))  # loaded here for this call alone: no copy needed
    record = {"command": "prune", "model": str(model), "dropped": list(layers), "before": before,
              "after": describe(net), "versions": versions()}
    with atomic_dir(Path(output), overwrite=overwrite) as tmp:
        save_model(net, tok, tmp)
        write_json_atomic(tmp / "fusionprune_prune.json", record)
        write_model_card(tmp, source=str(model), architecture=architecture_of(tmp), teacher_layers=before["layers"],
                         removed=removed, kept=kept_layers(net), parameters=record["after"].get("parameters"),
                         method=[f"- Layers removed as given (`--drop {','.join(map(str, layers))}`, current "
                                 "indices), with no measurement, recovery or healing."],
                         results=["Not measured. `fusionprune evaluate -m FOLDER -d DATASET` measures it."],
                         versions=record["versions"], command=invocation())
    return record


def distill_to_folder(teacher: str, student: str, data, cfg, output: str | Path, overwrite: bool = False,
                      accelerator=None) -> dict | None:
    """Distil ``teacher`` into ``student`` (classifiers) on ``data`` (a TextDataset) with ``cfg``
    (a :class:`distill.DistillConfig`), score the student on test and save it with
    ``fusionprune_distill.json``; returns that record (None on processes other than the main one
    under ``accelerate launch``)."""
    from distill import distill
    from fusion_prune.finetune import evaluate
    from fusion_prune.training import make_accelerator
    from fusion_prune.card import architecture_of, invocation, write_model_card
    from fusion_prune.models import load_classifier, save_model
    from fusion_prune.surgery import count_parameters, kept_layers, num_layers
    from fusion_prune.utils import atomic_dir, versions, write_json_atomic

    acc = accelerator or make_accelerator(cfg.mixed_precision)
    t_model, tok, t_trained = load_classifier(str(teacher), data.labels)
    s_model, _, _ = load_classifier(str(student), data.labels)
    if not t_trained:
        raise BadInputError(f"The teacher {str(teacher)!r} has no classification head trained for these labels; "
                            "expected a fine-tuned classifier.")
    stats = distill(t_model, s_model, tok, data.train, data.labels, cfg, acc)
    # Every rank evaluates (the test split is sharded and gathered); only the main one writes.
    res = evaluate(s_model, tok, data.test, data.labels, cfg.batch_size * 2, cfg.max_length, accelerator=acc)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    record = {"teacher": str(teacher), "student": str(student), "train": stats, "test": res,
              "num_processes": acc.num_processes, "versions": versions()}
    with atomic_dir(Path(output), overwrite=overwrite) as tmp:
        plain = acc.unwrap_model(s_model)
        save_model(plain, tok, tmp)
        write_json_atomic(tmp / "fusionprune_distill.json", record)
        removed = sorted(set(kept_layers(t_model)) - set(kept_layers(plain)))
        write_model_card(tmp, source=str(student), architecture=architecture_of(tmp),
                         teacher_layers=num_layers(t_model), removed=removed, kept=kept_layers(plain),
                         parameters=count_parameters(plain), versions=record["versions"], command=invocation(),
                         method=[f"- The student `{student}` distilled from the teacher `{teacher}` "
                                 f"({num_layers(t_model)} layers) on {getattr(data, 'spec', 'the given data')}, "
                                 f"{acc.num_processes} process(es); settings in `fusionprune_distill.json`."],
                         results=[f"Test accuracy of the student after distillation: {res['accuracy']:.4f} "
                                  f"({len(data.test)} examples)."])
    return record
