"""The compression loop: signals -> strategy -> drop -> short recovery -> repeat, then heal/distil.

The loop is the same for every task (:mod:`fusion_prune.tasks`: sequence classification or
causal LM); the task says how to batch calibration data, measure a candidate, recover, and finish.
One pruning step (:func:`measure_state`, then :func:`apply_drop`, then :func:`save_checkpoint`)
serves both ``compress`` and ``collect``.

Work happens in ``<output>.partial/``: the teacher, the current student and ``history.json`` are
written after every step, so ``resume=True`` continues a stopped run exactly (each step's
randomness is seeded by ``seed + step``). The final folder (model, tokenizer, report.json,
report.md, plots) appears in one rename at the end. Test data is used for the report only; every
choice uses the train and validation splits.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from distill import DistillConfig
from fusion_prune.causal_lm import HealConfig
from fusion_prune.errors import BadInputError, bad_choice
from fusion_prune.finetune import FinetuneConfig, teacher_config
from fusion_prune.params import validate
from fusion_prune.strategies import STRATEGIES, StrategyState
from fusion_prune.surgery import count_parameters, drop_layers_, kept_layers, num_layers
from fusion_prune.tasks import TASKS, Task, get_task
from fusion_prune.utils import atomic_dir, check_output, output_lock, versions, write_json_atomic


@dataclass
class CompressConfig:
    """How ``compress`` runs. Give ``target_layers``, a budget, or both (it stops at whichever comes first).

    A budget keeps removing layers while the validation metric after each step's recovery stays
    within it of the teacher's: ``max_accuracy_drop`` (classifiers, absolute: 0.01 = one point) or
    ``max_perplexity_increase`` (causal LMs, relative: 0.5 = 1.5x, before healing). The step that
    would break it is undone. With a budget, one-shot strategies remove one layer per step.
    """

    target_layers: int | None = None
    strategy: str | None = None  # None: the task's default (oracle for classifiers, fusion-verify for LMs)
    fusion_path: str | None = None  # None: the bundle shipped with fusionprune
    trust_pickle: bool = False  # allow a joblib (pickle) bundle of format /1: unpickling can run code
    finetune_steps: int | None = None  # recovery steps per removed layer (None: 50 classification, 0 causal LM)
    signal_samples: int | None = None  # calibration examples (None: 256) or token windows (None: 4)
    label_samples: int | None = None  # validation examples (None: 400) / windows (None: 0) for drop-one labels (0: skip)
    max_eval_samples: int | None = None  # cap on validation/test examples for reported accuracies
    step_eval_samples: int | None = None  # cap on validation examples (windows) for each step's record
    max_length: int | None = None  # tokens per example (None: 128) or per window (None: 512)
    batch_size: int | None = None  # None: 32 (classification), 4 (causal LM)
    lr: float = 1e-4
    seed: int = 0
    task: str = "classification"
    teacher: FinetuneConfig = field(default_factory=lambda: teacher_config(max_train_samples=3000))
    # refuse a teacher whose validation accuracy is within this of the majority share (0: no check)
    teacher_margin: float = 0.02
    distill: DistillConfig | None = field(default_factory=DistillConfig)
    # Also train a copy of the pruned student on hard labels only, with the distillation's steps,
    # data, learning rate and seed, and report its accuracy: did distillation help here?
    distill_control: bool = False
    # "unseen": distil (and train the control) on train rows the teacher was not fine-tuned on,
    # topped up with seen rows when there are too few. On its own training rows a teacher gives
    # nearly one-hot targets, so distillation there is little more than hard-label fine-tuning.
    distill_data: str = "all"
    # causal LM only
    heal: HealConfig = field(default_factory=HealConfig)
    lm_distill_steps: int = 0  # distillation steps from the teacher's logits after healing (0: none)
    kd_weight: float = 0.5  # weight of the KL term in those steps (the rest: next-token loss)
    max_eval_tokens: int | None = 8192  # cap on held-out tokens for perplexity
    zero_shot: dict = field(default_factory=dict)  # {labelled dataset: {prompt, verbalisers, max_samples}}
    verify_k: int = 3  # fusion-verify: layers the bundle shortlists for the measured label to decide among
    max_accuracy_drop: float | None = None  # classifiers: budget on the validation accuracy drop
    max_perplexity_increase: float | None = None  # causal LMs: budget on the relative validation perplexity rise
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise bad_choice("task", self.task, TASKS)
        lm = self.task == "causal-lm"
        if self.strategy is None and self.fusion_path is not None:  # a bundle named and no strategy: use it
            self.strategy = "fusion"
        defaults = {"strategy": TASKS[self.task].default_strategy, "finetune_steps": 0 if lm else 50,
                    "signal_samples": 4 if lm else 256, "label_samples": 0 if lm else 400,
                    "max_length": 512 if lm else 128, "batch_size": 4 if lm else 32,
                    "step_eval_samples": 8 if lm else None}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.strategy not in STRATEGIES:
            raise bad_choice("strategy", self.strategy, STRATEGIES)
        validate(self)  # ranges in fusion_prune/params.py
        own, other = ("max_perplexity_increase", "max_accuracy_drop") if lm else \
            ("max_accuracy_drop", "max_perplexity_increase")
        if getattr(self, other) is not None:
            raise BadInputError(f"The '{other}' parameter is not a budget for task {self.task!r}; expected "
                                f"'{own}'. Got {getattr(self, other)}.")
        if self.target_layers is None and getattr(self, own) is None:
            raise BadInputError(f"The 'target_layers' parameter is needed when no budget is given; expected "
                                f"target_layers and/or {own}. Got neither.")
        if lm and STRATEGIES[self.strategy].classification_only:
            raise BadInputError(f"The 'strategy' parameter {self.strategy!r} needs a classifier; expected a strategy "
                                "for causal LMs.")




def _teacher_data(model_spec: str, data) -> dict | None:
    """How a teacher made by ``fusionprune finetune`` sampled this dataset's train split
    (``max_train_samples``, ``seed``), from its run record; None when unknown."""
    from fusion_prune.finetune import RUN_RECORD

    record = Path(model_spec) / RUN_RECORD
    if not record.is_file():
        return None
    rec = json.loads(record.read_text())
    same = rec.get("data", {}).get("spec") == data.spec and rec["data"].get("train_examples") == len(data.train)
    return {"max_train_samples": rec["config"]["max_train_samples"], "seed": rec["config"]["seed"]} if same else None


def _distill_rows(train_df, teacher_data: dict | None, n: int | None, seed: int):
    """(rows, record): ``n`` train rows (all when None), those the teacher did not see first."""
    from fusion_prune.data import subsample_positions

    seen = np.zeros(len(train_df), dtype=bool)
    if teacher_data is not None:
        seen[subsample_positions(train_df, teacher_data["max_train_samples"], teacher_data["seed"])] = True
    order = np.random.default_rng(seed).permutation(len(train_df))
    pos = np.concatenate([order[~seen[order]], order[seen[order]]])[:n]
    return (train_df.iloc[pos].reset_index(drop=True),
            {"rows": int(len(pos)), "unseen_by_teacher": int((~seen[pos]).sum()), "teacher_data": teacher_data})


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _log(msg: str) -> None:
    import sys

    print(f"[fusionprune] {msg}", file=sys.stderr, flush=True)


def _bundle_extras(bundle) -> list[str]:
    """The opt-in signals a fusion bundle was trained on beside the 12: computed at every step too."""
    from signals import DEFAULT_SIGNALS, SIGNALS

    if bundle is None:
        return []
    unknown = [f for f in bundle.features if f not in SIGNALS]
    if unknown:
        raise BadInputError(f"The fusion bundle was trained on feature columns {list(bundle.features)}; expected "
                            f"signals fusionprune computes (see `fusionprune signals --help`). Got {unknown}.")
    return [f for f in bundle.features if f not in DEFAULT_SIGNALS]


def has_budget(task: Task, cfg: CompressConfig) -> bool:
    return getattr(cfg, task.budget_field, None) is not None


def step_target(task: Task, cfg: CompressConfig, n_layers: int) -> int:
    """The depth a strategy aims at from ``n_layers``: the target, or one layer less under a budget
    (so that a one-shot strategy cannot overshoot the budget by a whole block)."""
    floor = cfg.target_layers or 1
    return max(floor, n_layers - 1) if has_budget(task, cfg) else floor


@torch.no_grad()
def throughput(model, batches: list[dict], per_token: bool = False, repeats: int = 3) -> float:
    """Examples (or, ``per_token``, tokens) per second of one forward pass on ``batches[0]``
    (input_ids (B, T)), median of ``repeats`` after one warm-up."""
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(**batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    ids = batch["input_ids"]
    return float((ids.numel() if per_token else ids.shape[0]) / np.median(times))


def measure_state(task: Task, student, tok, cfg: CompressConfig, step: int, strategy, signal_names: list[str],
                  bundle=None, full_layers: int | None = None, want_labels: bool = False):
    """Everything a strategy may look at in the current state: (StrategyState, signals, labels, seconds).

    ``seconds`` = {"signals", "labels"}: the time each measurement took (0 when not taken).
    """
    t0 = time.perf_counter()
    batches = task.calibration_batches(student, tok, cfg, step)
    signals = None
    if strategy.needs_signals or cfg.signal_samples:
        signals = task.signals(student, tok, batches, signal_names, cfg)
    t_signals = time.perf_counter() - t0
    labels, t_labels = None, 0.0
    if strategy.needs_labels or want_labels:
        t1 = time.perf_counter()
        labels = task.drop_one(student, tok, cfg)
        t_labels = time.perf_counter() - t1
    state = StrategyState(student, batches, num_layers(student), step_target(task, cfg, num_layers(student)),
                          kept_layers(student.config),
                          signals, labels.table if labels is not None else None, bundle,
                          np.random.default_rng(cfg.seed + step), full_layers, task,
                          measure=lambda only: task.drop_one(student, tok, cfg, only=only).table,
                          verify_k=cfg.verify_k)
    return state, signals, labels, {"signals": t_signals, "labels": t_labels}


def apply_drop(task: Task, student, tok, drop: list[int], cfg: CompressConfig, step: int) -> list[int]:
    """Remove ``drop`` (current indices) in place, then the short recovery; returns their original indices.

    Recovery steps are per removed layer: a one-shot strategy (angular-block) gets the same budget
    in total as one that removes the same layers one at a time.
    """
    orig = [kept_layers(student.config)[i] for i in drop]
    drop_layers_(student, drop)
    if cfg.finetune_steps:
        task.recover(student, tok, cfg.finetune_steps * len(drop), cfg, seed=cfg.seed + step + 1)
    return orig


CHECKPOINT_RECORD = "fusionprune_checkpoint.json"


def save_checkpoint(folder: Path, model, tok, record: dict, tables: dict | None = None) -> None:
    """The model, its record and ``tables`` ({file name: DataFrame}) in one folder swapped in by one rename.

    A kill at any moment leaves either the previous checkpoint or this one, never a model one
    step ahead of its record.
    """
    from fusion_prune.report import write_table

    with atomic_dir(folder, overwrite=True, lock=False) as tmp:  # the run already holds the output's lock
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, table in (tables or {}).items():
            write_table(table, tmp / name)
        write_json_atomic(tmp / CHECKPOINT_RECORD, record)


def load_checkpoint_record(folder: Path) -> dict | None:
    """The record of a checkpoint written by :func:`save_checkpoint`, or None if there is none."""
    f = folder / CHECKPOINT_RECORD
    return json.loads(f.read_text()) if f.is_file() else None


def compress(model_spec: str, data, cfg: CompressConfig, output: str | Path, resume: bool = False,
             overwrite: bool = False, task: Task | None = None) -> dict:
    """Compress ``model_spec`` to ``cfg.target_layers`` layers; returns the report (also saved).

    ``data`` is what ``task.load_data`` returned (a TextDataset or a TextCorpus); ``task``
    defaults to ``cfg.task`` with ``data`` attached. The output is locked for the whole run.
    """
    check_output(output, overwrite)
    with output_lock(output):
        return _compress(model_spec, data, cfg, Path(output), resume, overwrite, task)


def _compress(model_spec: str, data, cfg: CompressConfig, output: Path, resume: bool, overwrite: bool,
              task: Task | None) -> dict:
    from fusion_prune.fusion import load_bundle
    from signals import DEFAULT_SIGNALS

    if task is None:
        task = get_task(cfg.task)
    if task.data is None:
        task.data = data
    partial = _partial(output)
    if partial.exists() and not resume:
        if not overwrite:
            raise BadInputError(f"A stopped run exists at {str(partial)!r}; pass --resume to continue it "
                                "(or --overwrite to start again).")
        shutil.rmtree(partial)
    strategy = STRATEGIES[cfg.strategy]
    bundle = load_bundle(cfg.fusion_path, trust_pickle=cfg.trust_pickle, task=task.name) if strategy.needs_bundle \
        else None
    signal_names = list(dict.fromkeys([*DEFAULT_SIGNALS, *strategy.extra_signals, *_bundle_extras(bundle)]))
    meta = json.loads(json.dumps({"model": str(model_spec), "dataset": data.spec, "data_sha256": data.content_hash(),
                                  "config": asdict(cfg)}, default=str))
    meta["config"].pop("progress")
    meta["config"]["heal"].pop("progress", None)
    t_start = time.perf_counter()

    per_token = task.throughput_unit == "tokens/s"
    saved = load_checkpoint_record(partial / "current") if resume else None
    if resume and saved is None and partial.exists():
        _log(f"{partial} holds no finished checkpoint (stopped before the first one): starting again")
        shutil.rmtree(partial)
    if saved is not None and saved["meta"] != meta:
        if not overwrite:
            what = ("data of other content" if saved["meta"].get("data_sha256") != meta["data_sha256"]
                    else "other arguments")
            raise BadInputError(f"The stopped run at {str(partial)!r} used {what}; expected the same "
                                "arguments and data to resume (or --overwrite to start again).")
        _log("the stopped run used other arguments: starting again (--overwrite)")
        shutil.rmtree(partial)
        saved = None
    if saved is not None:
        teacher, tok, _ = task.load_model(str(partial / "teacher"))
        student, _, _ = task.load_model(str(partial / "current"))
        history, info = saved["history"], saved["info"]
        if num_layers(student) != info["teacher_layers"] - sum(len(h["dropped"]) for h in history):
            raise BadInputError(f"The stopped run at {str(partial)!r} has a model of {num_layers(student)} layers that "
                                "does not match its record; expected a consistent checkpoint (or --overwrite).")
        _log(f"resuming after step {len(history)} ({num_layers(student)} layers)")
    else:
        teacher, tok, ready = task.load_model(model_spec)
        depth = num_layers(teacher)
        if cfg.target_layers is not None and cfg.target_layers >= depth:
            raise BadInputError(f"The 'target_layers' parameter must be below the model's depth {depth}. "
                                f"Got {cfg.target_layers}.")
        info = task.prepare_teacher(teacher, tok, cfg, ready, str(model_spec), _log)
        info["task"] = task.name
        info["teacher_layers"] = depth
        student = copy.deepcopy(teacher)
        history = []
        partial.mkdir(parents=True, exist_ok=True)
        info["teacher_parameters"] = count_parameters(teacher)
        info["teacher_throughput"] = throughput(teacher, task.calibration_batches(teacher, tok, cfg, 0), per_token)
        info["throughput_unit"] = task.throughput_unit
        save_checkpoint(partial / "teacher", teacher, tok, {"meta": meta, "history": [], "info": info})
        save_checkpoint(partial / "current", student, tok, {"meta": meta, "history": [], "info": info})

    budget = has_budget(task, cfg)
    if budget:  # the worst validation metric allowed: what each step is checked against, and the plots' line
        info["budget_limit"] = task.budget_limit(info, cfg)
    while num_layers(student) > (cfg.target_layers or 1) and "budget_stop" not in info:
        step = len(history)
        t0 = time.perf_counter()
        n = num_layers(student)
        state, signals, labels, took = measure_state(task, student, tok, cfg, step, strategy, signal_names, bundle,
                                                     info["teacher_layers"], want_labels=bool(cfg.label_samples))
        t1 = time.perf_counter()
        drop = sorted(strategy.fn(state))
        selection = time.perf_counter() - t1 + (took["signals"] if strategy.needs_signals else 0) + (
            took["labels"] if strategy.needs_labels else 0)
        predicted = None
        if bundle is not None and len(drop) == 1:
            predicted = float(bundle.predict(signals.sort_values("layer"))[drop[0]])
        measured = None
        if labels is not None and len(drop) == 1:
            measured = float(labels.table.set_index("layer")[task.label_sort[0][0]][drop[0]])
        orig = apply_drop(task, student, tok, drop, cfg, step)
        metric = task.step_metric(student, tok, cfg)
        entry = {
            "step": step, "layers_before": n, "dropped": drop, "dropped_orig": orig,
            "kept_layers": kept_layers(student.config), "predicted": predicted, task.step_label_key: measured,
            task.step_metric_key: metric, "finetune_steps": cfg.finetune_steps * len(drop),
            "selection_seconds": round(selection, 3),
            "parameters": count_parameters(student),
            "throughput": throughput(student, state.batches, per_token),
            "seconds": round(time.perf_counter() - t0, 2),
            "signals": signals.to_dict("list") if signals is not None else None,
            "labels": labels.table.to_dict("list") if labels is not None else None,
        }
        if budget and not task.within_budget(metric, info, cfg):
            # Undo the step: the checkpoint still holds the model before it.
            info["budget_stop"] = {k: entry[k] for k in ("step", "layers_before", "dropped_orig", task.step_metric_key)}
            student, _, _ = task.load_model(str(partial / "current"))
            save_checkpoint(partial / "current", student, tok, {"meta": meta, "history": history, "info": info})
            _log(f"step {step}: removing {orig} (original) gives validation {task.metric} {metric:.4f}, outside "
                 f"{task.budget_field} {getattr(cfg, task.budget_field)} of the teacher's "
                 f"{info[task.teacher_metric_key]:.4f}: undone, stopping at {n} layers")
            break
        history.append(entry)
        save_checkpoint(partial / "current", student, tok, {"meta": meta, "history": history, "info": info})
        _log(f"step {step}: {n} -> {num_layers(student)} layers, dropped {orig} (original), "
             f"validation {task.metric} {metric:.4f}, {history[-1]['seconds']:.0f} s")

    finish_cfg = cfg
    if num_layers(student) == info["teacher_layers"]:
        # A budget that allowed no removal: the student is the teacher, and distilling or healing a
        # copy of the teacher into itself can only move it away from the teacher.
        _log("no layer could be removed within the budget: the teacher is returned as it is (no distillation)")
        finish_cfg = replace(cfg, distill=None, lm_distill_steps=0, heal=replace(cfg.heal, method="none", steps=0))
    student, fields = task.finish(teacher, student, tok, finish_cfg, info, _log)
    n_params = count_parameters(student)
    report = {
        "model": str(model_spec), "dataset": data.spec, "strategy": cfg.strategy, "task": task.name, **fields,
        "teacher_layers": info["teacher_layers"], "student_layers": num_layers(student),
        "kept_layers": kept_layers(student.config), "history": history, "info": info,
        "budget": ({"parameter": task.budget_field, "value": getattr(cfg, task.budget_field),
                    "stopped": info.get("budget_stop")} if budget else None),
        "student_parameters": n_params,
        "accuracy_to_size": (fields["student_accuracy"] / fields["teacher_accuracy"]
                             / (n_params / info["teacher_parameters"])
                             if fields.get("teacher_accuracy") and info.get("teacher_parameters") else None),
        "config": meta["config"],
        "fusion_bundle": (bundle.describe() | {"path": str(cfg.fusion_path or "default")}) if bundle else None,
        "selection_seconds": round(sum(h["selection_seconds"] for h in history), 3),
        "wall_seconds": round(time.perf_counter() - t_start, 1), "versions": versions(),
    }
    from fusion_prune.report import write_compress_report

    with atomic_dir(output, overwrite=overwrite, lock=False) as tmp:
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_compress_report(report, tmp)
    shutil.rmtree(partial, ignore_errors=True)
    return report
