"""The task seam: what differs between compressing a sequence classifier and a causal LM.

A :class:`Task` owns its data, model loading, collation of calibration batches, the drop-one
label, the short recovery between removals, the validation metric of each step, the final
healing / distillation and evaluation, and the report's metric names. The greedy loop
(:mod:`fusion_prune.greedy`), the signals engine, surgery and the strategies are shared.

Adding a task is one subclass plus one entry in :data:`TASKS`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import pandas as pd

from fusion_prune.errors import BadInputError, bad_choice

if TYPE_CHECKING:
    from fusion_prune.greedy import CompressConfig
    from fusion_prune.labels import DropLabels

Log = Callable[[str], None]


class Task:
    """One kind of model and metric. Subclasses fill in every method."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the headline metric of reports
    #: drop-one table columns and orders that rank candidates, best to remove first; the first
    #: column is the measured label recorded for each step's choice
    label_sort: ClassVar[tuple[list[str], list[bool]]]
    #: history keys of one step: the validation metric after the step, the measured label of the choice
    step_metric_key: ClassVar[str]
    step_label_key: ClassVar[str]
    #: strategy of ``compress`` when none is given
    default_strategy: ClassVar[str]

    def __init__(self) -> None:
        self.data = None

    # data and models
    def load_data(self, spec: str, text_column: str = "text", label_column: str = "label"):
        raise NotImplementedError

    def load_model(self, spec: str):
        """``(model, tokenizer, ready)``: ready is False when the model needs training first."""
        raise NotImplementedError

    def prepare_teacher(self, model, tok, cfg: CompressConfig, ready: bool, model_spec: str, log: Log) -> dict:
        """Make ``model`` a teacher (in place) and return facts for the report's ``info``."""
        raise NotImplementedError

    # one pruning step
    def calibration_batches(self, model, tok, cfg: CompressConfig, step: int) -> list[dict]:
        raise NotImplementedError

    def signals(self, model, tok, batches: list[dict], names: list[str], cfg: CompressConfig) -> pd.DataFrame:
        raise NotImplementedError

    def drop_one(self, model, tok, cfg: CompressConfig, only: list[int] | None = None) -> DropLabels:
        """Measured drop-one labels on validation data, for every layer or just ``only``."""
        raise NotImplementedError

    def score_batches(self, model, batches: list[dict]) -> DropLabels:
        """Drop-one labels on given (calibration) batches: what SLEB ranks by."""
        raise NotImplementedError

    def recover(self, model, tok, steps: int, cfg: CompressConfig, seed: int) -> None:
        raise NotImplementedError

    def step_metric(self, model, tok, cfg: CompressConfig) -> float:
        raise NotImplementedError

    #: CompressConfig field of this task's budget, and the teacher's validation metric in ``info``
    budget_field: ClassVar[str]
    teacher_metric_key: ClassVar[str]
    higher_is_better: ClassVar[bool]  # of the step metric
    throughput_unit: ClassVar[str] = "examples/s"

    def budget_limit(self, info: dict, cfg: CompressConfig) -> float:
        """The worst validation metric the budget allows, from the teacher's (same examples)."""
        raise NotImplementedError

    def within_budget(self, metric: float, info: dict, cfg: CompressConfig) -> bool:
        """Whether a step's validation metric stays within the budget (which must be set)."""
        limit = self.budget_limit(info, cfg)
        return metric >= limit - 1e-9 if self.higher_is_better else metric <= limit + 1e-9

    # the end
    def finish(self, teacher, student, tok, cfg: CompressConfig, info: dict, log: Log) -> tuple[object, dict]:
        """Heal / distil ``student`` and evaluate both; returns (final student, report fields)."""
        raise NotImplementedError

    def best_candidate(self, table: pd.DataFrame) -> int:
        """The current index of the best layer to remove by the measured drop-one table."""
        cols, asc = self.label_sort
        return int(table.sort_values(cols, ascending=asc).iloc[0]["layer"])


# --------------------------------------------------------------------------- classification


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    label_sort = (["acc_after_drop", "loss_after_drop"], [False, True])
    step_metric_key = "validation_accuracy_after_finetune"
    step_label_key = "measured_acc_after_drop"
    # The strategy that measured best in the loop (benchmarks/README.md, profile cpu-2: the same teachers
    # for every rule, six datasets, seeds 0-2, paired): measured drop-one accuracy is first after
    # distillation, fusion-verify kept the same layers at 2.8x its selection time, and compress records
    # every layer's drop-one label each step anyway (label_samples), so on a classifier measuring costs
    # nothing extra. With strong teachers and full data (profile gpu-2) the positional rules symmetric
    # and deepest lead it by 0.003; over both budgets it ties them and leads the shipped fusion, and
    # unlike them it reads the model it is given. `--strategy fusion` keeps the learned choice.
    default_strategy = "oracle"
    budget_field = "max_accuracy_drop"
    teacher_metric_key = "teacher_validation_accuracy"
    higher_is_better = True

    def budget_limit(self, info, cfg):
        # Absolute; teacher and steps are scored on the same validation examples (_eval_sets).
        return info[self.teacher_metric_key] - cfg.max_accuracy_drop

    def load_data(self, spec, text_column="text", label_column="label"):
        from fusion_prune.data import load_dataset

        self.data = load_dataset(spec, text_column, label_column)
        return self.data

    def load_model(self, spec):
        from fusion_prune.models import load_classifier

        return load_classifier(spec, self.data.labels)

    def _eval_sets(self, cfg):
        from fusion_prune.data import subsample

        # The per-step validation accuracy is a record, not an input to any choice: it may use fewer examples.
        val = subsample(self.data.validation, cfg.step_eval_samples or cfg.max_eval_samples, cfg.seed)
        test = subsample(self.data.test, cfg.max_eval_samples, cfg.seed)
        return val, test

    def _evaluate(self, model, tok, df, cfg) -> dict:
        from fusion_prune.finetune import evaluate

        return evaluate(model, tok, df, self.data.labels, batch_size=cfg.batch_size * 2, max_length=cfg.max_length,
                        progress=False)

    def prepare_teacher(self, model, tok, cfg, ready, model_spec, log):
        from fusion_prune.finetune import FinetuneConfig, check_teacher, majority_share, train
        from fusion_prune.training import make_accelerator
        from fusion_prune.greedy import _teacher_data

        info: dict = {"teacher_finetuned": not ready}
        if not ready:
            log(f"{model_spec} has no head for these labels: fine-tuning the teacher first")
            tcfg = FinetuneConfig(**{**asdict(cfg.teacher), "max_length": cfg.max_length, "seed": cfg.seed,
                                     "progress": cfg.progress})
            info["teacher_train"] = train(model, tok, self.data.train, tcfg, make_accelerator(tcfg.mixed_precision),
                                          val_df=self.data.validation, data_labels=self.data.labels)
            info["teacher_data"] = {"max_train_samples": tcfg.max_train_samples, "seed": tcfg.seed}
        else:
            info["teacher_data"] = _teacher_data(model_spec, self.data)
        val = self._eval_sets(cfg)[0]
        info["teacher_validation_accuracy"] = self._evaluate(model, tok, val, cfg)["accuracy"]
        info["validation_majority_share"] = majority_share(val["label"].to_numpy())
        check_teacher(info["teacher_validation_accuracy"], info["validation_majority_share"], cfg.teacher_margin,
                      "The teacher (fine-tuned here)" if not ready else f"The teacher {model_spec!r}")
        return info

    def calibration_batches(self, model, tok, cfg, step):
        from fusion_prune.data import make_loader, subsample

        device = next(model.parameters()).device
        calib = subsample(self.data.train, cfg.signal_samples, cfg.seed + step)
        return [{k: v.to(device) for k, v in b.items()} for b in make_loader(calib, tok, cfg.batch_size, cfg.max_length)]

    def signals(self, model, tok, batches, names, cfg):
        from signals import signals_on_batches

        return signals_on_batches(model, batches, names, progress=False)

    def drop_one(self, model, tok, cfg, only=None):
        from fusion_prune.data import subsample
        from fusion_prune.labels import drop_one_labels

        return drop_one_labels(model, tok, subsample(self.data.validation, cfg.label_samples or None, cfg.seed),
                               self.data.labels, batch_size=cfg.batch_size * 2, max_length=cfg.max_length, only=only)

    def score_batches(self, model, batches):
        from fusion_prune.labels import classification_score, drop_one_on_batches

        return drop_one_on_batches(model, batches, classification_score)

    def recover(self, model, tok, steps, cfg, seed):
        from fusion_prune.finetune import FinetuneConfig, train
        from fusion_prune.training import make_accelerator

        fcfg = FinetuneConfig(max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, max_length=cfg.max_length,
                              seed=seed, warmup_ratio=0.0, progress=False)
        train(model, tok, self.data.train, fcfg, make_accelerator(fcfg.mixed_precision))

    def step_metric(self, model, tok, cfg):
        return self._evaluate(model, tok, self._eval_sets(cfg)[0], cfg)["accuracy"]

    def finish(self, teacher, student, tok, cfg, info, log):
        from distill import DistillConfig, distill
        from fusion_prune.greedy import _distill_rows

        data = self.data
        test = self._eval_sets(cfg)[1]
        teacher_acc = self._evaluate(teacher, tok, test, cfg)
        pruned_acc = self._evaluate(student, tok, test, cfg)
        distill_stats = control_acc = None
        student_acc = pruned_acc
        if cfg.distill is not None:
            dcfg = DistillConfig(**{**asdict(cfg.distill), "max_length": cfg.max_length, "seed": cfg.seed,
                                    "progress": cfg.progress})
            dtrain = data.train
            if cfg.distill_data == "unseen":
                dtrain, info["distill_rows"] = _distill_rows(data.train, info.get("teacher_data"),
                                                             dcfg.max_train_samples, cfg.seed)
                dcfg = replace(dcfg, max_train_samples=None)  # dtrain is already the sample
            if cfg.distill_control:
                control = copy.deepcopy(student)
                distill(teacher, control, tok, dtrain, data.labels,
                        replace(dcfg, soft_weight=0.0, hard_weight=1.0, hidden_weight=0.0))
                control_acc = self._evaluate(control, tok, test, cfg)["accuracy"]
                del control
            distill_stats = distill(teacher, student, tok, dtrain, data.labels, dcfg)
            student_acc = self._evaluate(student, tok, test, cfg)
        return student, {
            "teacher_accuracy": teacher_acc["accuracy"], "pruned_accuracy": pruned_acc["accuracy"],
            "student_accuracy": student_acc["accuracy"], "control_accuracy": control_acc,
            "teacher_macro_f1": teacher_acc["macro_f1"], "student_macro_f1": student_acc["macro_f1"],
            "test_examples": teacher_acc["examples"], "distill": distill_stats, "data": data.describe(),
        }


# --------------------------------------------------------------------------- causal language models


class CausalLMTask(Task):
    name = "causal-lm"
    metric = "perplexity"
    label_sort = (["loss_after_drop", "acc_after_drop"], [True, False])
    step_metric_key = "validation_perplexity"
    step_label_key = "measured_nll_after_drop"
    # Measured in the loop (benchmarks/README.md, "Healed alike"): on smollm2-135m, 30 -> 24, three
    # corpora, seeds 0-2, the LM bundle's top 3 decided by the measured drop-one NLL healed level
    # with SLEB (the previous default, which measures all 30 layers; geometric mean 75.5 against
    # 76.5, within noise, and lower at 10x the healing budget) at about half its CPU selection
    # time; the bundle alone (fusion) was behind both.
    default_strategy = "fusion-verify"
    budget_field = "max_perplexity_increase"
    teacher_metric_key = "teacher_validation_perplexity"
    higher_is_better = False
    throughput_unit = "tokens/s"
    #: spacing of the predicting positions the MI signals use (see signals.capture)
    lm_stride = 16

    def budget_limit(self, info, cfg):
        # Relative: 0.5 allows 1.5x the teacher's validation perplexity (same windows), before healing.
        return info[self.teacher_metric_key] * (1 + cfg.max_perplexity_increase)

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[str, object] = {}
        self._zero_shot_sets: dict[str, tuple] = {}

    def load_data(self, spec, text_column="text", label_column="label"):
        from fusion_prune.causal_lm import load_corpus

        self.data = load_corpus(spec, text_column)
        self._windows = {}
        return self.data

    def load_model(self, spec):
        from fusion_prune.models import load_causal_lm

        model, tok = load_causal_lm(spec)
        return model, tok, True

    def windows(self, tok, split: str, cfg, cap_tokens: int | None = None):
        """Token windows (N, max_length) of one split, tokenised once per run."""
        from fusion_prune.causal_lm import token_windows

        key = (split, cap_tokens)
        if key not in self._windows:
            self._windows[key] = token_windows(tok, self.data.split(split), cfg.max_length, cap_tokens,
                                               what=f"{split!r} split of {self.data.spec!r}")
        return self._windows[key]

    def _sample(self, windows, n: int | None, seed: int):
        if n is None or n >= len(windows):
            return windows
        return windows[np.sort(np.random.default_rng(seed).choice(len(windows), n, replace=False))]

    def _ppl(self, model, tok, split, cfg, cap_windows: int | None = None) -> dict:
        from fusion_prune.causal_lm import perplexity

        w = self.windows(tok, split, cfg, cfg.max_eval_tokens)
        return perplexity(model, w if cap_windows is None else w[:cap_windows], batch_size=cfg.batch_size)

    def prepare_teacher(self, model, tok, cfg, ready, model_spec, log):
        from fusion_prune.models import check_max_length

        check_max_length(model, cfg.max_length)
        for split in ("train", "validation", "test"):  # refuse a corpus too short for one window, up front
            self.windows(tok, split, cfg, cfg.max_eval_tokens if split != "train" else None)
        return {"teacher_finetuned": False,
                "teacher_validation_perplexity": self._ppl(model, tok, "validation", cfg, cfg.step_eval_samples)[
                    "perplexity"],
                "train_windows": int(len(self.windows(tok, "train", cfg)))}

    def calibration_batches(self, model, tok, cfg, step):
        from fusion_prune.causal_lm import window_batches

        w = self._sample(self.windows(tok, "train", cfg), cfg.signal_samples, cfg.seed + step)
        return window_batches(w, cfg.batch_size, next(model.parameters()).device)

    def signals(self, model, tok, batches, names, cfg):
        from signals import signals_on_batches

        return signals_on_batches(model, batches, names, lm_stride=self.lm_stride, progress=False)

    def drop_one(self, model, tok, cfg, only=None):
        from fusion_prune.causal_lm import window_batches
        from fusion_prune.labels import drop_one_nll

        w = self.windows(tok, "validation", cfg, cfg.max_eval_tokens)[: cfg.label_samples or None]
        return drop_one_nll(model, window_batches(w, cfg.batch_size, next(model.parameters()).device), only=only)

    def score_batches(self, model, batches):
        from fusion_prune.labels import drop_one_nll

        return drop_one_nll(model, batches)

    def recover(self, model, tok, steps, cfg, seed):
        from fusion_prune.causal_lm import heal

        heal(model, self.windows(tok, "train", cfg), replace(cfg.heal, method="full", steps=steps, seed=seed,
                                                              kd_weight=0.0, progress=False))

    def step_metric(self, model, tok, cfg):
        return self._ppl(model, tok, "validation", cfg, cfg.step_eval_samples)["perplexity"]

    def finish(self, teacher, student, tok, cfg, info, log):
        from fusion_prune.causal_lm import heal

        teacher_ppl = self._ppl(teacher, tok, "test", cfg)
        pruned_ppl = self._ppl(student, tok, "test", cfg)
        zs = {name: {"teacher": self._zero_shot(teacher, tok, name, cfg),
                     "pruned": self._zero_shot(student, tok, name, cfg)} for name in cfg.zero_shot}
        log(f"test perplexity: teacher {teacher_ppl['perplexity']:.2f}, pruned {pruned_ppl['perplexity']:.2f}; "
            f"healing ({cfg.heal.method}, {cfg.heal.steps} steps)")
        train_w = self.windows(tok, "train", cfg)
        student, heal_stats = heal(student, train_w, replace(cfg.heal, kd_weight=0.0, seed=cfg.seed,
                                                             progress=cfg.progress))
        healed_ppl = self._ppl(student, tok, "test", cfg)
        distill_stats, student_ppl = None, healed_ppl
        if cfg.lm_distill_steps:
            log(f"healed perplexity {healed_ppl['perplexity']:.2f}; distilling ({cfg.lm_distill_steps} steps)")
            student, distill_stats = heal(student, train_w, replace(
                cfg.heal, steps=cfg.lm_distill_steps, kd_weight=cfg.kd_weight, seed=cfg.seed + 1,
                progress=cfg.progress), teacher=teacher)
            student_ppl = self._ppl(student, tok, "test", cfg)
        for name in cfg.zero_shot:
            zs[name]["student"] = self._zero_shot(student, tok, name, cfg)
        return student, {
            "metric": "perplexity", "teacher_perplexity": teacher_ppl["perplexity"],
            "pruned_perplexity": pruned_ppl["perplexity"], "healed_perplexity": healed_ppl["perplexity"],
            "student_perplexity": student_ppl["perplexity"],
            "teacher_nll": teacher_ppl["nll"], "student_nll": student_ppl["nll"], "test_tokens": teacher_ppl["tokens"],
            "zero_shot": zs or None, "heal": heal_stats, "distill": distill_stats, "data": self.data.describe(),
        }

    def _zero_shot(self, model, tok, name: str, cfg) -> dict:
        from fusion_prune.causal_lm import parse_verbalisers, zero_shot
        from fusion_prune.data import load_dataset
        from fusion_prune.data import subsample

        spec = cfg.zero_shot[name]
        if name not in self._zero_shot_sets:  # the same examples for the teacher, pruned and final model
            ds = load_dataset(name)
            self._zero_shot_sets[name] = (subsample(ds.test, spec.get("max_samples", 200), cfg.seed), ds.labels)
        df, labels = self._zero_shot_sets[name]
        return zero_shot(model, tok, df, labels, spec.get("prompt") or "{text}\nAnswer:",
                         parse_verbalisers(spec.get("verbalisers"), labels),
                         max_length=spec.get("max_length", 256), batch_size=cfg.batch_size * 2)


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "causal-lm": CausalLMTask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise bad_choice("task", name, TASKS)
    return TASKS[name]()


def dataset_has_labels(spec: str, label_column: str = "label") -> bool:
    """Whether ``spec`` is a labelled dataset (its train split has ``label_column``)."""
    from pathlib import Path

    from fusion_prune import data as D
    from fusion_prune.causal_lm import CORPUS_SUFFIXES

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in CORPUS_SUFFIXES:
        return False
    if path.is_dir() and any(p.suffix.lower() in CORPUS_SUFFIXES for p in path.iterdir()) \
            and not any(path.glob("train.*")):
        return False
    raw = D._read_spec(spec, [])
    return label_column in raw.get("train", next(iter(raw.values()))).columns


def model_task(model_spec: str) -> str | None:
    """The task a model's own class implies: "causal-lm" for ``*ForCausalLM`` / ``*LMHeadModel``,
    "classification" for ``*ForSequenceClassification``, None for a base model (no head)."""
    from fusion_prune.models import load_config

    archs = getattr(load_config(model_spec), "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return None


def detect_task(model_spec: str, dataset_spec: str | None, task: str | None = None,
                label_column: str = "label") -> str:
    """The task to run: ``task`` when given; else from the model's class and the dataset.

    A causal LM with a labelled dataset is ambiguous (a head could be added, or the text could be
    modelled), so it needs ``--task``. A base decoder (no head) with an unlabelled corpus is a
    causal LM; everything else is classification.
    """
    from fusion_prune.models import load_config
    from fusion_prune.surgery import architecture_of

    if task is not None:
        if task not in TASKS:
            raise bad_choice("task", task, TASKS)
        return task
    implied = model_task(model_spec)
    labelled = dataset_has_labels(dataset_spec, label_column) if dataset_spec is not None else None
    if implied == "causal-lm":
        if labelled:
            raise BadInputError(
                f"The model {model_spec!r} is a causal LM and the dataset {dataset_spec!r} has labels in column "
                f"{label_column!r}; expected --task causal-lm (model the text) or --task classification (add a head).")
        return "causal-lm"
    if implied is None and labelled is False and architecture_of(load_config(model_spec)).kind == "decoder":
        return "causal-lm"
    return "classification"
