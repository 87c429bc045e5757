"""Next-token scores of a causal LM without full-vocabulary logits for a whole batch.

A causal LM's head maps every final hidden state (H) to V logits: for a batch of B windows of T
tokens a (B, T, V) float tensor (4 x 512 x 49,152 x 4 bytes = 403 MB on smollm2-135m), and the
log-softmax and its gradient each hold another. Here the model runs with ``logits_to_keep=1`` (its
own head computes the last position only), the final hidden states (after the final norm) are
taken from the base model's output, and the head is applied to a chunk of positions at a time,
sized so a chunk's logits hold :data:`CHUNK_ELEMENTS` numbers whatever the vocabulary. Under autograd each chunk is checkpointed: its logits are recomputed in the backward pass
instead of being kept, so the loss holds the (N, H) hidden states, never (N, V).

The head is the output embedding followed by the family's post-processing
(:data:`LOGIT_TRANSFORMS`). Every forward checks it against the model's own last-position logits;
a family whose head does something the table does not know falls back, with one warning, to the
model's full logits (correct, at the old memory).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusion_prune.models import no_cache_kwargs

log = logging.getLogger(__name__)

#: logits per head call: 512 positions of smollm2-135m's 49,152-token vocabulary, 101 MB in float32
#: (and as much again for the log-softmax, and for its gradient under autograd). A larger vocabulary
#: gets fewer positions per chunk, never more memory: 96 on Gemma 3's 262,144 tokens, 196 on Llama
#: 3's 128,256.
CHUNK_ELEMENTS = 512 * 49_152


def chunk_positions(vocab: int, elements: int | None = None) -> int:
    """Positions per head call so that one chunk's logits (positions, ``vocab``) hold at most
    ``elements`` numbers (default :data:`CHUNK_ELEMENTS`), and at least one position."""
    return max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(vocab, 1))


def _softcap(lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _logit_scale(lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    scale = getattr(lm, "logit_scale", None)  # Cohere: a float attribute of the *ForCausalLM module
    return logits if scale is None or isinstance(scale, nn.Module) else logits * scale


def _logits_scaling(lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    scaling = getattr(lm.config, "logits_scaling", None)  # Granite divides
    return logits if scaling is None else logits / scaling


#: What families do to ``lm_head(hidden)`` before returning logits (Gemma 2/3, Cohere, Granite);
#: each is the identity where its setting is absent. A new one is one row.
LOGIT_TRANSFORMS: tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], ...] = (
    _softcap, _logit_scale, _logits_scaling)

_FULL_LOGITS: set[type] = set()  # classes whose head failed the check: scored from their full logits


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside ``model`` (a peft or accelerate wrapper, or itself)."""
    while True:
        if hasattr(model, "get_base_model") and model.get_base_model() is not model:  # peft
            model = model.get_base_model()
        elif type(model).__name__ == "DistributedDataParallel":
            model = model.module
        else:
            return model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a wrapper holds) has a language-model head."""
    return type(causal_lm_of(model)).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) of final hidden states (..., H): the output embedding and the family's
    post-processing, exactly what the model's forward applies."""
    lm = causal_lm_of(model)
    logits = lm.get_output_embeddings()(hidden)
    for transform in LOGIT_TRANSFORMS:
        logits = transform(lm, logits)
    return logits


@contextlib.contextmanager
def _final_hidden(lm: nn.Module) -> Iterator[dict]:
    box: dict = {}

    def hook(module, args, output):
        box["hidden"] = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state

    handle = lm.base_model.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _takes_logits_to_keep(lm: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(lm).forward).parameters and lm.base_model is not lm


def forward_hidden(model: nn.Module, inputs: dict, **kwargs) -> tuple[torch.Tensor, Callable, object]:
    """Run ``model`` on ``inputs`` without computing its full logits.

    Returns ``(states, head, output)``: ``head(states[..., i, :])`` are the logits at position i.
    Normally ``states`` are the final hidden states (B, T, H) and ``head`` is :func:`head_logits`;
    for a family the head check rejects, ``states`` are the full logits (B, T, V) and ``head`` the
    identity. ``output`` is the model's output (its ``logits`` hold the last position only).
    """
    lm = causal_lm_of(model)
    call = {**inputs, **no_cache_kwargs(lm), **kwargs}
    if type(lm) in _FULL_LOGITS or not _takes_logits_to_keep(lm):
        out = model(**call)
        return out.logits, _identity, out
    with _final_hidden(lm) as box:
        out = model(**call, logits_to_keep=1)
    hidden = box.get("hidden")
    if hidden is None or hidden.shape[:2] != inputs["input_ids"].shape:
        return _fall_back(lm, model, call, "its base model returned no (B, T, H) hidden states")
    with torch.no_grad():
        mine, theirs = head_logits(model, hidden[:, -1:].detach()).float(), out.logits.detach().float()
        # non-finite logits (a diverged model) cannot tell a transform apart: they neither fail the
        # check nor mark the family for full logits for the rest of the process
        ok = mine.shape == theirs.shape and (not bool(torch.isfinite(theirs).all()) or torch.allclose(
            mine, theirs, rtol=1e-3, atol=1e-3 * (1 + float(theirs.abs().max()))))
    if not ok:
        return _fall_back(lm, model, call, "lm_head and the known logit transforms do not reproduce its logits")
    return hidden, functools.partial(head_logits, model), out


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _fall_back(lm, model, call: dict, why: str):
    _FULL_LOGITS.add(type(lm))
    log.warning("%s: %s; scoring it from full logits (more memory). Add its transform to "
                "fusion_prune.logits.LOGIT_TRANSFORMS.", type(lm).__name__, why)
    out = model(**call)
    return out.logits, _identity, out


def vocabulary(head: Callable, states: torch.Tensor) -> int:
    """The width of ``head``'s logits: the head on no rows, (0, V), costs nothing."""
    with torch.no_grad():
        return int(head(states.reshape(-1, states.shape[-1])[:0]).shape[-1])


def _predicting(states: torch.Tensor, batch: dict, *per_position: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of the positions that predict a token: (B, T, ...) -> (N, ...), position t of each
    window predicting token t + 1, padding (mask 0) predicting nothing; ``states`` first, then the
    targets (N,), then each of ``per_position`` (B, T, ...) the same way."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = (mask[:, 1:] != 0).reshape(-1)
    rows = [t[:, :-1].reshape(-1, *t.shape[2:])[real] for t in (states, *per_position)]
    return rows[0], ids[:, 1:].reshape(-1)[real], *rows[1:]


def _sum_chunks(fn: Callable, rows: tuple[torch.Tensor, ...], chunk_tokens: int, grad: bool) -> list[torch.Tensor]:
    """The sums ``fn(*chunk_rows)`` returns, over chunks of ``chunk_tokens`` rows of ``rows`` (N, ...);
    each chunk checkpointed under autograd (``grad``), so what ``fn`` makes inside is never kept."""
    totals: list[torch.Tensor] | None = None
    for start in range(0, len(rows[0]), chunk_tokens):
        part = [r[start:start + chunk_tokens] for r in rows]
        sums = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        totals = list(sums) if totals is None else [t + x for t, x in zip(totals, sums)]
    return totals


def _chunk_sums(head: Callable, states: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(states).float()
    nll = nn.functional.cross_entropy(logits, target, reduction="sum")
    return nll, logits.argmax(-1).eq(target).sum()


def next_token_sums(states: torch.Tensor, head: Callable, batch: dict, chunk_tokens: int | None = None
                    ) -> tuple[torch.Tensor, int, int]:
    """(summed next-token NLL (a scalar tensor, differentiable when ``states`` are), correct next-token
    predictions, predicted tokens) of one batch: position t predicts token t + 1, padding (mask 0)
    is not predicted. ``states``: (B, T, H) from :func:`forward_hidden`. The head runs on
    ``chunk_tokens`` positions at a time (default: :func:`chunk_positions` of the vocabulary); under
    autograd each chunk is checkpointed, so its logits are never kept."""
    flat, target = _predicting(states, batch)  # (N, H), (N,)
    if not len(target):
        return states.new_zeros((), dtype=torch.float32), 0, 0
    grad = torch.is_grad_enabled() and states.requires_grad
    chunk_tokens = chunk_tokens or chunk_positions(vocabulary(head, flat))
    nll, correct = _sum_chunks(functools.partial(_chunk_sums, head), (flat, target), chunk_tokens, grad)
    return nll, int(correct), int(len(target))


def _chunk_kd_sums(head: Callable, kl: Callable, states: torch.Tensor, target: torch.Tensor,
                   *teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(states).float()
    return nn.functional.cross_entropy(logits, target, reduction="sum"), kl(logits, *teacher).sum()


def next_token_kd_sums(states: torch.Tensor, head: Callable, batch: dict, teacher: tuple[torch.Tensor, ...],
                       kl: Callable[..., torch.Tensor], chunk_tokens: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed next-token NLL, summed distillation term, predicted tokens) of one batch, with no
    (B, T, V) logits held: a chunk of positions at a time, checkpointed under autograd.

    ``states``: (B, T, H) from :func:`forward_hidden`; ``teacher``: per-position tensors (B, T, ...)
    describing the teacher there (its final hidden states, or its top-k values, ids and tail);
    ``kl(student_logits (n, V), *teacher_rows) -> (n,)`` the term per position, e.g.
    :func:`distill.losses.topk_kl_rows`, or :func:`distill.losses.teacher_kl` for a teacher run beside
    the step.
    Divided by the count these are the means the full-logit losses take
    (:func:`next_token_loss`, :func:`distill.losses.next_token_kl`)."""
    flat, target, *rows = _predicting(states, batch, *teacher)
    if not len(target):
        zero = states.new_zeros((), dtype=torch.float32)
        return zero, zero, 0
    grad = torch.is_grad_enabled() and states.requires_grad
    chunk_tokens = chunk_tokens or chunk_positions(vocabulary(head, flat))
    nll, kd = _sum_chunks(functools.partial(_chunk_kd_sums, head, kl), (flat, target, *rows), chunk_tokens, grad)
    return nll, kd, int(len(target))


def next_token_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens from full logits (B, T, V), for the losses
    that need every logit anyway (distillation against a teacher's distribution)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=-100)
