"""Fine-tuning and evaluation on a tiny BERT built from a config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification

from fusion_prune.data import load_dataset
from fusion_prune.errors import BadInputError
from fusion_prune.finetune import RUN_RECORD, FinetuneConfig, evaluate, finetune
from fusion_prune.data import label_map
from fusion_prune.models import head_labels, load_classifier


def _cfg(**kw):
    base = dict(epochs=4, batch_size=16, lr=3e-3, max_length=16, warmup_ratio=0.0, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_learns_and_saves_a_reloadable_classifier(tiny_base_model, sentiment_csv_dir, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    out = tmp_path / "teacher"
    res = finetune(str(tiny_base_model), data, _cfg(), out)
    rec = json.loads((out / RUN_RECORD).read_text())
    # The task is separable by one word: a 2-layer model learns it well within 4 epochs.
    assert rec["metrics"]["test"]["accuracy"] >= 0.95
    assert rec["train"]["final_loss"] < rec["train"]["first_loss"]
    assert rec["had_trained_head"] is False
    assert rec["data"]["labels"] == ["neg", "pos"] and rec["config"]["seed"] == 0
    assert {"torch", "transformers", "fusionprune"} <= set(rec["versions"])
    assert res.record == rec
    # A plain transformers load gives the same predictions as our evaluation recorded.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    _, tok, trained = load_classifier(str(out), data.labels)
    assert trained is True
    m = evaluate(model, tok, data.test, data.labels, max_length=16)
    assert m["accuracy"] == pytest.approx(rec["metrics"]["test"]["accuracy"])
    assert not list(tmp_path.glob(".teacher.tmp-*"))  # no temp folder left behind


def test_finetune_is_deterministic_for_a_seed(tiny_base_model, sentiment_csv_dir, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    # five steps learn little: the majority-class check is off, this test is about determinism
    a = finetune(str(tiny_base_model), data, _cfg(max_steps=5), tmp_path / "a", teacher_margin=0).record
    b = finetune(str(tiny_base_model), data, _cfg(max_steps=5), tmp_path / "b", teacher_margin=0).record
    assert a["train"]["final_loss"] == b["train"]["final_loss"]
    assert a["train"]["steps"] == 5


def test_existing_output_is_refused_and_untouched(tiny_base_model, sentiment_csv_dir, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="already exists"):
        finetune(str(tiny_base_model), data, _cfg(max_steps=1), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_label_map_by_name_and_errors():
    class C:
        id2label = {0: "neg", 1: "pos"}

    assert label_map(C, ["pos", "neg"]).tolist() == [1, 0]
    with pytest.raises(BadInputError, match=r"labels \['meh'\] are not classes of the model"):
        label_map(C, ["neg", "meh"])

    class G:
        id2label = {0: "LABEL_0", 1: "LABEL_1"}

    assert label_map(G, ["a", "b"]).tolist() == [0, 1]


def test_config_validation():
    with pytest.raises(BadInputError, match="'batch_size' parameter must be an int >= 1. Got 0"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(BadInputError, match="'max_steps' parameter must be an int >= 1 or None"):
        FinetuneConfig(max_steps=0)
    with pytest.raises(BadInputError, match="'mixed_precision' parameter must be one of"):
        FinetuneConfig(mixed_precision="fp8")


def test_new_head_when_labels_differ(tiny_base_model, sentiment_csv_dir, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    out = tmp_path / "t"
    finetune(str(tiny_base_model), data, _cfg(max_steps=2), out, teacher_margin=0)
    assert head_labels(AutoModelForSequenceClassification.from_pretrained(out).config) == ["neg", "pos"]
    model, _, trained = load_classifier(str(out), ["a", "b", "c"])
    assert trained is False and model.config.num_labels == 3
    assert np.isfinite(model.classifier.weight.detach().cpu().numpy()).all()


def test_macro_f1_ignores_classes_absent_from_split_and_predictions(tiny_base_model, sentiment_csv_dir, recwarn):
    """A capped test split can miss a class: it must not count as F1 = 0 (nor warn)."""
    from sklearn.metrics import f1_score

    from fusion_prune.finetune import predict

    data = load_dataset(str(sentiment_csv_dir))
    labels = [*data.labels, "never-seen"]  # a third class the split does not contain
    model, tok, _ = load_classifier(str(tiny_base_model), labels)
    m = evaluate(model, tok, data.test, labels, max_length=16)
    y_true = label_map(model.config, labels)[data.test["label"].to_numpy()]
    y_pred = predict(model, tok, data.test, 64, 16)
    present = np.union1d(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=present))
    assert not [w for w in recwarn if "ill-defined" in str(w.message)]
