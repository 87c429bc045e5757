"""Real pretrained models and real datasets from the package registry (marker: slow; CI runs it)."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_prune import assets
from fusion_prune.data import load_dataset

pytestmark = pytest.mark.slow

# Official splits (docs/design.md, "Assets") where the corpus ships them; the others are carved 80/20 after
# removing duplicate texts.
EXPECTED = {
    "20newsgroups": (11293, 7528, 20),
    "reuters-r8": (5485, 2189, 8),
    "reuters-r52": (6532, 2568, 52),
    "election-tweets": (None, None, 2),
    "rotten-tomatoes": (None, None, 2),
    "bbc-news": (None, None, 5),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_asset(name):
    ds = load_dataset(name)
    train, test, classes = EXPECTED[name]
    info = assets.asset_info(name)
    assert ds.num_labels == classes == info["classes"]
    assert len(ds.test) == info["test_examples"]
    assert len(ds.train) + len(ds.validation) == info["train_examples"]
    if train is not None:
        assert (info["train_examples"], info["test_examples"]) == (train, test)
    else:  # a carved 20% test split
        total = info["train_examples"] + info["test_examples"]
        assert abs(info["test_examples"] - 0.2 * total) <= 1
    assert ds.train["text"].str.len().min() > 0


@pytest.mark.parametrize("name, family, layers, hidden, params", [
    ("minilm-l6", "bert", 6, 384, 22_713_216),
    ("mpnet-base", "mpnet", 12, 768, 109_486_464),
    ("smollm2-135m", "llama", 30, 576, 134_515_008),
])
def test_model_asset_loads_as_classifier(name, family, layers, hidden, params):
    from fusion_prune.models import load_classifier

    model, tok, trained = load_classifier(name, ["neg", "pos"])
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == (family, layers, hidden)
    assert assets.asset_info(name)["parameters"] == params
    enc = tok(["a fine film", "a dull, overlong mess of a movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all() and not trained


def test_smollm2_dequantised_weights_are_a_working_language_model():
    from transformers import AutoModelForCausalLM

    from fusion_prune.models import load_tokenizer

    folder = assets.fetch("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = load_tokenizer("smollm2-135m")
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_minilm_finetunes_on_rotten_tomatoes_slice(tmp_path):
    """A small real run: 1,000 reviews, one epoch; well above the 0.58 majority class.

    Measured on a 2-core CPU: test accuracy 0.724 on 500 test reviews with lr 3e-4 (32 steps at
    lr 1e-4 stay at the majority class, 0.57).
    """
    from fusion_prune.finetune import FinetuneConfig, finetune

    data = load_dataset("rotten-tomatoes")
    cfg = FinetuneConfig(max_train_samples=1000, max_eval_samples=500, max_length=64, lr=3e-4, progress=False)
    res = finetune("minilm-l6", data, cfg, tmp_path / "teacher")
    acc = res.record["metrics"]["test"]["accuracy"]
    assert acc >= 0.66, acc
    rec = json.loads((tmp_path / "teacher" / "fusionprune_run.json").read_text())
    assert rec["model"] == "minilm-l6" and rec["train"]["steps"] == 32
