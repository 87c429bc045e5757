"""Sequence classification: encoders and decoders with a classification head.

Metric: accuracy (macro-F1 beside it). The drop-one measurement is validation accuracy without
each layer; recovery is a short fine-tune; the finish is knowledge distillation from the
teacher (:mod:`distill`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from distill import DistillConfig
from fusion_prune.config import StepConfig, opt
from fusion_prune.dropone import classification_score
from fusion_prune.fusion import DEFAULT_BUNDLE
from fusion_prune.tasks.base import FinishConfig, Task, register_task

log = logging.getLogger(__name__)


@dataclass
class ClassificationFinish(FinishConfig):
    """How ``compress`` ends for a classifier: distillation from the teacher (None: none)."""

    # 3,000 rows (not every train row): the value every documented run and the demo used, and a
    # bounded cost on a 2-core CPU (docs/compress.md, "Distillation"); the CLI and the API share it.
    distill: DistillConfig | None = opt(lambda: DistillConfig(max_train_samples=3000),
                                        help="Distillation after pruning (None: stop after pruning and fine-tuning).")
    distill_control: bool = opt(False, help="Also fine-tune a copy of the pruned student on hard labels for the "
                                            "same steps, data, learning rate and seed, and report it.")
    distill_data: str = opt("all", help="unseen: distil on train examples the teacher was not fine-tuned on first "
                                        "(known when the teacher was fine-tuned here or by 'fusionprune finetune' "
                                        "with a sample cap).")

    flat: ClassVar[dict[str, str]] = {
        "distill_epochs": "distill.epochs", "distill_samples": "distill.max_train_samples",
        "temperature": "distill.temperature", "hidden_weight": "distill.hidden_weight",
        "distill_layers": "distill.train_layers",
    }
    flags: ClassVar[dict[str, tuple[str, Any]]] = {"no_distill": ("distill", None)}
    shared: ClassVar[dict[str, tuple[str, ...]]] = {"distill": ("batch_size", "lr")}


@register_task
class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    unit = "examples"
    drop_one_order = (["acc_after_drop", "loss_after_drop"], [False, True])
    step_metric_key = "validation_accuracy_after_finetune"
    step_measured_key = "measured_acc_after_drop"
    # The strategy that measured best in the loop (benchmarks/journal.md, profile cpu-2: the same teachers
    # for every rule, six datasets, seeds 0-2, paired): measured drop-one accuracy is first after
    # distillation, fusion-verify kept the same layers at 2.8x its selection time, and compress records
    # every layer's drop-one measurement each step anyway (drop_one_samples), so on a classifier measuring
    # costs nothing extra. With strong teachers and full data (profile gpu-2) the positional rules symmetric
    # and deepest lead it by 0.003; over both budgets it ties them and leads the shipped fusion, and
    # unlike them it reads the model it is given. `--strategy fusion` keeps the learned choice.
    default_strategy = "oracle"
    budget_field = "max_accuracy_drop"
    teacher_metric_key = "teacher_validation_accuracy"
    higher_is_better = True
    step_defaults: ClassVar[dict[str, Any]] = {"finetune_steps": 50, "signal_samples": 256, "drop_one_samples": 400,
                                               "max_length": 128, "batch_size": 32, "step_eval_samples": None}
    finish_config = ClassificationFinish
    default_bundle = DEFAULT_BUNDLE
    score = staticmethod(classification_score)

    description = "sequence classifier"
    head_suffixes = ("ForSequenceClassification",)

    @classmethod
    def data_type(cls):
        from fusion_prune.data import TextDataset

        return TextDataset

    def budget_limit(self, info, budget):
        # Absolute; teacher and steps are scored on the same validation examples (_eval_sets).
        return info[self.teacher_metric_key] - budget

    def load_data(self, spec, text_column="text", label_column="label"):
        from fusion_prune.data import load_dataset

        self.data = load_dataset(spec, text_column, label_column)
        return self.data

    def load_model(self, spec):
        from fusion_prune.models import load_classifier

        return load_classifier(spec, self.data.labels if self.data is not None else None, dtype=self.dtype)

    def _eval_sets(self, step: StepConfig):
        from fusion_prune.data import subsample

        # The per-step validation accuracy is a record, not an input to any choice: it may use fewer examples.
        val = subsample(self.data.validation, step.step_eval_samples or step.max_eval_samples, step.seed)
        test = subsample(self.data.test, step.max_eval_samples, step.seed)
        return val, test

    def _evaluate(self, model, tok, df, step: StepConfig) -> dict:
        from fusion_prune.finetune import evaluate

        return evaluate(model, tok, df, self.data.labels, batch_size=step.batch_size * 2, max_length=step.max_length,
                        progress=False)

    def prepare_teacher(self, model, tok, step, teacher, teacher_margin, ready, model_spec):
        from fusion_prune.finetune import FinetuneConfig, check_teacher, majority_share, planned_steps, train
        from fusion_prune.training import make_accelerator

        info: dict = {"teacher_finetuned": not ready}
        if not ready:
            tcfg = FinetuneConfig(**{**asdict(teacher), "max_length": step.max_length, "seed": step.seed,
                                     "progress": step.progress})
            # A warning, so that Python API users without a logging set-up see it too: this can be most of a run.
            log.warning("%s has no head for these labels: compress fine-tunes a teacher first, up to %d steps of %d "
                        "examples (%s; the bar shows the time left). To reuse one teacher across runs, save it "
                        "with `fusionprune finetune` and pass its folder.", model_spec,
                        planned_steps(len(self.data.train), tcfg), tcfg.batch_size,
                        f"early stop after {tcfg.patience} checks without a gain" if tcfg.patience else "no early stop")
            info["teacher_train"] = train(model, tok, self.data.train, tcfg, make_accelerator(tcfg.mixed_precision),
                                          val_df=self.data.validation, data_labels=self.data.labels)
            info["teacher_data"] = {"max_train_samples": tcfg.max_train_samples, "seed": tcfg.seed}
        else:
            info["teacher_data"] = teacher_data(model_spec, self.data)
        val = self._eval_sets(step)[0]
        info["teacher_validation_accuracy"] = self._evaluate(model, tok, val, step)["accuracy"]
        info["validation_majority_share"] = majority_share(val["label"].to_numpy())
        check_teacher(info["teacher_validation_accuracy"], info["validation_majority_share"], teacher_margin,
                      "The teacher (fine-tuned here)" if not ready else f"The teacher {model_spec!r}")
        return info

    def calibration_batches(self, model, tok, step, k):
        from fusion_prune.data import make_loader, subsample

        device = next(model.parameters()).device
        calib = subsample(self.data.train, step.signal_samples, step.seed + k)
        return [{key: v.to(device) for key, v in b.items()}
                for b in make_loader(calib, tok, step.batch_size, step.max_length)]

    def drop_one(self, model, tok, step, only=None):
        from fusion_prune.data import subsample
        from fusion_prune.dropone import drop_one_accuracy

        return drop_one_accuracy(model, tok, subsample(self.data.validation, step.drop_one_samples or None, step.seed),
                                 self.data.labels, batch_size=step.batch_size * 2, max_length=step.max_length,
                                 progress=step.progress, only=only)

    measures_after_recovery = True

    def recovered_drop_one(self, model, tok, steps, step, seed):
        from fusion_prune.data import subsample
        from fusion_prune.dropone import drop_one_recovered

        return drop_one_recovered(model, tok, self.data.train,
                                  subsample(self.data.validation, step.drop_one_samples or None, step.seed),
                                  self.data.labels, steps, batch_size=step.batch_size, lr=step.lr,
                                  max_length=step.max_length, seed=seed)

    def recover(self, model, tok, steps, step, seed, finish=None):
        from fusion_prune.finetune import FinetuneConfig, train
        from fusion_prune.training import make_accelerator

        fcfg = FinetuneConfig(max_steps=steps, batch_size=step.batch_size, lr=step.lr, max_length=step.max_length,
                              seed=seed, warmup_ratio=0.0, progress=False)
        train(model, tok, self.data.train, fcfg, make_accelerator(fcfg.mixed_precision))

    def step_metric(self, model, tok, step):
        return self._evaluate(model, tok, self._eval_sets(step)[0], step)["accuracy"]

    def nothing_to_finish(self, finish):
        return replace(finish, distill=None, distill_control=False)

    def _distill_setup(self, step, finish, info) -> tuple[DistillConfig, object]:
        """The finish's distillation config and training rows (one recipe for the end and the budget)."""
        dcfg = DistillConfig(**{**asdict(finish.distill), "max_length": step.max_length, "seed": step.seed,
                                "progress": step.progress})
        dtrain = self.data.train
        if finish.distill_data == "unseen":
            dtrain, info["distill_rows"] = distill_rows(self.data.train, info.get("teacher_data"),
                                                        dcfg.max_train_samples, step.seed)
            dcfg = replace(dcfg, max_train_samples=None)  # dtrain is already the sample
        return dcfg, dtrain

    judges_budget_after_finish = True

    def finish_for_budget(self, teacher, student, tok, step, finish, info):
        from distill import distill

        dcfg, dtrain = self._distill_setup(step, finish, info)
        copy_ = copy.deepcopy(student)
        stats = distill(teacher, copy_, tok, dtrain, self.data.labels, dcfg)
        return copy_, stats, self.step_metric(copy_, tok, step)

    def finish(self, teacher, student, tok, step, finish, info, prefinished=None):
        from distill import distill

        data = self.data
        test = self._eval_sets(step)[1]
        with self.phase("evaluation"):
            teacher_acc = self._evaluate(teacher, tok, test, step)
            pruned_acc = self._evaluate(student, tok, test, step)
        distill_stats = control_acc = None
        student_acc = pruned_acc
        if finish.distill is not None:
            dcfg, dtrain = self._distill_setup(step, finish, info)
            if finish.distill_control:
                with self.phase("control"):
                    control = copy.deepcopy(student)
                    distill(teacher, control, tok, dtrain, data.labels,
                            replace(dcfg, soft_weight=0.0, hard_weight=1.0, hidden_weight=0.0))
                    control_acc = self._evaluate(control, tok, test, step)["accuracy"]
                    del control
            if prefinished is not None:  # distilled by the budget check, from this very student
                student, distill_stats = prefinished
                distill_stats = {**distill_stats, "during": "the budget check"}
            else:
                with self.phase("distillation"):
                    distill_stats = distill(teacher, student, tok, dtrain, data.labels, dcfg)
            with self.phase("evaluation"):
                student_acc = self._evaluate(student, tok, test, step)
        return student, {
            "teacher_accuracy": teacher_acc["accuracy"], "pruned_accuracy": pruned_acc["accuracy"],
            "student_accuracy": student_acc["accuracy"], "control_accuracy": control_acc,
            "teacher_macro_f1": teacher_acc["macro_f1"], "student_macro_f1": student_acc["macro_f1"],
            "test_examples": teacher_acc["examples"], "distill": distill_stats, "data": data.describe(),
        }

    # ------------------------------------------------------------------ analysis
    analysis_batch_size = 16
    analysis_drop_one_samples = 400

    def analysis_signals(self, model, tok, step, names, split, progress=True):
        from signals import compute_signals

        # The sample `fusionprune signals` draws: `samples` examples of `split`.
        table = compute_signals(model, tok, self.data.split(split), names, batch_size=step.batch_size,
                                max_length=step.max_length, max_samples=step.signal_samples, seed=step.seed,
                                progress=progress)
        return table, split, min(step.signal_samples, len(self.data.split(split)))

    def count_drop_one(self, step):
        return min(step.drop_one_samples, len(self.data.validation))

    # ------------------------------------------------------------------ evaluation and reports
    def evaluate(self, model_spec, dataset_spec, *, split="test", text_column="text", label_column="label",
                 batch_size=None, max_length=None, max_samples=None, max_eval_tokens=None, progress=True, **options):
        from fusion_prune.data import subsample
        from fusion_prune.finetune import RUN_RECORD, evaluate
        from fusion_prune.models import resolve, resolve_max_length

        from fusion_prune.models import load_classifier

        data = self.load_data(dataset_spec, text_column, label_column)
        net, tok, _ = load_classifier(model_spec, dtype=self.dtype)  # no labels: a model without a trained head is refused
        rec = Path(resolve(model_spec).location) / RUN_RECORD
        trained_with = json.loads(rec.read_text())["config"]["max_length"] if rec.is_file() else 128
        max_length = resolve_max_length(net, max_length, trained_with)
        res = evaluate(net, tok, subsample(data.split(split), max_samples, 0), data.labels, batch_size or 64,
                       max_length, progress=progress)
        return {**res, "model": model_spec, "dataset": dataset_spec, "split": split, "max_length": max_length}

    def evaluation_line(self, r):
        return (f"{r['split']}: accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
                f"({r['examples']} examples, {r['eval_seconds']:.1f} s)")

    def summary_lines(self, report):
        r = report.results
        lines = [f"teacher accuracy  {r['teacher_accuracy']:.4f}",
                 f"pruned accuracy   {r['pruned_accuracy']:.4f}  (after pruning and fine-tuning)",
                 f"student accuracy  {r['student_accuracy']:.4f}  "
                 f"({'after distillation' if r.get('distill') else 'no distillation'})"]
        if r.get("control_accuracy") is not None:
            lines.append(f"control accuracy  {r['control_accuracy']:.4f}  (same steps, hard labels only)")
        return lines

    def report_section(self, report):
        r = report.results
        return [
            f"# fusionprune compress: {report.model} on {report.dataset}", "",
            f"Strategy `{report.strategy}`: {report.teacher_layers} -> {report.student_layers} layers, "
            f"kept original layers {report.kept_layers}.", "",
            "| | test accuracy | macro-F1 |", "|---|---|---|",
            f"| teacher | {r['teacher_accuracy']:.4f} | {r['teacher_macro_f1']:.4f} |",
            f"| pruned + fine-tuned | {r['pruned_accuracy']:.4f} | |",
            f"| after distillation | {r['student_accuracy']:.4f} | {r['student_macro_f1']:.4f} |",
            *([f"| control: same steps, hard labels only | {r['control_accuracy']:.4f} | |"]
              if r.get("control_accuracy") is not None else []), "",
            f"{r['test_examples']} test examples; wall time {report.wall_seconds:.0f} s; "
            f"time spent choosing layers {report.selection_seconds:.1f} s.", "",
        ]

    def step_table(self, report):
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines = []
        target = (report.fusion_bundle or {}).get("target")
        if target:  # what "predicted" is depends on the bundle: only the 'retention' target is a fraction kept
            meaning = {"retention": "the predicted fraction of accuracy kept",
                       "retention_rank": "the predicted rank of the candidate among this step's layers "
                                         "(0 = worst to drop, 1 = best), not an accuracy",
                       "retention_z": "the predicted z-score of the accuracy after the drop among this step's "
                                      "layers, not an accuracy"}.get(target, f"the bundle's target {target!r}")
            lines += [f"`predicted` is {meaning}; `measured right after` is the validation accuracy "
                      "with the layer removed, before fine-tuning.", ""]
        lines += ["| step | layers | dropped (original) | predicted | measured right after | validation after fine-tune |",
                  "|---|---|---|---|---|---|"]
        for e in report.history:
            lines.append(f"| {e.step} | {e.layers_before} | {e.dropped_orig} | {fmt(e.predicted)} | "
                         f"{fmt(e.measured)} | {e.metric:.4f} |")
        return lines + [""]

    def report_plots(self, report, folder):
        from fusion_prune.report import plot_per_step

        teacher = report.info[self.teacher_metric_key]
        series = [([e.metric for e in report.history], "o-", "after short fine-tune")]
        if any(e.measured is not None for e in report.history):
            series.append(([e.measured for e in report.history], "x:", "right after the drop"))
        title = f"{report.model_name} on {report.dataset_name}: validation accuracy ({report.strategy})"
        r = report.results
        final = "after distillation" if r.get("distill") else "final"
        plot_per_step(report, folder / "accuracy.png", teacher, series, "validation accuracy", title,
                      budget=report.info.get("budget_limit"), fontsize=9,
                      test={"teacher": r.get("teacher_accuracy"), "pruned": r.get("pruned_accuracy"),
                            final: r.get("student_accuracy")})
        return ["![accuracy](plots/accuracy.png)", ""]


def teacher_data(model_spec: str, data) -> dict | None:
    """How a teacher made by ``fusionprune finetune`` sampled this dataset's train split
    (``max_train_samples``, ``seed``), from its run record; None when unknown."""
    from fusion_prune.finetune import RUN_RECORD

    record = Path(model_spec) / RUN_RECORD
    if not record.is_file():
        return None
    rec = json.loads(record.read_text())
    same = rec.get("data", {}).get("spec") == data.spec and rec["data"].get("train_examples") == len(data.train)
    return {"max_train_samples": rec["config"]["max_train_samples"], "seed": rec["config"]["seed"]} if same else None


def distill_rows(train_df: pd.DataFrame, teacher_data: dict | None, n: int | None, seed: int):
    """(rows, record): ``n`` train rows (all when None), those the teacher did not see first."""
    from fusion_prune.data import subsample_positions

    seen = np.zeros(len(train_df), dtype=bool)
    if teacher_data is not None:
        seen[subsample_positions(train_df, teacher_data["max_train_samples"], teacher_data["seed"])] = True
    order = np.random.default_rng(seed).permutation(len(train_df))
    pos = np.concatenate([order[~seen[order]], order[seen[order]]])[:n]
    return (train_df.iloc[pos].reset_index(drop=True),
            {"rows": int(len(pos)), "unseen_by_teacher": int((~seen[pos]).sum()), "teacher_data": teacher_data})
