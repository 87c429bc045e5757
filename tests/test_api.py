"""The Python API (fusion_prune.api): what the README shows, on tiny models and on the real ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fusion_prune
from fusion_prune import CompressResult, compress, compute_signals, load_fusion, prune
from fusion_prune.data import load_dataset
from fusion_prune.errors import BadInputError
from fusion_prune.surgery import kept_layers, num_layers
from signals import DEFAULT_SIGNALS
from test_compress import teacher  # noqa: F401 (a fixture)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_api_is_exported_lazily():
    assert {"compress", "compute_signals", "load_fusion", "prune", "CompressResult"} <= set(fusion_prune.__all__)
    with pytest.raises(AttributeError):
        fusion_prune.nothing_here  # noqa: B018


def test_compute_signals_is_the_table_compress_scores(teacher, sentiment_csv_dir):  # noqa: F811
    table = compute_signals(str(teacher), str(sentiment_csv_dir), samples=16, max_length=16, batch_size=8,
                            signals=["activation_patching"])
    assert list(table.columns) == ["layer", "orig_layer", *DEFAULT_SIGNALS, "activation_patching"]
    assert len(table) == 3 and table[list(DEFAULT_SIGNALS)].notna().all().all()
    again = compute_signals(str(teacher), load_dataset(str(sentiment_csv_dir)), samples=16, max_length=16,
                            batch_size=8, signals=["activation_patching"])
    assert table.equals(again)  # a spec and a loaded dataset give the same sample
    assert len(load_fusion().predict(table)) == 3


def test_prune_returns_a_copy(teacher):  # noqa: F811
    from fusion_prune.models import load_native

    net, _ = load_native(str(teacher))
    small = prune(net, [1])
    assert num_layers(net) == 3 and num_layers(small) == 2 and kept_layers(small.config) == [0, 2]
    assert num_layers(prune(str(teacher), [0, 2])) == 1


def test_compress_says_it_trains_a_teacher_first(tiny_base_model, sentiment_csv_dir, caplog):
    """A model without a head: a warning (seen without any logging set-up) with the step budget."""
    caplog.set_level("WARNING", logger="fusion_prune")
    res = compress(str(tiny_base_model), str(sentiment_csv_dir), target_layers=1, strategy="top", finetune_steps=1,
                   signal_samples=16, drop_one_samples=0, max_eval_samples=40, max_length=16, batch_size=8,
                   distill=None, progress=False, teacher_lr=3e-3, teacher_margin=0.0)
    (msg,) = [r.getMessage() for r in caplog.records if "fine-tunes a teacher first" in r.getMessage()]
    planned = int(re.search(r"up to (\d+) steps of 32 examples", msg).group(1))
    assert "fusionprune finetune" in msg and 0 < res.report["info"]["teacher_train"]["steps"] <= planned


def test_compress_returns_a_result_that_saves(teacher, sentiment_csv_dir, tmp_path):  # noqa: F811
    res = compress(str(teacher), str(sentiment_csv_dir), target_layers=1, strategy="top", finetune_steps=1,
                   signal_samples=16, drop_one_samples=0, max_eval_samples=40, max_length=16, batch_size=8,
                   distill=None, progress=False)
    assert isinstance(res, CompressResult) and num_layers(res.model) == 1 and res.tokenizer is not None
    assert res.report["student_layers"] == 1 and "kept" in repr(res)
    out = res.save(tmp_path / "saved")
    assert (out / "report.json").is_file() and (out / "config.json").is_file()
    card = (out / "README.md").read_text()  # the model card, with the run's own results table
    assert f"Original layers kept, in order: {res.report['kept_layers']}" in card and "| teacher |" in card
    assert "pipeline_tag: text-classification" in card and "the Python API" in card
    with pytest.raises(BadInputError, match="already exists"):
        res.save(tmp_path / "saved")
    with pytest.raises(BadInputError, match=r"Unknown options \['target'\]"):
        compress(str(teacher), str(sentiment_csv_dir), target_layers=1, target=2)


@pytest.mark.slow
def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The README's Python block, as written, on minilm-l6 and rotten-tomatoes."""
    from fusion_prune.params import TEACHER_DEFAULTS
    from fusion_prune.tasks.classification import ClassificationTask

    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    # The block runs as written; only budgets it does not name, and the test does not judge, are cut:
    # the teacher's training (half an epoch of the 3,000 default examples, no step floor, no early
    # stopping), each step's calibration, drop-one and recovery samples, and the evaluation sets
    # (the whole test ran 7-15 min with them).
    monkeypatch.setitem(TEACHER_DEFAULTS, "epochs", 0.5)
    monkeypatch.setitem(TEACHER_DEFAULTS, "min_steps", 0)
    monkeypatch.setitem(TEACHER_DEFAULTS, "patience", 0)  # no validation checks during that half epoch
    for name, value in {"finetune_steps": 5, "signal_samples": 64, "drop_one_samples": 100,
                        "max_eval_samples": 200}.items():
        monkeypatch.setitem(ClassificationTask.step_defaults, name, value)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102
    result = scope["result"]
    assert result.report["student_layers"] == 4 and (tmp_path / "runs" / "minilm-4" / "report.json").is_file()
    assert len(scope["table"]) == 6 and num_layers(scope["smaller"]) == 4
