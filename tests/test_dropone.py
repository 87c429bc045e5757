"""Cached drop-one labels equal the naive drop-then-evaluate accuracies exactly, for every family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T

from fusion_prune.errors import BadInputError
from fusion_prune.dropone import drop_one_accuracy, drop_one_accuracy_naive
from fusion_prune.surgery import layer_list

from conftest import make_tokenizer, sentiment_frame, tiny_bert_config
from test_surgery import CONFIGS


class _IdTokenizer:
    """Texts are space-separated token ids: lets any tiny vocabulary be fed from a DataFrame."""

    def __call__(self, texts, truncation=True, max_length=16, padding=True, return_tensors="pt"):
        seqs = [[int(t) for t in s.split()][:max_length] for s in texts]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return {"input_ids": ids, "attention_mask": mask}


def _frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(3, 10))
        rows.append({"text": " ".join(str(t) for t in rng.integers(3, 64, length)), "label": int(i % 3)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("mt", sorted(CONFIGS))
def test_cached_equals_naive_exactly(mt):
    torch.manual_seed(0)
    cfg = CONFIGS[mt]()
    cfg.num_labels = 3
    cfg.initializer_range = 0.3  # a random model whose predictions depend on every layer
    model = T.AutoModelForSequenceClassification.from_config(cfg).eval()
    tok, df, labels = _IdTokenizer(), _frame(), ["LABEL_0", "LABEL_1", "LABEL_2"]
    cached = drop_one_accuracy(model, tok, df, labels, batch_size=8)
    naive = drop_one_accuracy_naive(model, tok, df, labels, batch_size=8)
    assert cached.acc_before == naive.acc_before
    assert cached.table["acc_after_drop"].tolist() == naive.table["acc_after_drop"].tolist()
    np.testing.assert_allclose(cached.table["loss_after_drop"], naive.table["loss_after_drop"], rtol=1e-5)
    # The labels say something: not every removal leaves accuracy unchanged.
    assert cached.table["loss_after_drop"].nunique() > 1
    assert len(layer_list(model)) == 4 and model.config.num_hidden_layers == 4  # everything put back
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 4


def test_labels_on_a_trained_tiny_classifier(tmp_path):
    """Train the tiny sentiment model; dropping a layer can only be measured against the right labels."""
    from fusion_prune.data import load_dataset
    from fusion_prune.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    base = tmp_path / "base"
    T.BertModel(tiny_bert_config(layers=3)).save_pretrained(base)
    make_tokenizer(base).save_pretrained(base)
    sentiment_frame(300, 1).to_csv(tmp_path / "train.csv", index=False)
    sentiment_frame(80, 2).to_csv(tmp_path / "test.csv", index=False)
    data = load_dataset(str(tmp_path))
    finetune(str(base), data, FinetuneConfig(epochs=4, batch_size=16, lr=3e-3, max_length=16, progress=False),
             tmp_path / "clf")
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "clf")
    res = drop_one_accuracy(model, tok, data.test, data.labels, max_length=16)
    assert res.acc_before >= 0.95 and res.examples == 80
    assert res.table.columns.tolist() == ["layer", "orig_layer", "acc_after_drop", "loss_after_drop"]
    assert ((res.table.acc_after_drop >= 0) & (res.table.acc_after_drop <= 1)).all()


def test_labels_refuse_non_classifiers_and_single_layer():
    m = T.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with pytest.raises(BadInputError, match="must be a sequence classifier"):
        drop_one_accuracy(m, _IdTokenizer(), _frame(), ["a", "b", "c"])
    cfg = CONFIGS["bert"]()
    cfg.num_hidden_layers, cfg.num_labels = 1, 3
    with pytest.raises(BadInputError, match="has 1 layer"):
        drop_one_accuracy(T.AutoModelForSequenceClassification.from_config(cfg), _IdTokenizer(), _frame(),
                        ["LABEL_0", "LABEL_1", "LABEL_2"])


def test_recovered_labels_equal_drop_train_evaluate(tmp_path):
    """Each candidate: a copy without that layer, the same short fine-tune, then accuracy."""
    import copy

    from fusion_prune.data import load_dataset
    from fusion_prune.finetune import FinetuneConfig, evaluate, train
    from fusion_prune.training import make_accelerator
    from fusion_prune.dropone import drop_one_recovered
    from fusion_prune.models import load_classifier
    from fusion_prune.surgery import drop_layers

    torch.manual_seed(0)
    T.BertModel(tiny_bert_config(layers=2)).save_pretrained(tmp_path / "base")
    make_tokenizer(tmp_path / "base").save_pretrained(tmp_path / "base")
    sentiment_frame(120, 1).to_csv(tmp_path / "train.csv", index=False)
    sentiment_frame(40, 2).to_csv(tmp_path / "test.csv", index=False)
    data = load_dataset(str(tmp_path))
    model, tok, _ = load_classifier(str(tmp_path / "base"), data.labels)
    before = copy.deepcopy(model.state_dict())
    table = drop_one_recovered(model, tok, data.train, data.validation, data.labels, steps=3,
                                      batch_size=8, lr=1e-3, max_length=16, seed=5)
    assert list(table.columns) == ["layer", "orig_layer", "acc_after_recovery"] and len(table) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    by_hand = drop_layers(model, [1])
    cfg = FinetuneConfig(max_steps=3, batch_size=8, lr=1e-3, max_length=16, seed=5, warmup_ratio=0.0, progress=False)
    train(by_hand, tok, data.train, cfg, make_accelerator(cfg.mixed_precision))
    acc = evaluate(by_hand, tok, data.validation, data.labels, batch_size=16, max_length=16, progress=False)["accuracy"]
    assert table.acc_after_recovery.iloc[1] == acc
    with pytest.raises(BadInputError, match="'steps'"):
        drop_one_recovered(model, tok, data.train, data.validation, data.labels, steps=0)
