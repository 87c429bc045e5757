"""The compression loop: signals -> strategy -> drop -> short fine-tune -> repeat, then distil.

Work happens in ``<output>.partial/``: the teacher, the current student and ``history.json`` are
written after every step, so ``resume=True`` continues a stopped run exactly (each step's
randomness is seeded by ``seed + step``). The final folder (model, tokenizer, report.json,
report.md, plots) appears in one rename at the end. Test accuracy is measured for the report
only; every choice uses the train and validation splits.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from distill import DistillConfig, distill
from fusion_prune.data import TextDataset
from fusion_prune.errors import BadInputError, bad_choice
from fusion_prune.finetune import FinetuneConfig, evaluate, make_accelerator, make_loader, subsample, train
from fusion_prune.strategies import STRATEGIES, StrategyState
from fusion_prune.surgery import drop_layers_, kept_layers, num_layers
from fusion_prune.utils import atomic_dir, versions, write_json_atomic


@dataclass
class CompressConfig:
    target_layers: int
    strategy: str = "fusion"
    fusion_path: str | None = None  # None: the bundle shipped with fusionprune
    finetune_steps: int = 50  # recovery steps per removed layer
    signal_samples: int = 256
    label_samples: int = 400  # validation examples for the measured drop-one accuracies (0: skip)
    max_eval_samples: int | None = None  # cap on validation/test examples for reported accuracies
    step_eval_samples: int | None = None  # cap on validation examples for each step's record (None: as above)
    max_length: int = 128
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    teacher: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=1, lr=2e-4, max_train_samples=3000))
    distill: DistillConfig | None = field(default_factory=DistillConfig)
    # Also train a copy of the pruned student on hard labels only, with the distillation's steps,
    # data, learning rate and seed, and report its accuracy: did distillation help here?
    distill_control: bool = False
    # "unseen": distil (and train the control) on train rows the teacher was not fine-tuned on,
    # topped up with seen rows when there are too few. On its own training rows a teacher gives
    # nearly one-hot targets, so distillation there is little more than hard-label fine-tuning.
    distill_data: str = "all"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise bad_choice("strategy", self.strategy, STRATEGIES)
        if self.target_layers < 1:
            raise BadInputError(f"The 'target_layers' parameter must be at least 1. Got {self.target_layers}.")
        if self.finetune_steps < 0:
            raise BadInputError(f"The 'finetune_steps' parameter must be >= 0. Got {self.finetune_steps}.")
        if self.distill_data not in DISTILL_DATA:
            raise bad_choice("distill_data", self.distill_data, DISTILL_DATA)


DISTILL_DATA = ("all", "unseen")


def _teacher_data(model_spec: str, data: TextDataset) -> dict | None:
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
    from fusion_prune.finetune import subsample_positions

    seen = np.zeros(len(train_df), dtype=bool)
    if teacher_data is not None:
        seen[subsample_positions(train_df, teacher_data["max_train_samples"], teacher_data["seed"])] = True
    order = np.random.default_rng(seed).permutation(len(train_df))
    pos = np.concatenate([order[~seen[order]], order[seen[order]]])[:n]
    return (train_df.iloc[pos].reset_index(drop=True),
            {"rows": int(len(pos)), "unseen_by_teacher": int((~seen[pos]).sum()), "teacher_data": teacher_data})


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _save_model(folder: Path, model, tok) -> None:
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


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


def compress(model_spec: str, data: TextDataset, cfg: CompressConfig, output: str | Path, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Compress ``model_spec`` to ``cfg.target_layers`` layers; returns the report (also saved)."""
    from fusion_prune.fusion import load_bundle
    from fusion_prune.labels import drop_one_labels
    from fusion_prune.models import load_classifier
    from signals import DEFAULT_SIGNALS, compute_signals

    output = Path(output)
    partial = _partial(output)
    if output.exists() and not overwrite:
        raise BadInputError(f"The output folder {str(output)!r} already exists; expected a new path (or pass --overwrite).")
    if partial.exists() and not resume:
        if not overwrite:
            raise BadInputError(f"A stopped run exists at {str(partial)!r}; pass --resume to continue it "
                                "(or --overwrite to start again).")
        shutil.rmtree(partial)
    strategy = STRATEGIES[cfg.strategy]
    bundle = load_bundle(cfg.fusion_path) if strategy.needs_bundle else None
    signal_names = list(dict.fromkeys([*DEFAULT_SIGNALS, *strategy.extra_signals, *_bundle_extras(bundle)]))
    meta = json.loads(json.dumps({"model": str(model_spec), "dataset": data.spec, "config": asdict(cfg)}, default=str))
    meta["config"].pop("progress")
    t_start = time.perf_counter()
    eval_kw = dict(batch_size=cfg.batch_size * 2, max_length=cfg.max_length, progress=False)
    # The per-step validation accuracy is a record, not an input to any choice: it may use fewer examples.
    val = subsample(data.validation, cfg.step_eval_samples or cfg.max_eval_samples, cfg.seed)
    test = subsample(data.test, cfg.max_eval_samples, cfg.seed)

    history_file = partial / "history.json"
    saved = json.loads(history_file.read_text()) if resume and history_file.is_file() else None
    if saved is not None and saved["meta"] != meta:
        if not overwrite:
            raise BadInputError(f"The stopped run at {str(partial)!r} used other arguments; expected the same "
                                "arguments to resume (or --overwrite to start again).")
        _log("the stopped run used other arguments: starting again (--overwrite)")
        shutil.rmtree(partial)
        saved = None
    if saved is not None:
        teacher, tok, _ = load_classifier(str(partial / "teacher"), data.labels)
        student, _, _ = load_classifier(str(partial / "current"), data.labels)
        history, info = saved["history"], saved["info"]
        _log(f"resuming after step {len(history)} ({num_layers(student)} layers)")
    else:
        teacher, tok, trained = load_classifier(model_spec, data.labels)
        depth = num_layers(teacher)
        if cfg.target_layers >= depth:
            raise BadInputError(f"The 'target_layers' parameter must be below the model's depth {depth}. "
                                f"Got {cfg.target_layers}.")
        info = {"teacher_finetuned": not trained}
        if not trained:
            _log(f"{model_spec} has no head for these labels: fine-tuning the teacher first")
            tcfg = FinetuneConfig(**{**asdict(cfg.teacher), "max_length": cfg.max_length, "seed": cfg.seed,
                                     "progress": cfg.progress})
            info["teacher_train"] = train(teacher, tok, data.train, tcfg, make_accelerator(tcfg.mixed_precision))
        info["teacher_data"] = ({"max_train_samples": tcfg.max_train_samples, "seed": tcfg.seed} if not trained
                                else _teacher_data(model_spec, data))
        info["teacher_validation_accuracy"] = evaluate(teacher, tok, val, data.labels, **eval_kw)["accuracy"]
        info["teacher_layers"] = depth
        student = copy.deepcopy(teacher)
        history = []
        partial.mkdir(parents=True, exist_ok=True)
        _save_model(partial / "teacher", teacher, tok)
        _save_model(partial / "current", student, tok)
        write_json_atomic(history_file, {"meta": meta, "history": history, "info": info})

    while num_layers(student) > cfg.target_layers:
        step = len(history)
        t0 = time.perf_counter()
        n = num_layers(student)
        calib = subsample(data.train, cfg.signal_samples, cfg.seed + step)
        # Only one-shot block strategies read raw batches; they must sit on the model's device.
        device = next(student.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in make_loader(calib, tok, cfg.batch_size, cfg.max_length)] if strategy.one_shot else []
        signals = None
        if strategy.needs_signals or cfg.signal_samples:
            signals = compute_signals(student, tok, calib, signal_names, batch_size=cfg.batch_size,
                                      max_length=cfg.max_length, max_samples=None, progress=False)
        t_signals = time.perf_counter() - t0
        labels = None
        if strategy.needs_labels or cfg.label_samples:
            t1 = time.perf_counter()
            lab = drop_one_labels(student, tok, subsample(data.validation, cfg.label_samples or None, cfg.seed),
                                  data.labels, batch_size=cfg.batch_size * 2, max_length=cfg.max_length)
            labels, t_labels = lab.table, time.perf_counter() - t1
        t1 = time.perf_counter()
        state = StrategyState(student, batches, n, cfg.target_layers, kept_layers(student.config), signals, labels,
                              bundle, np.random.default_rng(cfg.seed + step), info["teacher_layers"])
        drop = sorted(strategy.fn(state))
        selection = time.perf_counter() - t1 + (t_signals if strategy.needs_signals else 0) + (
            t_labels if strategy.needs_labels else 0)
        predicted = None
        if bundle is not None and len(drop) == 1:
            predicted = float(bundle.predict(signals.sort_values("layer"))[drop[0]])
        measured = float(labels.set_index("layer").acc_after_drop[drop[0]]) if labels is not None and len(drop) == 1 \
            else None
        orig = [kept_layers(student.config)[i] for i in drop]
        drop_layers_(student, drop)
        if cfg.finetune_steps:
            # Steps per removed layer: a one-shot strategy (angular-block) gets the same recovery
            # budget in total as one that removes the same layers one at a time.
            fcfg = FinetuneConfig(max_steps=cfg.finetune_steps * len(drop), batch_size=cfg.batch_size, lr=cfg.lr,
                                  max_length=cfg.max_length, seed=cfg.seed + step + 1, warmup_ratio=0.0,
                                  progress=False)
            train(student, tok, data.train, fcfg, make_accelerator(fcfg.mixed_precision))
        val_acc = evaluate(student, tok, val, data.labels, **eval_kw)["accuracy"]
        history.append({
            "step": step, "layers_before": n, "dropped": drop, "dropped_orig": orig,
            "kept_layers": kept_layers(student.config), "predicted": predicted, "measured_acc_after_drop": measured,
            "validation_accuracy_after_finetune": val_acc, "finetune_steps": cfg.finetune_steps * len(drop),
            "selection_seconds": round(selection, 3),
            "seconds": round(time.perf_counter() - t0, 2),
            "signals": signals.to_dict("list") if signals is not None else None,
            "labels": labels.to_dict("list") if labels is not None else None,
        })
        _save_model(partial / "current", student, tok)
        write_json_atomic(history_file, {"meta": meta, "history": history, "info": info})
        _log(f"step {step}: {n} -> {num_layers(student)} layers, dropped {orig} (original), "
             f"validation accuracy {val_acc:.4f}, {history[-1]['seconds']:.0f} s")

    teacher_acc = evaluate(teacher, tok, test, data.labels, **eval_kw)
    pruned_acc = evaluate(student, tok, test, data.labels, **eval_kw)
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
            control_acc = evaluate(control, tok, test, data.labels, **eval_kw)["accuracy"]
            del control
        distill_stats = distill(teacher, student, tok, dtrain, data.labels, dcfg)
        student_acc = evaluate(student, tok, test, data.labels, **eval_kw)
    report = {
        "model": str(model_spec), "dataset": data.spec, "strategy": cfg.strategy,
        "teacher_accuracy": teacher_acc["accuracy"], "pruned_accuracy": pruned_acc["accuracy"],
        "student_accuracy": student_acc["accuracy"], "control_accuracy": control_acc,
        "teacher_macro_f1": teacher_acc["macro_f1"],
        "student_macro_f1": student_acc["macro_f1"], "test_examples": teacher_acc["examples"],
        "teacher_layers": info["teacher_layers"], "student_layers": num_layers(student),
        "kept_layers": kept_layers(student.config), "history": history, "info": info,
        "distill": distill_stats, "config": meta["config"], "data": data.describe(),
        "fusion_bundle": (bundle.describe() | {"path": str(cfg.fusion_path or "default")}) if bundle else None,
        "selection_seconds": round(sum(h["selection_seconds"] for h in history), 3),
        "wall_seconds": round(time.perf_counter() - t_start, 1), "versions": versions(),
    }
    from fusion_prune.report import write_compress_report

    with atomic_dir(output, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_compress_report(report, tmp)
    shutil.rmtree(partial, ignore_errors=True)
    return report
