"""Causal-LM evaluation: the perplexity protocol and zero-shot accuracy.

**Perplexity protocol** (one, fixed; numbers are comparable only within it): token windows of
``max_length`` (:func:`fusion_prune.corpus.token_windows`), each scored on its own, without BOS;
position ``t`` predicts token ``t + 1``, so a window predicts ``max_length - 1`` tokens.
Perplexity = exp(total next-token NLL / predicted tokens).

**Zero-shot accuracy** is scored the way lm-evaluation-harness scores multiple choice: for each
example the log-likelihood of each class's verbaliser (``" " + label name`` unless overridden)
after the prompt, summed over the verbaliser's tokens; the highest wins.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from fusion_prune.corpus import window_batches
from fusion_prune.errors import BadInputError
from fusion_prune.logits import forward_hidden

DEFAULT_PROMPT = "{text}\nAnswer:"


def zero_shot_defaults(dataset: str, prompt: str | None = None, verbalisers: str | None = None) -> tuple[str, str | None]:
    """(prompt, verbalisers) for zero-shot scoring of ``dataset``: each given one as it is, each
    missing one from the asset's registered pair (rotten-tomatoes: a review prompt, fresh=positive,
    rotten=negative), else :data:`DEFAULT_PROMPT` and ``" " + label name``."""
    from fusion_prune.assets import ASSETS

    asset = ASSETS.get(dataset)
    own_prompt, own_words = asset.zero_shot if asset is not None and asset.zero_shot else (DEFAULT_PROMPT, None)
    return prompt or own_prompt, verbalisers or own_words


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
               finite: bool = True) -> dict:
    """``{"perplexity", "nll", "tokens", "windows", "eval_seconds"}`` of ``model`` on windows (N, T).
    A non-finite NLL is refused unless ``finite`` is False (a check during training, which counts
    it as no gain, rather than ending hours of work)."""
    from tqdm.auto import tqdm

    from fusion_prune.dropone import next_token_score

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll = tokens = 0.0
    t0 = time.perf_counter()
    try:
        for b in tqdm(window_batches(windows, batch_size, device), desc="perplexity", disable=not progress,
                      dynamic_ncols=True):
            _, s, n = next_token_score(model, b, b)  # without a KV cache (fusion_prune.logits)
            nll, tokens = nll + s, tokens + n
    finally:
        model.train(was_training)
    mean = nll / max(tokens, 1)
    if finite and not math.isfinite(mean):
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


def _right_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T) of token lists, right-padded: the causal
    positions of real tokens are unchanged."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


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
            ids, mask = _right_padded(seqs, pad)
            states, head, _ = forward_hidden(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
            # The vocabulary's log-probabilities only where a verbaliser token is predicted: (N, V).
            where = [(r, len(prompts[i]) - 1 + j) for r, (i, c) in enumerate(chunk)
                     for j in range(1 if c is None else len(verb_ids[c]))]
            rows, cols = (torch.as_tensor(x, device=device) for x in zip(*where))
            logp = dict(zip(where, head(states[rows, cols]).float().log_softmax(-1)))
            for r, (i, c) in enumerate(chunk):
                p = len(prompts[i])
                if c is None:
                    scores[i] = [float(logp[r, p - 1][v[0]]) for v in verb_ids]
                else:
                    v = verb_ids[c]
                    scores[i, c] = float(sum(logp[r, p - 1 + j][tok] for j, tok in enumerate(v)))
    finally:
        model.train(was_training)
    pred = scores.argmax(1)
    gold = df["label"].to_numpy()
    return {"accuracy": float((pred == gold).mean()) if len(gold) else float("nan"), "examples": int(len(gold)),
            "majority_share": float(np.bincount(gold).max() / len(gold)) if len(gold) else float("nan"),
            "prompt": prompt, "verbalisers": verbalisers, "eval_seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- the zero-shot guard


def zero_shot_batches(tokenizer, df: pd.DataFrame, labels: Sequence[str], prompt: str,
                      verbalisers: Sequence[str] | None, max_length: int = 256, batch_size: int = 8,
                      device=None, by_length: bool = False) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Prompts of a labelled frame as batches for :func:`zero_shot_scorer`, and each class's
    verbaliser token (its first, when it has several). ``by_length``: batch prompts of similar
    length together (in the frame's order otherwise): a scorer's sums do not depend on the order,
    and the padding does (rotten-tomatoes reviews: 40% fewer tokens).

    Each batch: ``input_ids`` and ``attention_mask`` (B, T), right-padded, and ``labels`` (B, 2):
    the gold class and the position of the prompt's last token (where the verbaliser is predicted).
    """
    if "{text}" not in prompt:
        raise BadInputError(f"The '--prompt' option must contain '{{text}}'. Got {prompt!r}.")
    verbalisers = list(verbalisers or [" " + n for n in labels])
    first = [tokenizer(v, add_special_tokens=False)["input_ids"][:1] for v in verbalisers]
    if any(not f for f in first) or len({f[0] for f in first}) < len(first):
        raise BadInputError(f"The verbalisers {verbalisers} must start with distinct tokens to guard a choice; "
                            f"got first tokens {first}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [tokenizer(prompt.format(text=t), add_special_tokens=False)["input_ids"][-(max_length - 1):]
               for t in df["text"]]
    gold = df["label"].to_numpy()
    if by_length:
        order = np.argsort([len(p) for p in prompts], kind="stable")
        prompts, gold = [prompts[i] for i in order], gold[order]
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = _right_padded(chunk, pad)
        lab = torch.as_tensor([[int(g), len(s) - 1] for g, s in zip(gold[start:start + batch_size], chunk)])
        batches.append({k: v.to(device) for k, v in
                        {"input_ids": ids, "attention_mask": mask, "labels": lab}.items()})
    return batches, [f[0] for f in first]


def verbaliser_logits(model, inputs: dict, last: torch.Tensor, verbaliser_ids: Sequence[int]) -> torch.Tensor:
    """Logits (B, classes), float32, of each class's verbaliser token at position ``last`` (B,) of
    each prompt (a :func:`zero_shot_batches` batch's ``labels[:, 1]``); ``inputs`` go to the model
    as they are. Differentiable: the healing's guard trains on them."""
    states, head, _ = forward_hidden(model, inputs)
    rows = torch.arange(len(last), device=last.device)
    return head(states[rows, last]).float()[:, torch.as_tensor(list(verbaliser_ids), device=states.device)]


def batch_verbaliser_logits(model, batch: dict, verbaliser_ids: Sequence[int]) -> torch.Tensor:
    """:func:`verbaliser_logits` (B, classes) of a :func:`zero_shot_batches` batch, at each prompt's last token."""
    return verbaliser_logits(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"][:, 1],
                             verbaliser_ids)


def zero_shot_scorer(verbaliser_ids: Sequence[int]):
    """A drop-one scorer (:data:`fusion_prune.dropone.Scorer`) of zero-shot batches: correct
    answers, summed cross-entropy of the gold class among the verbalisers (their log-probabilities
    renormalised), and examples. The loss is the smooth form of the accuracy :func:`zero_shot`
    reports (the same argmax when every verbaliser is one token)."""

    def score(model, inputs: dict, batch: dict) -> tuple[float, float, int]:
        gold, last = batch["labels"].unbind(-1)
        rows = torch.arange(len(gold), device=gold.device)
        logp = verbaliser_logits(model, inputs, last, verbaliser_ids).log_softmax(-1)
        return (float((logp.argmax(-1) == gold).sum()), float(-logp[rows, gold].sum()), len(gold))

    return score


@torch.no_grad()
def answers(model, batches: Sequence[dict], verbaliser_ids: Sequence[int]) -> list[torch.Tensor]:
    """``model``'s verbaliser logits (B, classes) on each :func:`zero_shot_batches` batch, in eval
    mode (put back after): a teacher's answers, the targets of both zero-shot guards."""
    was_training = model.training
    model.eval()
    try:
        return [batch_verbaliser_logits(model, b, verbaliser_ids) for b in batches]
    finally:
        model.train(was_training)


def teacher_answers(model, batches: Sequence[dict], verbaliser_ids: Sequence[int]) -> list[dict]:
    """``batches`` (of :func:`zero_shot_batches`) with ``teacher_logp`` (B, classes): ``model``'s
    log-probabilities over the verbalisers at each prompt's last token (:func:`answers`), the
    targets of :func:`teacher_kl_scorer`."""
    return [b | {"teacher_logp": t.log_softmax(-1)} for b, t in zip(batches, answers(model, batches, verbaliser_ids))]


def teacher_kl_scorer(verbaliser_ids: Sequence[int]):
    """A drop-one scorer of :func:`teacher_answers` batches: correct answers (against the gold
    labels, as :func:`zero_shot_scorer`), summed KL from the teacher's distribution over the
    verbalisers to the model's, and examples. Unlike the gold labels' cross-entropy, a change
    for the better on one guarded task cannot pay for a loss on another: any departure from the
    teacher's answers costs."""

    def score(model, inputs: dict, batch: dict) -> tuple[float, float, int]:
        gold, last = batch["labels"].unbind(-1)
        logp = verbaliser_logits(model, inputs, last, verbaliser_ids).log_softmax(-1)
        t = batch["teacher_logp"]
        return (float((logp.argmax(-1) == gold).sum()), float((t.exp() * (t - logp)).sum()), len(gold))

    return score


# --------------------------------------------------------------------------- the teacher's own text

#: ``--heal-mix``'s word for text the teacher writes itself (self-data distillation: healing data
#: from the model being recovered, when no general corpus is at hand). ``./teacher`` is a path.
TEACHER_TEXT = "teacher"
#: sequences sampled at a time: the KV cache of a batch is ``batch x length`` tokens of every layer
SAMPLE_BATCH = 32


def start_token(tokenizer, option: str = "--heal-mix") -> int:
    """The token a sampled document starts from: BOS, else EOS (a document boundary either way);
    ``option`` (which asked for teacher text) names the refusal."""
    for name in ("bos_token_id", "eos_token_id"):
        if (tid := getattr(tokenizer, name, None)) is not None:
            return int(tid)
    raise BadInputError(f"The '{option} {TEACHER_TEXT}' option needs a tokenizer with a BOS or an EOS token to start "
                        "sampling from; this tokenizer has neither. Expected a corpus spec instead.")


def general_windows(spec: str, model, tokenizer, n: int, length: int, seed: int = 0,
                    progress: bool = False) -> torch.Tensor:
    """The general text ``--heal-mix`` names as windows (M, length): ``n`` windows ``model``
    samples for :data:`TEACHER_TEXT`, else every window of the corpus ``spec``'s train split
    (:func:`fusion_prune.corpus.mix_windows` then draws ``n`` of them)."""
    from fusion_prune.corpus import load_corpus, token_windows

    if spec == TEACHER_TEXT:
        return sample_windows(model, n, length, start_token(tokenizer), seed=seed, progress=progress)
    return token_windows(tokenizer, load_corpus(spec).train, length, None, what=f"train split of --heal-mix {spec!r}")


@torch.no_grad()
def sample_windows(model, n: int, length: int, start_id: int, seed: int = 0, batch_size: int = SAMPLE_BATCH,
                   progress: bool = False) -> torch.Tensor:
    """(n, length) token windows ``model`` writes itself (returned on the CPU): each is ``start_id`` and
    ``length - 1`` tokens of ancestral sampling at temperature 1 with no top-k or top-p, so the text
    follows the model's own distribution. End-of-text is an ordinary token (the model starts a new
    document after it, as the corpus's joined windows do), not a stop: a loop of its own over the KV
    cache, not ``generate``, which stops at the model's configured EOS whatever it is passed.
    Seeded by a generator of its own (the global random state is untouched); the same seed and
    ``batch_size`` give the same windows. The model is left in the mode it came in."""
    from tqdm.auto import tqdm

    if n < 0 or length < 2:
        raise BadInputError(f"The 'n' and 'length' parameters must be at least 0 and 2. Got {n} and {length}.")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    # transformers renamed the KV cache's argument and output (past_key_values -> cache) within 5.x
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = torch.empty(n, length, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=n * (length - 1), desc="teacher text", unit="tok", disable=not progress)
        for i in range(0, n, batch_size):
            seqs = torch.full((min(batch_size, n - i), 1), start_id, dtype=torch.long, device=device)
            ids, past = seqs, None
            for _ in range(length - 1):
                o = model(input_ids=ids, attention_mask=torch.ones_like(seqs), use_cache=True, **{name: past})
                past = getattr(o, name)
                p = o.logits[:, -1].float().softmax(-1)  # (B, V): one position's logits only
                ids = torch.multinomial(p, 1, generator=gen)
                seqs = torch.cat([seqs, ids], 1)
                bar.update(len(seqs))
            out[i: i + len(seqs)] = seqs.cpu()
        bar.close()
    finally:
        model.train(was_training)
    return out
