"""Causal language models: corpora, the perplexity protocol, zero-shot scoring, LoRA healing, KD.

**Perplexity protocol** (one, fixed; numbers are comparable only within it): the split's texts
are joined with ``"\\n\\n"``, tokenised once without special tokens, and cut into non-overlapping
windows of ``max_length`` tokens (the last partial window is dropped). Each window is scored on
its own, without BOS; position ``t`` predicts token ``t + 1``, so a window predicts
``max_length - 1`` tokens. Perplexity = exp(total next-token NLL / predicted tokens).
``max_tokens`` caps the windows at ``max_tokens // max_length``; when it does, only as many
leading documents are joined as the cap needs (about :data:`CHARS_PER_TOKEN` characters a token
of headroom) before the one tokenisation.

**Zero-shot accuracy** is scored the way lm-evaluation-harness scores multiple choice: for each
example the log-likelihood of each class's verbaliser (``" " + label name`` unless overridden)
after the prompt, summed over the verbaliser's tokens; the highest wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from fusion_prune.errors import BadInputError

CHARS_PER_TOKEN = 8  # generous: English BPE averages about 4 characters a token
DEFAULT_PROMPT = "{text}\nAnswer:"
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


# --------------------------------------------------------------------------- windows and perplexity


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


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> dict:
    """``{"perplexity", "nll", "tokens", "windows", "eval_seconds"}`` of ``model`` on windows (N, T)."""
    from tqdm.auto import tqdm

    from fusion_prune.labels import _takes_cache, next_token_score

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kw = {"use_cache": False} if _takes_cache(model) else {}
    nll = tokens = 0.0
    t0 = time.perf_counter()
    try:
        for b in tqdm(window_batches(windows, batch_size, device), desc="perplexity", disable=not progress,
                      dynamic_ncols=True):
            _, s, n = next_token_score(model(**b, **kw).logits, b)
            nll, tokens = nll + s, tokens + n
    finally:
        model.train(was_training)
    mean = nll / max(tokens, 1)
    if not math.isfinite(mean):
        raise BadInputError("The model's next-token NLL is not finite; expected finite weights (check for NaN).")
    return {"perplexity": float(math.exp(min(mean, 700.0))), "nll": float(mean), "tokens": int(tokens),
            "windows": int(len(windows)), "eval_seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- zero-shot


def parse_verbalisers(text: str | None, labels: Sequence[str]) -> list[str]:
    """Verbaliser per class: ``" " + name`` by default; ``"fresh=positive,rotten=negative"`` overrides."""
    out = {name: " " + name for name in labels}
    if text:
        for part in text.split(","):
            if "=" not in part:
                raise BadInputError(f"The '--verbalisers' option must be LABEL=WORD pairs separated by commas. "
                                    f"Got {text!r}.")
            k, v = part.split("=", 1)
            if k not in out:
                raise BadInputError(f"The '--verbalisers' option names label {k!r}; expected one of {list(labels)}.")
            out[k] = v if v.startswith(" ") else " " + v
    return [out[n] for n in labels]


@torch.no_grad()
def zero_shot(model, tokenizer, df: pd.DataFrame, labels: Sequence[str], prompt: str = DEFAULT_PROMPT,
              verbalisers: Sequence[str] | None = None, max_length: int = 256, batch_size: int = 8,
              progress: bool = False) -> dict:
    """Zero-shot accuracy of a causal LM on a labelled frame (``text``, ``label`` ids).

    Each example's prompt (``prompt.format(text=...)``, its text cut from the left to fit
    ``max_length`` with the longest verbaliser) is followed by each verbaliser; the class whose
    verbaliser tokens have the highest summed log-probability wins. When every verbaliser is one
    token, one forward per example serves all classes.
    """
    from tqdm.auto import tqdm

    if "{text}" not in prompt:
        raise BadInputError(f"The '--prompt' option must contain '{{text}}'. Got {prompt!r}.")
    verbalisers = list(verbalisers or [" " + n for n in labels])
    verb_ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalisers]
    if any(len(v) == 0 for v in verb_ids):
        raise BadInputError(f"The verbalisers {verbalisers} include one that tokenises to nothing.")
    room = max_length - max(len(v) for v in verb_ids)
    if room < 2:
        raise BadInputError(f"The 'max_length' parameter {max_length} leaves no room for a prompt.")
    prompts = [tokenizer(prompt.format(text=t), add_special_tokens=False)["input_ids"][-room:] for t in df["text"]]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    single = all(len(v) == 1 for v in verb_ids)
    scores = np.zeros((len(df), len(verbalisers)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    # Every (example, class) sequence, or every example alone when one forward serves all classes.
    jobs = [(i, None) for i in range(len(df))] if single else \
        [(i, c) for i in range(len(df)) for c in range(len(verbalisers))]
    try:
        for start in tqdm(range(0, len(jobs), batch_size), desc="zero-shot", disable=not progress,
                          dynamic_ncols=True):
            chunk = jobs[start:start + batch_size]
            seqs = [prompts[i] + ([] if c is None else verb_ids[c]) for i, c in chunk]
            T = max(map(len, seqs))
            ids = torch.full((len(seqs), T), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(seqs):  # right padding: causal positions of real tokens are unchanged
                ids[r, :len(s)] = torch.as_tensor(s)
                mask[r, :len(s)] = 1
            logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            for r, (i, c) in enumerate(chunk):
                p = len(prompts[i])
                if c is None:
                    scores[i] = [float(logp[r, p - 1, v[0]]) for v in verb_ids]
                else:
                    v = verb_ids[c]
                    scores[i, c] = float(sum(logp[r, p - 1 + j, tok] for j, tok in enumerate(v)))
    finally:
        model.train(was_training)
    pred = scores.argmax(1)
    gold = df["label"].to_numpy()
    return {"accuracy": float((pred == gold).mean()) if len(gold) else float("nan"), "examples": int(len(gold)),
            "majority_share": float(np.bincount(gold).max() / len(gold)) if len(gold) else float("nan"),
            "prompt": prompt, "verbalisers": verbalisers, "eval_seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- healing and distillation


@dataclass
class HealConfig:
    """Healing after the layers are gone: LoRA (merged afterwards), QLoRA (LoRA on a 4-bit NF4 copy
    of the base, merged into the full-precision weights), full fine-tuning, or none."""

    method: str = "lora"  # "lora", "qlora", "full" or "none"
    steps: int = 60
    batch_size: int = 4
    lr: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # or comma-separated module names, e.g. q_proj,v_proj
    # distillation from the teacher's logits during healing: 0 = plain next-token loss
    kd_weight: float = 0.0
    temperature: float = 2.0
    # 0: the teacher runs beside each step (full-vocabulary KL); k > 0: its top-k logits per position
    # are cached once before training (distill.teacher_topk_logits) and the KL is taken over them
    kd_top_k: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from fusion_prune.errors import bad_choice

        from fusion_prune.params import validate

        if self.method not in HEAL_METHODS:
            raise bad_choice("heal", self.method, HEAL_METHODS)
        validate(self)  # ranges in fusion_prune/params.py


HEAL_METHODS = ("lora", "qlora", "full", "none")


def _lora(model, cfg: HealConfig):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        first = str(e).strip().splitlines()[0]
        raise BadInputError(f"The '--lora-targets' option {cfg.target_modules!r} does not match modules of "
                            f"{type(model).__name__}: {first}") from e


def _quantised_copy(model, progress: bool = True):
    """A 4-bit NF4 copy of ``model`` (bitsandbytes, double quantisation, as QLoRA quantises its base)
    on the model's device, prepared for adapter training; ``model`` itself is left as it is."""
    import tempfile

    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:  # probed, not imported: transformers imports it
        raise BadInputError("The '--heal' option 'qlora' needs bitsandbytes, which is not installed: "
                            "pip install 'fusionprune[qlora]' (or choose --heal lora)")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    device = next(model.parameters()).device
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    # Through a saved copy: transformers quantises while it loads, and the saved folder is the
    # same plain one the output becomes (the surgery already renumbered the layers).
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="fusionprune-qlora-") as tmp:
            model.save_pretrained(tmp)
            q = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qcfg, dtype=torch.float32,
                                                     device_map={"": device.index if device.type == "cuda" else "cpu"})
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)


def _merge_adapters(student, trained, cfg: HealConfig):
    """``student`` with the LoRA adapters of ``trained`` (a peft model on its quantised copy) merged
    into its full-precision weights: a plain model of the student's class."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapters = {k: v.detach().float() for k, v in get_peft_model_state_dict(trained, save_embedding_layers=False).items()}
    merged = _lora(student, cfg)  # the same adapter placement on the full-precision modules
    result = set_peft_model_state_dict(merged, adapters)
    if result.unexpected_keys:  # a trained adapter with no full-precision module to merge into
        raise RuntimeError(f"QLoRA adapters without a full-precision module: {result.unexpected_keys[:3]}")
    return merged.merge_and_unload()


def heal(student, windows: torch.Tensor, cfg: HealConfig, teacher=None) -> tuple[nn.Module, dict]:
    """Train ``student`` on token windows (N, T) for ``cfg.steps``; returns (model, stats).

    LoRA adapters are merged into the weights before returning, so the result is a plain model
    of the input's class (the input module itself is trained in place and may be the result).
    QLoRA trains the adapters on a 4-bit NF4 copy of ``student`` (whose own weights wait on the CPU
    meanwhile, so that the accelerator holds the 4-bit base only) and merges them into
    ``student``'s full-precision weights, as the QLoRA paper deploys; the merged model is not the
    one the adapters were trained against, so measure it after healing (``compress`` does).
    With ``cfg.kd_weight > 0`` the loss is ``(1 - w) * next-token CE + w * T^2 KL(teacher || student)``
    over the vocabulary at every position, the teacher running beside each step; with
    ``cfg.kd_top_k = k`` the teacher's top-k logits and its mass outside them are cached first and
    the KL is taken over those k + 1 bins (:func:`distill.losses.topk_next_token_kl`).
    """
    from distill.losses import next_token_kl, topk_next_token_kl
    from distill.trainer import teacher_topk_logits
    from fusion_prune.training import loss_summary, make_accelerator, run_steps
    from fusion_prune.utils import set_seed
    from signals.capture import task_loss

    if cfg.method == "none" or cfg.steps == 0:
        return student, {"method": "none", "steps": 0}
    if cfg.kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher")
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    device = next(student.parameters()).device
    if cfg.method == "qlora":
        model = _lora(_quantised_copy(student, cfg.progress), cfg)
        student.to("cpu")
    else:
        model = _lora(student, cfg) if cfg.method == "lora" else student
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator = make_accelerator()
    cache, kd_stats = None, {}
    if teacher is not None:
        teacher.eval()
    if cfg.kd_weight and cfg.kd_top_k:
        # Cache only what the steps can visit: a seeded sample of steps * batch windows (all when
        # fewer), which the loader below then shuffles, as it shuffles the whole set without a cache.
        visit = cfg.steps * cfg.batch_size
        if visit < len(windows):
            pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))[:visit]
            windows = windows[pick.sort().values]
        t1 = time.perf_counter()
        cache = teacher_topk_logits(teacher, windows, cfg.kd_top_k, cfg.batch_size,
                                    next(teacher.parameters()).device, temperature=cfg.temperature)
        kd_stats = {"teacher_logits": "top-k cached", "top_k": cache[0].shape[-1],
                    "cache_bytes": int(cache[0].numel() * 2 + cache[1].numel() * 4 + cache[2].numel() * 4),
                    "cache_seconds": round(time.perf_counter() - t1, 2)}
    elif cfg.kd_weight:
        kd_stats = {"teacher_logits": "computed beside each step"}

    def compute_loss(m, batch):
        index = batch.pop("index")
        out = m(**batch, use_cache=False)
        logits = out.logits
        loss, _ = task_loss(m, out, batch)  # mean next-token cross-entropy
        if cache is not None:
            # the cache lies on the CPU, the prepared batch (index too) on the accelerator
            values, ids, tail = (c[index.cpu()].to(logits.device) for c in cache)
            kd = topk_next_token_kl(logits, values, ids, cfg.temperature, teacher_log_tail=tail)
            loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd
        elif cfg.kd_weight:
            with torch.no_grad():
                t = teacher(**batch, use_cache=False).logits
            loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * next_token_kl(logits, t, cfg.temperature)
        return loss

    loader = window_loader(windows, cfg.batch_size, shuffle=True, seed=cfg.seed)
    cuda = device.type == "cuda"
    if cuda:  # the training steps' peak: for QLoRA the 4-bit base, not the copy it was made from
        torch.cuda.reset_peak_memory_stats(device)
    losses, _ = run_steps(model, loader, compute_loss, accelerator, epochs=1.0, max_steps=cfg.steps, lr=cfg.lr,
                          weight_decay=0.0, warmup_ratio=0.05, grad_clip=1.0, progress=cfg.progress,
                          desc=f"heal ({cfg.method}{', KD' if cfg.kd_weight else ''})")
    memory = {"gpu_peak_bytes": int(torch.cuda.max_memory_allocated(device))} if cuda else {}
    model = accelerator.unwrap_model(model)
    if cfg.method == "lora":
        model = model.merge_and_unload()
    elif cfg.method == "qlora":
        model = _merge_adapters(student, model, cfg).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"method": cfg.method, "steps": len(losses), "trainable_parameters": int(trainable),
                   "tokens_seen": int(len(losses) * cfg.batch_size * windows.shape[1]), **loss_summary(losses),
                   **kd_stats, **memory,
                   "seconds": round(time.perf_counter() - t0, 2), "config": asdict(cfg)}
