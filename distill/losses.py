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
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


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


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Causal-LM distillation: :func:`soft_kl` over the vocabulary at every predicting position.

    ``student_logits``, ``teacher_logits``: (B, T, V); the last position (which predicts nothing
    inside the window) is left out; averaged over the B * (T - 1) positions.
    """
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    return soft_kl(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature)


def topk_next_token_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                       temperature: float = 2.0) -> torch.Tensor:
    """:func:`next_token_kl` against a teacher kept as its top-k logits per position.

    ``student_logits``: (B, T, V); ``teacher_values``, ``teacher_indices``: (B, T, k), the teacher's k
    largest logits and their token ids. The teacher distribution is the softmax of those k logits
    (its mass renormalised onto them, as sparse KD does); the student's log-probabilities are taken
    over the whole vocabulary and read at the k ids. With k = V this equals :func:`next_token_kl`.
    Averaged over the B * (T - 1) predicting positions, times T^2.
    """
    t = temperature
    s_log = F.log_softmax(student_logits[:, :-1].float() / t, -1).gather(-1, teacher_indices[:, :-1].long())
    t_log = F.log_softmax(teacher_values[:, :-1].float() / t, -1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)  # (B, T - 1)
    return kl.mean() * t * t


KD_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"soft_kl": soft_kl, "hard_ce": hard_ce, "hidden_mse": hidden_mse,
                                                     "next_token_kl": next_token_kl,
                                                     "topk_next_token_kl": topk_next_token_kl}
