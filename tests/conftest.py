"""Shared fixtures: a tiny BERT built from a config (no downloads) and a tiny separable corpus."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest

# Under pytest-xdist (`make test` runs one worker per core) each worker, and every CLI subprocess it
# starts, computes on one thread: two workers with a thread per core each would oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WORDS_POS = ["good", "great", "fine", "nice", "happy"]
WORDS_NEG = ["bad", "awful", "poor", "sad", "ugly"]
FILLER = ["the", "a", "movie", "film", "was", "is", "plot", "actor"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS_POS, *WORDS_NEG, *FILLER]


def make_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 takes the vocabulary itself (a dict), not a vocab file path.
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


def tiny_bert_config(num_labels: int | None = None, layers: int = 2):
    from transformers import BertConfig

    kw = {} if num_labels is None else {"num_labels": num_labels}
    return BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def sentiment_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` short sentences; the label is the polarity of the one sentiment word in each."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(WORDS_POS if label == "pos" else WORDS_NEG)
        words = rng.sample(FILLER, 3) + [word]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A saved base BertModel (no head) with its tokenizer: the stand-in for a pretrained encoder."""
    import torch
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_csv_dir(tmp_path_factory) -> Path:
    """A folder with train.csv (400 rows) and test.csv (100 rows) of the tiny sentiment task."""
    folder = tmp_path_factory.mktemp("sentiment")
    sentiment_frame(400, seed=1).to_csv(folder / "train.csv", index=False)
    sentiment_frame(100, seed=2).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Point the asset cache at an empty temporary folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("FUSIONPRUNE_HOME", str(home))
    return home


def train_tiny_classifier(root: Path, data_dir: Path, layers: int) -> Path:
    """A tiny BERT of ``layers`` layers fine-tuned on the tiny sentiment task, saved in ``root/teacher``."""
    import torch
    from transformers import BertModel

    from fusion_prune.data import load_dataset
    from fusion_prune.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    BertModel(tiny_bert_config(layers=layers)).save_pretrained(root / "base")
    make_tokenizer(root / "base").save_pretrained(root / "base")
    finetune(str(root / "base"), load_dataset(str(data_dir)),
             FinetuneConfig(epochs=4, batch_size=16, lr=3e-3, max_length=16, progress=False), root / "teacher")
    return root / "teacher"


@pytest.fixture(scope="session")
def bundle_path(tmp_path_factory) -> Path:
    """A random-forest fusion bundle fitted on synthetic rows."""
    from fusion_prune.fusion import fit_bundle
    from test_fusion import synthetic_rows

    return fit_bundle(synthetic_rows(), "rf").save(tmp_path_factory.mktemp("bundle") / "f.npz")
