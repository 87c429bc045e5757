"""Dataset specs: every file format, folders, save_to_disk, and every input error."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fusion_prune.data import load_dataset
from fusion_prune.errors import BadInputError

from conftest import sentiment_frame


def _check(ds, n_total):
    assert ds.labels == ["neg", "pos"]
    assert len(ds.train) + len(ds.validation) + len(ds.test) == n_total
    for split in (ds.train, ds.validation, ds.test):
        assert list(split.columns) == ["text", "label"]
        assert set(split["label"]) <= {0, 1}
        assert len(split) > 0


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_single_file_each_format(tmp_path, suffix):
    df = sentiment_frame(100)
    path = tmp_path / f"data{suffix}"
    {".csv": lambda: df.to_csv(path, index=False),
     ".tsv": lambda: df.to_csv(path, sep="\t", index=False),
     ".json": lambda: df.to_json(path, orient="records"),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    ds = load_dataset(str(path))
    _check(ds, 100)
    # A single file is split into test (20%) and validation (10% of the rest), stratified.
    assert len(ds.test) == 20 and len(ds.validation) == 8
    assert any("test:" in n for n in ds.notes) and any("validation:" in n for n in ds.notes)


def test_json_lines_with_json_suffix(tmp_path):
    path = tmp_path / "data.json"
    sentiment_frame(50).to_json(path, orient="records", lines=True)
    _check(load_dataset(str(path)), 50)


def test_folder_train_test_carves_validation_from_train(tmp_path):
    sentiment_frame(80, seed=1).to_csv(tmp_path / "train.csv", index=False)
    sentiment_frame(20, seed=2).to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    ds = load_dataset(str(tmp_path))
    _check(ds, 100)
    assert len(ds.test) == 20 and len(ds.validation) == 8 and len(ds.train) == 72


def test_folder_with_validation_split_is_used_as_is(tmp_path):
    for name, n in (("train", 60), ("validation", 10), ("test", 30)):
        sentiment_frame(n, seed=n).to_parquet(tmp_path / f"{name}.parquet")
    ds = load_dataset(str(tmp_path))
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (60, 10, 30)
    assert ds.notes == []


def test_validation_carving_is_deterministic(tmp_path):
    sentiment_frame(100).to_csv(tmp_path / "d.csv", index=False)
    a, b = load_dataset(str(tmp_path / "d.csv")), load_dataset(str(tmp_path / "d.csv"))
    pd.testing.assert_frame_equal(a.validation, b.validation)
    c = load_dataset(str(tmp_path / "d.csv"), seed=1)
    assert not a.validation.equals(c.validation)


def test_save_to_disk_folder_with_classlabel(tmp_path):
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "y": datasets.ClassLabel(names=["neg", "pos"])})
    df = sentiment_frame(60)
    rows = {"sentence": df["text"].tolist(), "y": [1 if v == "pos" else 0 for v in df["label"]]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats),
                               "test": datasets.Dataset.from_dict(rows, features=feats).select(range(20))})
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(str(tmp_path / "saved"), text_column="sentence", label_column="y")
    assert ds.labels == ["neg", "pos"]  # ClassLabel ids become their names
    assert len(ds.test) == 20


def test_custom_columns_and_numeric_labels(tmp_path):
    df = pd.DataFrame({"body": [f"t{i}" for i in range(60)], "cls": [i % 3 * 5 for i in range(60)]})
    df.to_csv(tmp_path / "d.csv", index=False)
    ds = load_dataset(str(tmp_path / "d.csv"), text_column="body", label_column="cls")
    assert ds.labels == ["0", "5", "10"]  # numeric names sort numerically
    assert ds.label2id == {"0": 0, "5": 1, "10": 2}


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.csv"))


def test_missing_column_names_present_columns(tmp_path):
    sentiment_frame(20).rename(columns={"text": "review"}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(BadInputError, match=r"text_column 'text'.*expected one of \['review', 'label'\]"):
        load_dataset(str(tmp_path / "d.csv"))
    with pytest.raises(BadInputError, match=r"label_column 'stars'"):
        load_dataset(str(tmp_path / "d.csv"), text_column="review", label_column="stars")


def test_fewer_than_two_classes(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["x"] * 4}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(BadInputError, match="expected at least 2"):
        load_dataset(str(tmp_path / "d.csv"))


def test_empty_split(tmp_path):
    sentiment_frame(40).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"text": [], "label": []}).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(BadInputError, match="'test' split .* is empty"):
        load_dataset(str(tmp_path))


def test_test_labels_unseen_in_train(tmp_path):
    sentiment_frame(40).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"text": ["x", "y"], "label": ["pos", "mystery"]}).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(BadInputError, match="labels never seen in train: 'mystery'"):
        load_dataset(str(tmp_path))


def test_unsupported_suffix_and_folder_without_train(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(BadInputError, match="expected one of"):
        load_dataset(str(tmp_path / "d.xlsx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no train"):
        load_dataset(str(tmp_path / "empty"))


def test_model_asset_is_not_a_dataset():
    with pytest.raises(BadInputError, match="names the model asset 'minilm-l6'; expected a dataset"):
        load_dataset("minilm-l6")


def test_unreachable_hub_name_is_bad_input(monkeypatch):
    import datasets.config

    # datasets reads the environment once, at import: set its flag itself so nothing waits on a network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(BadInputError, match="neither an asset"):
        load_dataset("surely-not-a-dataset-xyz")


def test_split_name_is_checked(tmp_path):
    sentiment_frame(40).to_csv(tmp_path / "d.csv", index=False)
    ds = load_dataset(str(tmp_path / "d.csv"))
    with pytest.raises(BadInputError, match="'split' parameter must be one of"):
        ds.split("dev")
    assert json.dumps(ds.describe())  # serialisable for run records


def test_the_summary_line_gives_split_sizes_and_the_majority_share(sentiment_csv_dir):
    ds = load_dataset(str(sentiment_csv_dir))
    line = ds.summary()
    share = ds.validation["label"].value_counts(normalize=True).max()
    assert f"train {len(ds.train):,}, validation {len(ds.validation):,}, test {len(ds.test):,} examples" in line
    assert f"is {share:.1%} of validation" in line and line.startswith(f"{ds.spec}: 2 labels")


# --------------------------------------------------------------------------- length-grouped batches

def _varied_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Sentences of 1 to 40 words (labels alternate), so that padding matters."""
    import random

    from conftest import FILLER

    rng = random.Random(seed)
    return pd.DataFrame({"text": [" ".join(rng.choices(FILLER, k=rng.randint(1, 40))) for _ in range(n)],
                         "label": [i % 2 for i in range(n)]})


def _padded_tokens(loader) -> int:
    return sum(b["input_ids"].numel() for b in loader)


def test_length_grouped_training_batches_cover_every_row_once_per_epoch_with_little_padding(tmp_path):
    from fusion_prune.data import make_loader

    from conftest import make_tokenizer

    tok, df = make_tokenizer(tmp_path), _varied_frame()
    grouped = make_loader(df, tok, 16, 64, shuffle=True, seed=3, with_index=True, group_by_length=True)
    epochs = [[b["index"].tolist() for b in grouped] for _ in range(2)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(len(df)))
        assert len(batches) == len(grouped) == 19
    assert epochs[0] != epochs[1]  # a new order every epoch
    plain = make_loader(df, tok, 16, 64, shuffle=True, seed=3)
    real = sum(b["attention_mask"].sum().item() for b in grouped)
    assert real < _padded_tokens(grouped) < 0.85 * _padded_tokens(plain)
    # a window as wide as transformers' (50 batches) leaves almost no padding
    from fusion_prune.data import LengthGroupedBatches, token_lengths

    lengths = token_lengths(df["text"].tolist(), tok, 64)
    wide = list(LengthGroupedBatches(lengths, 16, seed=3, window=50))
    assert sum(int(lengths[b].max()) * len(b) for b in wide) < 1.1 * real
    # the same seed gives the same batches
    again = make_loader(df, tok, 16, 64, shuffle=True, seed=3, with_index=True, group_by_length=True)
    assert [b["index"].tolist() for b in again] == epochs[0]


def test_length_grouped_evaluation_batches_are_longest_first_and_give_row_order_back(tmp_path):
    import torch
    from transformers import BertForSequenceClassification

    from fusion_prune.data import make_loader
    from fusion_prune.finetune import predict

    from conftest import make_tokenizer, tiny_bert_config

    tok, df = make_tokenizer(tmp_path), _varied_frame(120)
    batches = list(make_loader(df, tok, 16, 64, with_index=True, group_by_length=True))
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    with torch.no_grad():  # one row at a time: no padding, the reference order
        one = [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in df["text"]]
    assert predict(model, tok, df, batch_size=16, max_length=64).tolist() == one
