"""Corpora for language modelling and the token windows every causal-LM pass uses.

**Windows** (the perplexity protocol's unit, :mod:`fusion_prune.lm`): the split's texts are
joined with ``"\\n\\n"``, tokenised once without special tokens, and cut into non-overlapping
windows of ``max_length`` tokens (the last partial window is dropped). ``max_tokens`` caps the
windows at ``max_tokens // max_length``; when it does, only as many leading documents are joined
as the cap needs (about :data:`CHARS_PER_TOKEN` characters a token of headroom) before the one
tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from fusion_prune.errors import BadInputError

CHARS_PER_TOKEN = 8  # generous: English BPE averages about 4 characters a token
CORPUS_SUFFIXES = (".txt", ".md")


# --------------------------------------------------------------------------- corpora


@dataclass
class TextCorpus:
    """Three splits of documents (lists of str) for language modelling."""

    train: list[str]
    validation: list[str]
    test: list[str]
    spec: str
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[str]:
        return getattr(self, name)

    def content_hash(self) -> str:
        """SHA-256 of the three splits' documents: resume checks data, not paths."""
        import hashlib

        h = hashlib.sha256()
        for split in (self.train, self.validation, self.test):
            h.update(b"\x1e".join(t.encode() for t in split) + b"\x1d")
        return h.hexdigest()

    def summary(self) -> str:
        """One line for the start of a run: documents per split."""
        return (f"{self.spec}: train {len(self.train):,}, validation {len(self.validation):,}, test "
                f"{len(self.test):,} documents")

    def describe(self) -> dict:
        return {"spec": self.spec, "train_documents": len(self.train), "validation_documents": len(self.validation),
                "test_documents": len(self.test), "notes": self.notes}


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def read_corpus_documents(spec: str, text_column: str = "text") -> tuple[dict[str, list[str]], list[str]]:
    """({split: documents}, notes) of a corpus spec, before any split is carved.

    A ``.txt``/``.md`` file is split into paragraphs (blank lines); a folder of such files gives
    one document per file; anything :func:`fusion_prune.data.load_dataset` reads (asset, CSV,
    JSON, parquet, train/test folder, save_to_disk folder, hub name) gives its ``text_column``,
    and labels are not needed. Null and blank texts are dropped (counted in the notes).
    """
    from fusion_prune import data as D

    path = Path(spec).expanduser()
    notes: list[str] = []
    if path.is_file() and path.suffix.lower() in CORPUS_SUFFIXES:
        return {"train": _paragraphs(path.read_text(errors="replace"))}, [f"{path.name}: one document a paragraph"]
    if path.is_dir() and not any((path / f"train{s}").exists() for s in D.FILE_SUFFIXES) \
            and not (path / "dataset_dict.json").exists() and not (path / "state.json").exists():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        if not files:
            raise BadInputError(f"The dataset folder {spec!r} holds no .txt files nor train.* files; expected a "
                                "text corpus.")
        return {"train": [p.read_text(errors="replace").strip() for p in files]}, \
            [f"{len(files)} text files, one document each"]
    raw = D._read_spec(spec, notes)
    out = {}
    for split, df in raw.items():
        if text_column not in df.columns:
            raise BadInputError(f"The text_column {text_column!r} is not a column of the {split!r} split of "
                                f"{spec!r}; expected one of {list(map(str, df.columns))}.")
        col = df[text_column]
        texts = [str(t) for t in col[col.notna()]]
        kept = [t for t in texts if t.strip()]
        if len(kept) < len(col):
            notes.append(f"{split}: dropped {len(col) - len(kept)} null or blank texts")
        out[split] = kept
    return out, notes


def load_corpus(spec: str, text_column: str = "text", validation_fraction: float = 0.1,
                test_fraction: float = 0.2, seed: int = 0) -> TextCorpus:
    """Load ``spec`` as a :class:`TextCorpus`; missing test/validation splits are carved from train
    by documents (shuffled with ``seed``), so nothing is chosen by looking at test."""
    docs, notes = read_corpus_documents(spec, text_column)
    if not docs.get("train"):
        raise BadInputError(f"The dataset {spec!r} has no training texts; expected a corpus with at least 3 documents.")
    rng = np.random.default_rng(seed)

    def carve(items: list[str], frac: float) -> tuple[list[str], list[str]]:
        if len(items) < 2:
            raise BadInputError(f"The dataset {spec!r} has {len(items)} document(s) to split; expected at least 3.")
        order = rng.permutation(len(items))
        k = max(1, int(round(len(items) * frac)))
        return [items[i] for i in sorted(order[k:])], [items[i] for i in sorted(order[:k])]

    train = docs["train"]
    test = docs.get("test")
    if not test:
        train, test = carve(train, test_fraction)
        notes.append(f"test: {test_fraction:.0%} of the documents, seed {seed}")
    validation = docs.get("validation")
    if not validation:
        train, validation = carve(train, validation_fraction)
        notes.append(f"validation: {validation_fraction:.0%} of the train documents, seed {seed}")
    return TextCorpus(train, validation, test, spec, notes)


# --------------------------------------------------------------------------- windows


def token_windows(tokenizer, texts: Sequence[str], length: int, max_tokens: int | None = None,
                  what: str = "split") -> torch.Tensor:
    """Non-overlapping windows (N, length) of the joined, once-tokenised ``texts`` (module docstring)."""
    if length < 2:
        raise BadInputError(f"The 'max_length' parameter must be at least 2 for a causal LM. Got {length}.")
    if max_tokens is not None and max_tokens < length:
        raise BadInputError(f"The 'max_eval_tokens' parameter must be at least one window ({length} tokens). "
                            f"Got {max_tokens}.")
    texts = list(texts)
    if max_tokens is not None:  # join only the leading documents the cap needs
        budget, chars, k = max_tokens * CHARS_PER_TOKEN, 0, 0
        while k < len(texts) and chars < budget:
            chars += len(texts[k]) + 2
            k += 1
        texts = texts[:k]
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // length
    if max_tokens is not None:
        n = min(n, max_tokens // length)
    if n == 0:
        raise BadInputError(f"The {what} has {len(ids)} tokens, fewer than one window of max_length={length}; "
                            "expected a larger corpus or a smaller --max-length.")
    return torch.as_tensor(ids[: n * length], dtype=torch.long).view(n, length)


def mix_count(n: int, share: float) -> int:
    """How many general windows join ``n`` corpus windows to make ``share`` of the result."""
    if not 0 <= share < 1:
        raise BadInputError(f"The 'heal_mix_share' parameter must be in [0, 1). Got {share}.")
    return round(n * share / (1 - share))


def mix_windows(windows: torch.Tensor, general: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """``windows`` (N, T) with windows of ``general`` (M, T) added so that they are ``share`` of the
    result: the zero-shot guard of healing (a narrow corpus alone costs general ability). The
    general windows are a seeded sample (without replacement while ``general`` has enough; all of
    them, then drawn again, when not)."""
    n = mix_count(len(windows), share)
    if general.shape[1] != windows.shape[1]:
        raise ValueError(f"window lengths differ: {windows.shape[1]} and {general.shape[1]}")
    if n == 0:
        return windows
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(len(general), generator=g) for _ in range(-(-n // len(general)))]
    return torch.cat([windows, general[torch.cat(picks)[:n]]])


def window_loader(windows: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of ``input_ids``/``attention_mask`` (B, T) and ``index`` (B,) from token windows (N, T)."""

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        ids = windows[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.as_tensor(idx)}

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(list(range(len(windows))), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=collate)


def window_batches(windows: torch.Tensor, batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """All windows as batches on ``device`` (no ``index``): for signals and labels."""
    out = []
    for b in window_loader(windows, batch_size):
        b.pop("index")
        out.append({k: v.to(device) for k, v in b.items()})
    return out
