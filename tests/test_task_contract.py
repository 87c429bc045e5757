"""The Task contract: every registered task runs every method of the base class on a tiny model.

A new task registers itself and adds its tiny inputs to ``INPUTS`` below; this test then checks
it the way it checks the two that exist (docs/design.md, "Adding a task").
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from fusion_prune.config import StepConfig
from fusion_prune.tasks import TASKS, FinishConfig, Task, get_task


def _classifier(root):
    from conftest import sentiment_frame, train_tiny_classifier

    data = root / "sentiment"
    data.mkdir()
    sentiment_frame(200, seed=1).to_csv(data / "train.csv", index=False)
    sentiment_frame(60, seed=2).to_csv(data / "test.csv", index=False)
    return train_tiny_classifier(root, data, layers=3), data


def _causal_lm(root):
    from conftest import make_tokenizer
    from test_causal_lm import prose, tiny_decoder

    tiny_decoder("llama", layers=3).save_pretrained(root / "llama")
    make_tokenizer(root / "llama").save_pretrained(root / "llama")
    (root / "story.txt").write_text("\n\n".join(prose(40)))
    return root / "llama", root / "story.txt"


#: task -> builder of (tiny model folder, dataset spec); the step settings that keep it fast
INPUTS = {"classification": (_classifier, dict(max_length=16, batch_size=8, signal_samples=16, drop_one_samples=16,
                                               max_eval_samples=24, finetune_steps=1)),
          "causal-lm": (_causal_lm, dict(max_length=16, batch_size=2, signal_samples=2, drop_one_samples=2,
                                         step_eval_samples=2, max_eval_tokens=64, finetune_steps=1))}


def test_every_registered_task_has_contract_inputs():
    assert set(TASKS) == set(INPUTS), "add the new task's tiny inputs to INPUTS"


@pytest.fixture(scope="module", params=sorted(TASKS))
def case(request, tmp_path_factory):
    build, step_kw = INPUTS[request.param]
    model, data = build(tmp_path_factory.mktemp(request.param))
    return request.param, str(model), str(data), step_kw


def test_class_declarations(case):
    name = case[0]
    cls = TASKS[name]
    assert cls.name == name and issubclass(cls, Task)
    for attr in ("metric", "unit", "drop_one_order", "step_metric_key", "step_measured_key", "budget_field",
                 "teacher_metric_key", "higher_is_better", "default_strategy", "step_defaults", "finish_config",
                 "default_bundle", "description", "head_suffixes", "analysis_drop_one_samples"):
        assert getattr(cls, attr) is not None, attr
    from fusion_prune.strategies import STRATEGIES

    assert cls.default_strategy in STRATEGIES and cls.default_bundle.is_file()
    assert set(cls.step_defaults) <= {f.name for f in fields(StepConfig)}
    assert issubclass(cls.finish_config, FinishConfig)
    finish = cls.finish_config()
    for flat in cls.finish_config.flat:  # every flat option reads a real field
        cls.finish_config.flat_default(flat)
        assert cls.finish_config.flat_help(flat), flat
    assert isinstance(cls.nothing_to_finish(cls(), finish), cls.finish_config)


def test_every_method_on_a_tiny_model(case, tmp_path):
    name, model_spec, data_spec, step_kw = case
    t = get_task(name)
    data = t.load_data(data_spec)
    assert isinstance(data, t.data_type())
    step = StepConfig(**step_kw, progress=False)
    t.resolve_step(step)
    assert all(getattr(step, k) is not None for k, v in t.step_defaults.items() if v is not None)

    from fusion_prune.finetune import teacher_config
    from fusion_prune.surgery import num_layers

    model, tok, ready = t.load_model(model_spec)
    info = t.prepare_teacher(model, tok, step, teacher_config(max_steps=2, progress=False), 0.0, ready, model_spec)
    assert t.teacher_metric_key in info and math.isfinite(info[t.teacher_metric_key])
    n = num_layers(model)

    batches = t.calibration_batches(model, tok, step, 0)
    assert batches and all("input_ids" in b for b in batches)
    sig = t.signals(model, batches, ["act_energy", "weight_norm", "block_influence"])
    assert list(sig["layer"]) == list(range(n)) and np.isfinite(sig[["act_energy", "weight_norm"]].to_numpy()).all()

    dropone = t.drop_one(model, tok, step)
    table = dropone.table
    assert len(table) == n and {"layer", "orig_layer", *t.drop_one_order[0]} <= set(table.columns)
    only = t.drop_one(model, tok, step, only=[0]).table
    assert only[t.drop_one_order[0][0]].notna().sum() == 1
    best = t.best_candidate(table)
    assert 0 <= best < n and math.isfinite(t.measured_value(table, best))
    assert len(t.score_batches(model, batches).table) == n
    assert isinstance(t.row_extras(dropone), dict)
    assert t.count_drop_one(step) > 0

    limit = t.budget_limit(info, 0.5)
    assert t.within_budget(info[t.teacher_metric_key], info, 0.5) and math.isfinite(limit)
    metric = t.step_metric(model, tok, step)
    assert math.isfinite(metric)

    table_a, split, used = t.analysis_signals(model, tok, step, ["weight_norm"], "validation", progress=False)
    assert len(table_a) == n and used > 0 and split in ("train", "validation", "test")

    import copy

    student = copy.deepcopy(model)
    from fusion_prune.surgery import drop_layers_

    drop_layers_(student, [best])
    t.recover(student, tok, 1, step, seed=1)
    finish = t.finish_config()
    finish = t.nothing_to_finish(finish)  # the contract's finish runs, without training
    final, results = t.finish(model, student, tok, step, finish, info)
    assert num_layers(final) == n - 1 and isinstance(results, dict)

    res = t.evaluate(model_spec, data_spec, split="test", max_samples=8, max_eval_tokens=64, max_length=16,
                     progress=False)
    assert isinstance(t.evaluation_line(res), str) and res["split"] == "test"


def test_report_methods_on_a_real_run(case, tmp_path):
    """compress runs the loop with the task; the task then writes its report parts from the typed report."""
    from fusion_prune import compress

    name, model_spec, data_spec, step_kw = case
    t = get_task(name)
    r = compress(model_spec, data_spec, target_layers=2, output=tmp_path / "out", task=name, teacher_margin=0.0,
                 strategy="top", **step_kw).report
    assert r.task == name and r.student_layers == 2
    assert all(isinstance(x, str) for x in t.summary_lines(r))
    assert t.report_section(r) and t.step_table(r)
    lines = t.report_plots(r, tmp_path / "plots")
    assert lines and any((tmp_path / "plots").iterdir())
    assert {"load", "teacher", "signals", "recovery", "evaluation"} <= set(r.info["peak_memory"])
    assert all(e["cpu_rss_bytes"] > 0 for e in r.info["peak_memory"].values())
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Peak memory per phase" in md
    assert md.startswith("# fusionprune compress") and "kept_layers" in (tmp_path / "out" / "report.json").read_text()
    assert isinstance(pd.read_json(tmp_path / "out" / "report.json", typ="series")["history"], list)
