"""The one pruning loop: choose -> drop -> recover -> record, checkpointed after every step.

``compress`` and ``collect`` (:mod:`fusion_prune.collect`) both run :func:`prune_loop`; collect
is that loop with a hook that writes fusion-training rows. The loop is the same for every task
(:mod:`fusion_prune.tasks`): the task says how to batch calibration data, measure a candidate,
recover and finish. Work happens in ``<output>.partial/``: the teacher and the current student
are checkpointed with their record after every step (:mod:`fusion_prune.checkpoint`), so
``resume=True`` continues a stopped run exactly (each step's randomness is seeded by
``seed + step``). The final folder (model, tokenizer, model card, report.json, report.md, plots) appears in
one rename at the end. Test data is used for the report only; every choice uses the train and
validation splits.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fusion_prune.checkpoint import RunFolder, load_checkpoint_record
from fusion_prune.config import TEACHER_OPTIONS, StepConfig, field_default, opt, with_paths
from fusion_prune.errors import BadInputError, bad_choice
from fusion_prune.finetune import FinetuneConfig, teacher_config
from fusion_prune.lm import TEACHER_TEXT
from fusion_prune.memory import PhasePeaks, fix_mmap_threshold
from fusion_prune.params import validate
from fusion_prune.report import REFERENCE, CompressReport, StepRecord
from fusion_prune.strategies import STRATEGIES, StrategyState
from fusion_prune.surgery import count_parameters, drop_layers_, kept_layers, num_layers
from fusion_prune.tasks import TASKS, DEFAULT_TASK, FinishConfig, Task, get_task
from fusion_prune.utils import atomic_dir, check_output, output_lock, versions

log = logging.getLogger(__name__)


@dataclass
class CompressConfig(StepConfig):
    """How ``compress`` runs: the step's settings (:class:`StepConfig`), what the run adds, and the
    task's finish (``finish``; None: the task's default finish config).

    Give ``target_layers``, a budget, or both (it stops at whichever comes first). A budget keeps
    removing layers while the validation metric after each step's recovery stays within it of the
    teacher's: ``max_accuracy_drop`` (classifiers, absolute: 0.01 = one point) or
    ``max_perplexity_increase`` (causal LMs, relative: 0.5 = 1.5x, before healing). The step that
    would break it is undone. With a budget, one-shot strategies remove one layer per step.
    """

    target_layers: int | None = opt(help="Depth of the compressed model (needed unless a budget is given; with "
                                         "one, the floor).")
    strategy: str | None = opt(help="How to pick layers (default: the task's, by measurement).")
    fusion_path: str | None = opt(help="Fusion bundle for --strategy fusion / fusion-verify (given alone, it "
                                       "selects fusion); default: the one shipped for the task.")
    trust_pickle: bool = opt(False, help="Also load a joblib (pickle) bundle from before format 2. Unpickling "
                                         "runs any code the file holds.")
    task: str = opt(DEFAULT_TASK, help="Default: causal-lm for a *ForCausalLM model (or a base decoder with an "
                                      "unlabelled corpus), else classification.")
    teacher: FinetuneConfig = opt(lambda: teacher_config(max_train_samples=3000),
                                  help="The teacher's fine-tuning (only when the model has no head for the labels).")
    teacher_margin: float = opt(0.02, help="Exit 2 when the teacher's validation accuracy is within this of the "
                                          "majority-class share (0: no check).")
    max_accuracy_drop: float | None = opt(help="Classifier budget: keep removing layers while validation accuracy "
                                              "after recovery stays within this of the teacher's (0.01 = one "
                                              "point).")
    max_perplexity_increase: float | None = opt(help="Causal-LM budget: keep removing layers while validation "
                                                    "perplexity stays below (1 + this) x the teacher's (before "
                                                    "healing).")
    budget_after_finish: bool = opt(True, help="With a budget: a step outside it after recovery is judged again on "
                                              "a copy finished as the run ends (classifiers: distilled with the "
                                              "run's settings) and kept if that copy is within it; one extra "
                                              "distillation per such step (a kept copy is reused at the end). "
                                              "Causal LMs: judged before healing.")
    dtype: str = opt("auto", help="Weights as loaded, computed and saved: auto (bfloat16 for a causal LM on a GPU "
                                  "that has it, else float32), float32, bfloat16 or float16. Signals, losses and "
                                  "perplexity accumulate in float32.")
    max_memory: str | None = opt(help="Causal LM: stream the layers from disk, holding at most this much of the "
                                      "weights at once (2GiB, 800MB), for a model larger than memory. It chooses "
                                      "and removes layers only: needs --heal none and a strategy with no signals "
                                      "pass (oracle, sleb, angular-block, positional rules).")
    finish: FinishConfig | None = None

    def __post_init__(self) -> None:
        from fusion_prune.models import DTYPES

        if self.dtype not in DTYPES:
            raise bad_choice("dtype", self.dtype, DTYPES)
        if self.task not in TASKS:
            raise bad_choice("task", self.task, TASKS)
        task = TASKS[self.task]
        if self.strategy is None and self.fusion_path is not None:  # a bundle named and no strategy: use it
            self.strategy = "fusion"
        if self.strategy is None:
            self.strategy = task.default_strategy
        task().resolve_step(self)
        if self.finish is None:
            self.finish = task.finish_config()
        elif not isinstance(self.finish, task.finish_config):
            raise BadInputError(f"The 'finish' parameter must be a {task.finish_config.__name__} for task "
                                f"{self.task!r}. Got {type(self.finish).__name__}.")
        task().check_finish(self, self.finish)
        if self.strategy not in STRATEGIES:
            raise bad_choice("strategy", self.strategy, STRATEGIES)
        if self.fusion_path is not None and STRATEGIES[self.strategy].needs_bundle \
                and not Path(self.fusion_path).is_file():
            raise BadInputError(f"The fusion bundle {str(self.fusion_path)!r} does not exist; expected a file written "
                                "by fit-fusion.")
        validate(self)  # ranges in fusion_prune/params.py
        own = task.budget_field
        for other in (t.budget_field for t in TASKS.values() if t.budget_field != own):
            if getattr(self, other) is not None:
                raise BadInputError(f"The '{other}' parameter is not a budget for task {self.task!r}; expected "
                                    f"'{own}'. Got {getattr(self, other)}.")
        if self.target_layers is None and getattr(self, own) is None:
            raise BadInputError(f"The 'target_layers' parameter is needed when no budget is given; expected "
                                f"target_layers and/or {own}. Got neither.")
        if self.max_memory is not None:
            check_streamable(self)

    @property
    def budget(self) -> float | None:
        """The value of this run's budget (the task's budget field), or None."""
        return getattr(self, TASKS[self.task].budget_field)

    @classmethod
    def from_options(cls, task: str = DEFAULT_TASK, other_tasks_options: str = "error", **options: Any
                     ) -> CompressConfig:
        """A config from flat options: the fields above, the step's, and the task's finish options
        (``other_tasks_options="ignore"``: leave out options that only another task's finish has, as
        the CLI, which offers every task's flags, asks)
        (``distill=...``, ``heal=...``, ``heal_steps=...``: :attr:`FinishConfig.flat`), and the teacher's
        (:data:`~fusion_prune.config.TEACHER_OPTIONS`: ``teacher_epochs=...``).

        The CLI and ``fusion_prune.compress()`` both build their config here, so the same options
        give the same run. ``batch_size`` and ``lr`` also set the finish's own batch size and
        learning rate (as :attr:`FinishConfig.shared` says) unless ``finish`` or that nested config is
        given whole.
        """
        finish_cls = TASKS[task].finish_config if task in TASKS else None
        own = {f.name for f in fields(cls)}
        teacher = {k: options.pop(k) for k in list(options) if k in TEACHER_OPTIONS}
        if teacher and options.get("teacher") is None:
            options["teacher"] = with_paths(field_default(cls, "teacher"),
                                            {TEACHER_OPTIONS[k].partition(".")[2]: v for k, v in teacher.items()})
        finish_names = finish_cls.field_names() if finish_cls else set()
        if other_tasks_options == "ignore":  # the CLI offers every task's finish flags
            others = {n for t in TASKS.values() if t.finish_config is not finish_cls
                      for n in t.finish_config.field_names()} - finish_names - own
            options = {k: v for k, v in options.items() if k not in others}
        unknown = sorted(set(options) - own - finish_names)
        if unknown:
            raise BadInputError(f"Unknown options {unknown}; expected fields of CompressConfig or of the "
                                f"task's {finish_cls.__name__ if finish_cls else 'finish'}: "
                                f"{sorted((own | finish_names) - {'finish', 'task'})}.")
        run = {k: v for k, v in options.items() if k in own}
        flat = {k: v for k, v in options.items() if k not in own}
        if finish_cls is not None and run.get("finish") is None:
            for flag, (name, value) in finish_cls.flags.items():  # e.g. no_distill: distill=None
                if flat.pop(flag, False):
                    flat[name] = value
            nested = {k: flat.pop(k) for k in list(flat) if k in {f.name for f in fields(finish_cls)}}
            finish = finish_cls(**nested)
            # The run's batch size (and, where the finish says so, learning rate) reach the finish's trainer
            # unless that config was given whole.
            for name, keys in finish_cls.shared.items():
                if name not in nested and getattr(finish, name) is not None:
                    finish = finish.with_options(**{f"{name}.{k}": options.get(k) for k in keys})
            run["finish"] = finish.with_options(**flat)
        return cls(task=task, **run)


# --------------------------------------------------------------------------- the loop


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


@dataclass
class Measured:
    """Everything measured in one state: what a strategy looks at, and the time each part took."""

    state: StrategyState
    signals: Any  # pd.DataFrame | None
    drop_one: Any  # DropOne | None
    seconds: dict = field(default_factory=dict)  # {"signals", "drop_one"}


def measure_state(task: Task, student, tok, step: StepConfig, k: int, strategy, signal_names: list[str],
                  target: int, bundle=None, full_layers: int | None = None, want_drop_one: bool = False,
                  want_signals: bool = True) -> Measured:
    """Signals (when the strategy asks, or ``want_signals`` and ``step.signal_samples``) and the
    drop-one table (when the strategy or ``want_drop_one`` asks) of the current state, and the
    StrategyState built from them."""
    t0 = time.perf_counter()
    batches = task.calibration_batches(student, tok, step, k)
    signals = None
    if strategy.needs_signals or (want_signals and step.signal_samples):
        with task.phase("signals"):
            signals = task.signals(student, batches, signal_names, progress=step.progress)
    t_signals = time.perf_counter() - t0
    dropone, t_drop = None, 0.0
    if strategy.needs_drop_one or want_drop_one:
        t1 = time.perf_counter()
        with task.phase("drop_one"):
            dropone = task.drop_one(student, tok, step)
        t_drop = time.perf_counter() - t1
    state = StrategyState(student, batches, num_layers(student), target, kept_layers(student.config),
                          signals, dropone.table if dropone is not None else None, bundle,
                          np.random.default_rng(step.seed + k), full_layers, task,
                          measure=lambda only: task.drop_one(student, tok, step, only=only).table,
                          verify_k=step.verify_k)
    return Measured(state, signals, dropone, {"signals": t_signals, "drop_one": t_drop})


def apply_drop(task: Task, student, tok, drop: list[int], step: StepConfig, k: int,
               finish: FinishConfig | None = None) -> list[int]:
    """Remove ``drop`` (current indices) in place, then the short recovery; returns their original indices.

    Recovery steps are per removed layer: a one-shot strategy (angular-block) gets the same budget
    in total as one that removes the same layers one at a time.
    """
    orig = [kept_layers(student.config)[i] for i in drop]
    drop_layers_(student, drop)
    if step.finetune_steps:
        task.recover(student, tok, step.finetune_steps * len(drop), step, seed=step.seed + k + 1, finish=finish)
    return orig


def candidate_table(task: Task, m: Measured, n: int) -> dict:
    """Per current layer: its original index, what the strategy noted (its deciding scores) and,
    when the step measured every layer, the measured drop-one value (report.md's candidate table)."""
    table = {"layer": list(range(n)), "orig_layer": list(m.state.orig_layers)}
    col = task.drop_one_order[0][0]
    if m.drop_one is not None and not any(k.startswith("measured") for k in m.state.evidence):
        t = m.drop_one.table.set_index("layer")[col]
        table[f"{REFERENCE} ({col})"] = [float(t.get(i, np.nan)) for i in range(n)]
    return table | m.state.evidence


#: ``choose(measured) -> current indices to drop``
Chooser = Callable[[Measured], list[int]]
#: ``on_state(k, measured, drop) -> tables to checkpoint beside the model`` (collect's rows), or None
StateHook = Callable[[int, Measured, list[int]], "dict | None"]
#: ``accept(record, student) -> bool``: False undoes the step and ends the loop (a budget)
Acceptor = Callable[[StepRecord, object], bool]


def prune_loop(task: Task, student, tok, step: StepConfig, choose: Chooser, run: RunFolder, history: list[StepRecord],
               info: dict, *, floor: int, signal_names: list[str], needs, bundle=None, want_drop_one: bool = False,
               target: Callable[[int], int] | None = None, record_metric: bool = True, finish=None,
               on_state: StateHook | None = None, accept: Acceptor | None = None):
    """Remove layers from ``student`` until ``floor`` layers remain (or ``accept`` refuses a step).

    Each step: measure the state (signals, drop-one), ``choose`` the layers, drop them and recover,
    record the validation metric (``record_metric``), and checkpoint the student with
    ``history`` and ``info`` (and ``on_state``'s tables) in ``run``. ``needs``: the strategy (its
    ``needs_signals``/``needs_drop_one`` flags). Returns the student (the one before a refused step).
    """
    tables: dict | None = None
    while num_layers(student) > floor and "budget_stop" not in info:
        k = len(history)
        t0 = time.perf_counter()
        n = num_layers(student)
        m = measure_state(task, student, tok, step, k, needs, signal_names,
                          target(n) if target else floor, bundle, info.get("teacher_layers"), want_drop_one)
        t1 = time.perf_counter()
        drop = sorted(choose(m))
        selection = time.perf_counter() - t1 + (m.seconds["signals"] if needs.needs_signals else 0) + (
            m.seconds["drop_one"] if needs.needs_drop_one else 0)
        if on_state is not None:
            tables = on_state(k, m, drop)
        predicted = measured = None
        if bundle is not None and len(drop) == 1:
            predicted = float(bundle.predict(m.signals.sort_values("layer"))[drop[0]])
        if m.drop_one is not None and len(drop) == 1:
            measured = task.measured_value(m.drop_one.table, drop[0])
        with task.phase("recovery"):
            orig = apply_drop(task, student, tok, drop, step, k, finish)
        with task.phase("evaluation"):
            metric = task.step_metric(student, tok, step) if record_metric else None
        entry = StepRecord(
            k, n, drop, orig, kept_layers(student.config), predicted, measured, metric, step.finetune_steps * len(drop),
            round(selection, 3), count_parameters(student), None,  # speed: timed at the end (time_depths)
            round(time.perf_counter() - t0, 2), m.signals.to_dict("list") if m.signals is not None else None,
            m.drop_one.table.to_dict("list") if m.drop_one is not None else None,
            candidate_table(task, m, n), task.step_measured_key, task.step_metric_key)
        if accept is not None and not accept(entry, student):
            # Undo the step: the checkpoint still holds the model before it.
            student, _, _ = task.load_model(str(run.current))
            run.save(run.current.name, student, tok, _record(history, info), tables)
            break
        history.append(entry)
        run.save(run.current.name, student, tok, _record(history, info), tables)
        log.info("step %d: %d -> %d layers, dropped %s (original)%s, %.0f s", k, n, num_layers(student), orig,
                 "" if metric is None else f", validation {task.metric} {metric:.4f}", entry.seconds)
    return student


def time_depths(task: Task, teacher, tok, step: StepConfig, history: list[StepRecord], info: dict,
                repeats: int = 5) -> None:
    """Time the teacher and every depth of ``history`` back to back at the end of a run (views of the
    teacher, alternating rounds, the fastest of ``repeats``; :func:`fusion_prune.speed.depth_speeds`)
    on the first calibration batch, and write the speeds into ``history`` and ``info``."""
    from fusion_prune.speed import depth_speeds, prefill_kwargs

    batch = task.calibration_batches(teacher, tok, step, 0)[0]
    kept = [list(range(num_layers(teacher)))] + [list(e.kept_layers) for e in history]
    rows = depth_speeds(teacher, kept, batch, task.throughput_unit == "tokens/s", repeats=repeats)
    info["teacher_throughput"] = rows[0]["throughput"]
    for e, r in zip(history, rows[1:]):
        e.throughput = r["throughput"]
    ids = batch["input_ids"]
    prefill = " (prefill: the head on the last position only)" if prefill_kwargs(teacher) else ""
    info["speed"] = {"method": f"one forward of a batch of {ids.shape[0]} x {ids.shape[1]} tokens per depth{prefill}, "
                               f"timed at the end in {repeats} alternating rounds after one warm-up, fastest round "
                               "kept; ideal speed-up from FLOPs",
                     "device": str(next(teacher.parameters()).device), "threads": torch.get_num_threads(),
                     "rows": [r | {"gflops": round(r["gflops"], 3)} for r in rows]}


def _record(history: list[StepRecord], info: dict) -> dict:
    return {"history": [e.to_dict() for e in history], "info": info}


# --------------------------------------------------------------------------- compress


#: the checkpoint of a copy finished to judge the budget (reused when the run ends at its depth)
FINISHED = "finished"


def _prefinished(task: Task, run: RunFolder, student) -> tuple[object, dict] | None:
    """The finished copy a budget check kept, with its finish's record, when ``student`` is the model it
    was finished from (same kept layers); else None."""
    folder = run.path / FINISHED
    if not folder.is_dir():
        return None
    rec = load_checkpoint_record(folder)
    if rec.get("kept_layers") != kept_layers(student.config):
        return None
    log.info("the finished copy of the %d-layer model from the budget check is the result (no second finish)",
             num_layers(student))
    return task.load_model(str(folder))[0], rec["finish_stats"]


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _check_target(cfg: CompressConfig, depth: int) -> None:
    if cfg.target_layers is not None and cfg.target_layers >= depth:
        raise BadInputError(f"The 'target_layers' parameter must be below the model's depth {depth}. "
                            f"Got {cfg.target_layers}.")


def step_target(task: Task, cfg: CompressConfig, n_layers: int) -> int:
    """The depth a strategy aims at from ``n_layers``: the target, or one layer less under a budget
    (so that a one-shot strategy cannot overshoot the budget by a whole block)."""
    floor = cfg.target_layers or 1
    return max(floor, n_layers - 1) if cfg.budget is not None else floor


def compress_with_config(model_spec: str, data, cfg: CompressConfig, output: str | Path, resume: bool = False,
                         overwrite: bool = False, task: Task | None = None) -> CompressReport:
    """Compress ``model_spec`` to ``cfg.target_layers`` layers; returns the report (also saved).

    ``data`` is what ``task.load_data`` returned (a TextDataset or a TextCorpus); ``task``
    defaults to ``cfg.task`` with ``data`` attached. The output is locked for the whole run.
    """
    check_output(output, overwrite)
    with output_lock(output):
        return _compress(model_spec, data, cfg, Path(output), resume, overwrite, task)


def run_compress(model_spec: str, dataset, output: str | Path, *, task: str | None = None, text_column: str = "text",
                 label_column: str = "label", resume: bool = False, overwrite: bool = False,
                 other_tasks_options: str = "error", **options: Any) -> tuple[CompressReport, Task]:
    """``fusionprune compress`` and ``fusion_prune.compress()``: find the task, load the data, build the
    config from flat ``options`` (:meth:`CompressConfig.from_options`) and compress.
    Returns (report, the task it ran)."""
    from fusion_prune.tasks import task_for

    check_output(output, overwrite)  # before anything loads
    t, data = task_for(str(model_spec), dataset, task, text_column, label_column)
    cfg = CompressConfig.from_options(task=t.name, other_tasks_options=other_tasks_options, **options)
    if cfg.max_memory is not None:  # the layers streamed from disk: a choice without training
        if resume:
            raise BadInputError("The 'resume' parameter is not supported with max_memory: a streamed run keeps no "
                                "checkpoints (it holds no trained state); expected a fresh run. Got resume=True.")

        return compress_streamed(str(model_spec), data, cfg, Path(output), overwrite=overwrite), t
    return compress_with_config(str(model_spec), data, cfg, output, resume=resume, overwrite=overwrite, task=t), t


def config_defaults(cfg) -> dict:
    """The default of every field of the dataclass ``cfg``, nested configs by their own defaults."""
    from dataclasses import MISSING, is_dataclass

    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = config_defaults(value)
        elif f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def run_meta(model_spec: str, data, cfg) -> dict:
    """What a stopped run must share with its resumption: model, data content and the config."""
    meta = json.loads(json.dumps({"model": str(model_spec), "dataset": data.spec, "data_sha256": data.content_hash(),
                                  "config": asdict(cfg)}, default=str))

    def drop_progress(d):
        if isinstance(d, dict):
            d.pop("progress", None)
            for v in d.values():
                drop_progress(v)
    drop_progress(meta["config"])
    return meta


def _compress(model_spec: str, data, cfg: CompressConfig, output: Path, resume: bool, overwrite: bool,
              task: Task | None) -> CompressReport:
    from fusion_prune.fusion import load_bundle
    from signals import DEFAULT_SIGNALS

    if task is None:
        task = get_task(cfg.task)
    if task.data is None:
        task.data = data
    strategy = STRATEGIES[cfg.strategy]
    bundle = (load_bundle(cfg.fusion_path or task.default_bundle, trust_pickle=cfg.trust_pickle)
              if strategy.needs_bundle else None)
    signal_names = list(dict.fromkeys([*DEFAULT_SIGNALS, *strategy.extra_signals, *_bundle_extras(bundle)]))
    meta = run_meta(model_spec, data, cfg)
    t_start = time.perf_counter()
    run = RunFolder(_partial(output), meta, resume=resume, overwrite=overwrite,
                    defaults={"config": config_defaults(cfg)})
    saved = run.start()
    task.dtype = cfg.dtype
    if task.mmap_threshold:
        fix_mmap_threshold(task.mmap_threshold)
    peaks = task.memory = PhasePeaks(saved["info"].get("peak_memory") if saved is not None else None)
    if saved is not None:
        with task.phase("load"):
            student, tok, _ = task.load_model(str(run.current))
        teacher = None  # read again from its checkpoint when the finish needs it
        info = saved["info"]
        info["peak_memory"] = peaks.record
        history = [StepRecord.from_dict(h, task.step_measured_key, task.step_metric_key) for h in saved["history"]]
        if num_layers(student) != info["teacher_layers"] - sum(len(h.dropped) for h in history):
            raise BadInputError(f"The stopped run at {str(run.path)!r} has a model of {num_layers(student)} layers "
                                "that does not match its record; expected a consistent checkpoint (or --overwrite).")
        t_start -= info.get("wall_seconds_before", 0.0)
        done = f" (steps 0-{len(history) - 1} finished: {info['teacher_layers']} -> " if history else " ("
        log.info("resuming at step %d%s%d layers)", len(history), done, num_layers(student))
        with task.phase("teacher"):  # the choice's own state (a guard, --calibration's text), rebuilt
            task.prepare_choice(lambda: task.load_model(str(run.path / "teacher"))[0], tok, cfg)
        log.info("data %s", data.summary())
    else:
        with task.phase("load"):
            teacher, tok, ready = task.load_model(model_spec)
        depth = num_layers(teacher)
        _check_target(cfg, depth)
        log.info("data %s", data.summary())  # after the checks: bad input stays one line
        with task.phase("teacher"):
            info = task.prepare_teacher(teacher, tok, cfg, cfg.teacher, cfg.teacher_margin, ready, str(model_spec))
        info["task"] = task.name
        info["peak_memory"] = peaks.record
        info["teacher_layers"] = depth
        student = copy.deepcopy(teacher)
        history = []
        info["teacher_parameters"] = count_parameters(teacher)
        info["throughput_unit"] = task.throughput_unit
        run.save("teacher", teacher, tok, _record([], info))
        run.save("current", student, tok, _record([], info))

    info["strategy_rule"] = " ".join(strategy.doc.split())  # report.md's "why" (also for a resumed older record)
    if cfg.budget is not None:  # the worst validation metric allowed: what each step is checked against
        info["budget_limit"] = task.budget_limit(info, cfg.budget)

    def judged_after_finish(e: StepRecord, student) -> float | None:
        """The validation metric of a finished copy of ``student`` (None: the task judges before its
        finish, or there is no finish); a copy within the budget is kept on disk as ``finished`` for the end of the run."""
        if not (cfg.budget_after_finish and task.judges_budget_after_finish) \
                or task.nothing_to_finish(cfg.finish) == cfg.finish:  # no finish (--no-distill): nothing to judge
            return None
        log.info("step %d: validation %s %.4f after recovery is outside the budget (%s %s of the teacher's %.4f): "
                 "finishing a copy as the run ends, to judge the model the run would give", e.step, task.metric,
                 e.metric, task.budget_field, cfg.budget, info[task.teacher_metric_key])
        with task.phase("budget check"):
            teacher, _, _ = task.load_model(str(run.path / "teacher"))
            t0 = time.perf_counter()
            model, stats, metric = task.finish_for_budget(teacher, student, tok, cfg, cfg.finish, info)
            del teacher
        ok = task.within_budget(metric, info, cfg.budget)
        info.setdefault("budget_checks", []).append(
            {"step": e.step, "layers": num_layers(student), "after_recovery": e.metric, "after_finish": metric,
             "kept": ok, "seconds": round(time.perf_counter() - t0, 1)})
        log.info("step %d: the finished copy reaches validation %s %.4f: %s", e.step, task.metric, metric,
                 "within the budget, the step is kept" if ok else "still outside the budget")
        if ok:
            run.save(FINISHED, model, tok, {"kept_layers": kept_layers(model.config), "finish_stats": stats})
        return metric

    def accept(e: StepRecord, student) -> bool:
        info["wall_seconds_before"] = round(time.perf_counter() - t_start, 1)
        if cfg.budget is None or task.within_budget(e.metric, info, cfg.budget):
            return True
        finished = judged_after_finish(e, student)
        if finished is not None and task.within_budget(finished, info, cfg.budget):
            return True
        info["budget_stop"] = {"step": e.step, "layers_before": e.layers_before, "dropped_orig": e.dropped_orig,
                               task.step_metric_key: e.metric, "after_finish": finished}
        log.info("step %d: removing %s (original) gives validation %s %.4f%s, outside %s %s of the teacher's %.4f: "
                 "undone, stopping at %d layers", e.step, e.dropped_orig, task.metric, e.metric,
                 "" if finished is None else f" ({finished:.4f} finished)", task.budget_field,
                 cfg.budget, info[task.teacher_metric_key], e.layers_before)
        return False

    # The loop never reads the teacher: it waits on disk (its checkpoint) instead of beside the student
    # (the next phase hands the freed memory back).
    del teacher
    student = prune_loop(task, student, tok, cfg, lambda m: strategy.fn(m.state), run, history, info,
                         floor=cfg.target_layers or 1, signal_names=signal_names, needs=strategy, bundle=bundle,
                         want_drop_one=bool(cfg.drop_one_samples), target=lambda n: step_target(task, cfg, n),
                         finish=cfg.finish, accept=accept)
    finish = cfg.finish
    if num_layers(student) == info["teacher_layers"]:
        # A budget that allowed no removal: the student is the teacher, and distilling or healing a
        # copy of the teacher into itself can only move it away from the teacher.
        log.info("no layer could be removed within the budget: the teacher is returned as it is (no distillation)")
        finish = task.nothing_to_finish(finish)
    with task.phase("load"):
        teacher, _, _ = task.load_model(str(run.path / "teacher"))
    with task.phase("speed"):
        time_depths(task, teacher, tok, cfg, history, info)
    student, results = task.finish(teacher, student, tok, cfg, finish, info,
                                   prefinished=_prefinished(task, run, student))
    task.memory = None
    info.pop("wall_seconds_before", None)
    n_params = count_parameters(student)
    report = CompressReport(
        model=str(model_spec), dataset=data.spec, strategy=cfg.strategy, task=task.name, metric=task.metric,
        teacher_metric_key=task.teacher_metric_key, results=results, teacher_layers=info["teacher_layers"],
        student_layers=num_layers(student), kept_layers=kept_layers(student.config), history=history, info=info,
        budget=({"parameter": task.budget_field, "value": cfg.budget, "stopped": info.get("budget_stop")}
                if cfg.budget is not None else None),
        student_parameters=n_params,
        accuracy_to_size=(results["student_accuracy"] / results["teacher_accuracy"]
                          / (n_params / info["teacher_parameters"])
                          if results.get("teacher_accuracy") and info.get("teacher_parameters") else None),
        config=meta["config"],
        fusion_bundle=(bundle.describe() | {"path": str(cfg.fusion_path or "default")}) if bundle else None,
        selection_seconds=round(sum(h.selection_seconds for h in history), 3),
        wall_seconds=round(time.perf_counter() - t_start, 1), versions=versions())
    from fusion_prune.report import write_compress_report

    from fusion_prune.models import save_model

    with atomic_dir(output, overwrite=overwrite, lock=False) as tmp:
        save_model(student, tok, tmp)
        write_compress_report(report, tmp, task)
    run.done()
    return report


# --------------------------------------------------------------------------- the loop with streamed layers


def check_streamable(cfg) -> None:
    """Refuse, in one line, options a streamed run cannot honour (its config ``cfg``: CompressConfig),
    and a ``max_memory`` that is not a size."""
    from fusion_prune.streaming import parse_size

    if not TASKS[cfg.task].streams_layers:
        streaming = sorted(name for name, t in TASKS.items() if t.streams_layers)
        raise BadInputError(f"The 'max_memory' parameter streams layers for task(s) {streaming}; expected one of "
                            f"them. Got task {cfg.task!r}.")
    s = STRATEGIES[cfg.strategy]
    if s.needs_signals or s.needs_bundle:
        raise BadInputError(f"The 'strategy' parameter must need no signals pass when layers are streamed "
                            f"(max_memory): gradients need each layer's weights in its backward. Expected one of "
                            f"oracle, sleb, angular-block, deepest, top, alternate, symmetric, random. "
                            f"Got {cfg.strategy!r}.")
    if cfg.guard:
        raise BadInputError(f"The 'guard' parameter is not supported when layers are streamed (max_memory) yet; "
                            f"expected no guard. Got {cfg.guard!r}.")
    if cfg.calibration == TEACHER_TEXT:
        raise BadInputError(f"The 'calibration' parameter cannot be {TEACHER_TEXT!r} when layers are streamed "
                            f"(max_memory): sampling reads every layer once per token; expected a corpus name or "
                            f"none. Got {cfg.calibration!r}.")
    if cfg.finetune_steps:
        raise BadInputError(f"The 'finetune_steps' parameter must be 0 when layers are streamed (max_memory): "
                            f"recovery trains the whole model. Got {cfg.finetune_steps}.")
    heal_cfg = getattr(cfg.finish, "heal", None)
    heal = "none" if heal_cfg is None or heal_cfg.steps == 0 else heal_cfg.method
    if heal != "none" or getattr(cfg.finish, "lm_distill_steps", 0):
        raise BadInputError(f"The 'heal' parameter must be 'none' when layers are streamed (max_memory): healing "
                            f"trains the whole model (heal the output where it fits, or across GPUs with accelerate "
                            f"launch). Got {heal!r}.")
    if cfg.budget is not None:
        raise BadInputError("The 'max_perplexity_increase' parameter is not supported with max_memory yet; "
                            f"expected target_layers alone. Got {cfg.budget}.")
    parse_size(cfg.max_memory)


def compress_streamed(model_spec: str, data, cfg: CompressConfig, output: Path, overwrite: bool = False) -> dict:
    """Greedy removal down to ``cfg.target_layers`` with the layers streamed (``cfg.max_memory``),
    then the pruned model written to ``output`` with ``report.json``; returns the report.

    Each step measures what the strategy needs on the same batches as an in-memory ``compress``
    (calibration windows seeded by ``seed + step``; drop-one on the validation windows), so the
    choices and measured values are the same to float tolerance; ``report.json`` holds them with the
    peak memory of each phase and the streaming's cost (layer reads).
    """
    from fusion_prune.card import architecture_of, invocation, write_model_card
    from fusion_prune.streaming import parse_size, save_streamed, streamed_causal_lm

    check_output(output, overwrite)  # cfg was checked when it was built (check_streamable)
    task = get_task(cfg.task)
    task.dtype = cfg.dtype
    if task.mmap_threshold:
        fix_mmap_threshold(task.mmap_threshold)
    peaks = task.memory = PhasePeaks()
    strategy = STRATEGIES[cfg.strategy]
    t_start = time.perf_counter()
    task.data = data
    with contextlib.ExitStack() as stack:
        with task.phase("load"):
            model, tok, streamer = stack.enter_context(streamed_causal_lm(model_spec, cfg.dtype, cfg.max_memory))
        depth = num_layers(model)
        _check_target(cfg, depth)
        with task.phase("teacher"):
            info = task.prepare_teacher(model, tok, cfg, None, 0.0, True, str(model_spec))
        steps = []
        while num_layers(model) > cfg.target_layers:
            k, n, t0 = len(steps), num_layers(model), time.perf_counter()
            m = measure_state(task, model, tok, cfg, k, strategy, [], cfg.target_layers, None, depth,
                              want_drop_one=strategy.needs_drop_one,
                              want_signals=False)  # no signals pass: its gradients cannot be streamed
            with task.phase("choice"):
                drop = sorted(strategy.fn(m.state))[: n - cfg.target_layers]  # a one-shot rule stops at the target
            orig = [kept_layers(model.config)[i] for i in drop]
            measured = task.measured_value(m.drop_one.table, drop[0]) if m.drop_one is not None and len(drop) == 1 \
                else None
            drop_layers_(model, drop)
            with task.phase("evaluation"):
                metric = task.step_metric(model, tok, cfg)
            steps.append({"step": k, "layers_before": n, "dropped": drop, "dropped_orig": orig,
                          task.step_measured_key: measured, task.step_metric_key: metric,
                          "drop_one": m.drop_one.table.to_dict("list") if m.drop_one is not None else None,
                          "candidates": candidate_table(task, m, n), "seconds": round(time.perf_counter() - t0, 2)})
            log.info("step %d: %d -> %d layers, removed %s (original), validation %s %.4f (layers streamed)", k, n,
                     num_layers(model), orig, task.metric, metric)
        report = {"model": str(model_spec), "dataset": str(getattr(task.data, "spec", data)),
                  "strategy": cfg.strategy, "task": cfg.task, "dtype": str(streamer.dtype).replace("torch.", ""),
                  "teacher_layers": depth, "target_layers": cfg.target_layers,
                  "kept_layers": kept_layers(model.config),
                  "removed_layers": sorted(set(range(depth)) - set(kept_layers(model.config))),
                  "parameters": count_parameters(model), "steps": steps, "info": info,
                  "streaming": {"max_memory_bytes": parse_size(cfg.max_memory) if cfg.max_memory else None,
                                "weights_held_at_most_bytes": streamer.resident_bytes,
                                "resident_layers": sorted(streamer.resident), "layer_reads": streamer.reads,
                                "bytes_read": streamer.files.bytes_read},
                  "versions": versions()}
        with atomic_dir(output, overwrite) as tmp:
            with task.phase("save"):
                save_streamed(model, streamer, tok, tmp)
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            report["peak_memory"] = peaks.record
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
            markdown = _streamed_markdown(report, task, output)
            (tmp / "report.md").write_text(markdown)
            write_model_card(tmp, source=str(model_spec), architecture=architecture_of(tmp), teacher_layers=depth,
                             removed=[i for s in steps for i in s["dropped_orig"]], kept=report["kept_layers"],
                             parameters=report["parameters"], versions=report["versions"], command=invocation(),
                             method=[f"- Layers chosen by the `{cfg.strategy}` strategy in {len(steps)} removal "
                                     f"step(s), measured on `{report['dataset']}`, the layers streamed from disk "
                                     f"(`--max-memory {cfg.max_memory}`); no healing.",
                                     "- Every step: `report.md`; every setting: `report.json`."],
                             results=markdown.splitlines()[2:])
    return report


def _streamed_markdown(report: dict, task: Task, output: Path) -> str:
    """report.md of a streamed run: the summary, one row per step, the peak memory per phase."""
    from fusion_prune.memory import memory_lines
    from fusion_prune.streaming import summary_lines

    lines = [f"# {Path(report['model']).name}: {report['teacher_layers']} -> {len(report['kept_layers'])} layers, "
             "streamed", "", *(f"- {line}" for line in summary_lines(report, output)), "",
             f"| step | layers | removed (original) | measured {task.step_measured_key} | validation {task.metric} |",
             "|---|---|---|---|---|"]
    for s in report["steps"]:
        measured = s.get(task.step_measured_key)
        lines.append(f"| {s['step']} | {s['layers_before']} | {s['dropped_orig']} | "
                     f"{'' if measured is None else f'{measured:.5f}'} | {s[task.step_metric_key]:.4f} |")
    return "\n".join([*lines, "", "## Peak memory", "", *memory_lines(report["peak_memory"])]) + "\n"


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
