"""Knowledge-distillation losses as plain functions, and the KD_LOSSES registry."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch.

    ``student_logits``, ``teacher_logits``: (B, C). The T^2 factor keeps gradient magnitudes
    comparable across temperatures (Hinton et al., 2015).
    """
    return kl_rows(student_logits, teacher_logits, temperature).mean()


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the gold labels: logits (B, C), labels (B,)."""
    return F.cross_entropy(student_logits.float(), labels)


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               pairs: Sequence[tuple[int, int]], attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``pairs`` of the MSE between matched hidden states, over real tokens only.

    ``student_hidden[i]`` / ``teacher_hidden[j]``: (B, T, H) outputs of student layer i and teacher
    layer j; ``pairs``: (student layer, teacher layer); ``attention_mask``: (B, T).
    """
    m = attention_mask.unsqueeze(-1).float()
    denom = m.sum() * student_hidden[0].shape[-1]
    losses = [(((student_hidden[s].float() - teacher_hidden[t].float()) ** 2) * m).sum() / denom for s, t in pairs]
    return torch.stack(losses).mean()


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Per-row ``KL(softmax(t / T) || softmax(s / T)) * T^2``: logits (N, V) -> (N,). The rows are
    what a chunked loss (:func:`fusion_prune.logits.next_token_kd_sums`) sums a chunk at a time."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    reduction="none", log_target=True).sum(-1) * t * t


def topk_kl_rows(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 teacher_log_tail: torch.Tensor | None = None, *, temperature: float = 2.0) -> torch.Tensor:
    """Per-row :func:`kl_rows` against a teacher kept as its top-k logits: ``student_logits`` (N, V),
    ``teacher_values`` and ``teacher_indices`` (N, k), ``teacher_log_tail`` (N,) -> (N,).

    With the tail (the log of the teacher's mass outside its k at ``temperature``, as
    :func:`distill.teacher_topk_logits` keeps it) the KL is over k + 1 bins, the k ids and "any
    other token", with the teacher's exact probabilities: a proper KL, never above the full one,
    and equal to it at k = V. Without it the teacher's mass is renormalised onto the k ids (the
    sparse KD of the literature); that target is sharper than the teacher and pushes the student
    to put no mass elsewhere; on smollm2-135m with k = 16, 10 steps left perplexity *above* the
    pruned student's before any step (benchmarks/journal.md).
    """
    t = temperature
    z = student_logits.float() / t
    ids = teacher_indices.long()
    log_norm = torch.logsumexp(z, -1, keepdim=True)
    s_log = z.gather(-1, ids) - log_norm  # (N, k)
    t_log = F.log_softmax(teacher_values.float() / t, -1)
    if teacher_log_tail is None or ids.shape[-1] >= z.shape[-1]:  # renormalised, or no tail to keep
        return (t_log.exp() * (t_log - s_log)).sum(-1) * t * t
    t_tail = teacher_log_tail.float().unsqueeze(-1)  # (N, 1)
    t_log = t_log + torch.log1p(-t_tail.exp().clamp(max=1 - 1e-6))  # exact teacher log-probabilities
    s_tail = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1, keepdim=True) - log_norm
    t_all, s_all = torch.cat([t_log, t_tail], -1), torch.cat([s_log, s_tail], -1)
    return (t_all.exp() * (t_all - s_all)).sum(-1) * t * t


def teacher_kl(teacher_head: Callable[[torch.Tensor], torch.Tensor], temperature: float = 2.0
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``kl(student_logits (n, V), teacher_states (n, H)) -> (n,)``, :func:`kl_rows` against a teacher
    given by its final hidden states, for :func:`fusion_prune.logits.next_token_kd_sums`: the teacher's
    logits are made for a chunk of positions inside the chunk (and again in the backward pass),
    never for the whole batch, and never train the teacher's head."""

    def kl(student_logits: torch.Tensor, teacher_states: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher_head(teacher_states)
        return kl_rows(student_logits, t, temperature)

    return kl


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Causal-LM distillation: :func:`soft_kl` over the vocabulary at every predicting position.

    ``student_logits``, ``teacher_logits``: (B, T, V); the last position (which predicts nothing
    inside the window) is left out; averaged over the B * (T - 1) positions. Healing does not hold
    (B, T, V) logits: it sums :func:`kl_rows` a chunk of positions at a time (same value).
    """
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    return soft_kl(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature)


def topk_next_token_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                       temperature: float = 2.0, teacher_log_tail: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`next_token_kl` against a teacher kept as its top-k logits per position
    (:func:`topk_kl_rows`, averaged over the B * (T - 1) predicting positions).

    ``student_logits``: (B, T, V); ``teacher_values``, ``teacher_indices``: (B, T, k), the teacher's k
    largest logits and their token ids; ``teacher_log_tail``: (B, T), the log of the teacher's
    probability mass outside those k at ``temperature`` (:func:`distill.teacher_topk_logits`).
    """
    v = student_logits.shape[-1]
    k = teacher_indices.shape[-1]
    tail = None if teacher_log_tail is None else teacher_log_tail[:, :-1].reshape(-1)
    return topk_kl_rows(student_logits[:, :-1].reshape(-1, v), teacher_values[:, :-1].reshape(-1, k),
                        teacher_indices[:, :-1].reshape(-1, k), tail, temperature=temperature).mean()


KD_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"soft_kl": soft_kl, "hard_ce": hard_ce, "hidden_mse": hidden_mse,
                                                     "next_token_kl": next_token_kl,
                                                     "topk_next_token_kl": topk_next_token_kl}
