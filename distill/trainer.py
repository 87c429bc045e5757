"""Teacher -> student knowledge distillation on accelerate (CPU, one GPU, or ``accelerate launch``).

Loss = soft_weight * soft_kl(T) + hard_weight * hard_ce + hidden_weight * hidden_mse, the last
over the (student layer, teacher layer) pairs of :func:`distill.layer_map.layer_map`. bf16
autocast on CUDA. Teacher logits are computed once and cached when the student will see the
training examples more than once and no hidden states are matched (then one teacher pass over
the data is cheaper than one per step); otherwise the teacher runs alongside each step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from distill.layer_map import layer_map
from distill.losses import hard_ce, hidden_mse, soft_kl
from fusion_prune.config import opt
from fusion_prune.errors import BadInputError
from fusion_prune.data import label_map, make_loader, subsample
from fusion_prune.training import loss_summary, make_accelerator, run_steps
from fusion_prune.utils import set_seed


@dataclass
class DistillConfig:
    epochs: float = opt(1.0, help="Distillation epochs.")
    max_steps: int | None = opt(None, help="Overrides the epochs.")
    batch_size: int = opt(32, help="Distillation batch size.")
    lr: float = opt(1e-4, help="Distillation learning rate.")
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    temperature: float = opt(2.0, help="Softmax temperature of the soft targets.")
    soft_weight: float = opt(0.5, help="Weight of the KL to the teacher's soft targets.")
    hard_weight: float = opt(0.5, help="Weight of the cross-entropy on the gold labels.")
    hidden_weight: float = opt(0.0, help="Weight of hidden-state matching (student layer to its original teacher "
                                         "layer).")
    max_length: int = opt(128, help="Tokens per example.")
    seed: int = opt(0, help="Seed of the sample and of training.")
    max_train_samples: int | None = opt(None, help="Training rows to distil on (None: all).")
    train_layers: int | None = opt(None, help="Distil into the last K layers and the head only (partial fine-tuning; "
                                              "None: every parameter).")
    cache_teacher_logits: str = "auto"  # "auto", "yes" or "no"
    group_by_length: bool = True  # as FinetuneConfig.group_by_length
    mixed_precision: str = "auto"
    grad_clip: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        from fusion_prune.params import validate

        validate(self)  # ranges in fusion_prune/params.py
        if self.soft_weight + self.hard_weight + self.hidden_weight == 0:
            raise BadInputError("The loss weights must be non-negative and not all zero. Got "
                                f"soft {self.soft_weight}, hard {self.hard_weight}, hidden {self.hidden_weight}.")


@torch.no_grad()
def teacher_logits(teacher, tokenizer, df: pd.DataFrame, batch_size: int, max_length: int, accelerator) -> torch.Tensor:
    """(N, C) teacher logits for the rows of ``df``, in row order, on the CPU."""
    out = torch.zeros(len(df), teacher.config.num_labels)
    for b in make_loader(df, tokenizer, batch_size, max_length, with_index=True, group_by_length=True):
        idx = b.pop("index")
        b.pop("labels")
        with accelerator.autocast():
            out[idx] = teacher(**{k: v.to(accelerator.device) for k, v in b.items()}).logits.float().cpu()
    return out


@torch.no_grad()
def teacher_topk_logits(teacher, windows: torch.Tensor, k: int, batch_size: int,
                        device: torch.device | str = "cpu",
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal-LM teacher's k largest next-token logits for every window, once, on the CPU.

    ``windows``: (N, T) token ids. Returns ``values`` (N, T, k) float16, ``indices`` (N, T, k)
    int32 and ``log_tail`` (N, T) float32, the log of the probability mass outside the k at
    ``temperature`` (so that :func:`distill.losses.topk_next_token_kl` keeps the teacher's exact
    probabilities; -inf at k = V), in window order: N * T * (k * 6 + 4) bytes instead of
    N * T * V * 4 for full logits (SmolLM2, V = 49,152, k = 64: about 500x smaller), so the
    teacher need not run beside each distillation step.
    """
    from fusion_prune.logits import chunk_positions, forward_hidden, vocabulary

    n, length = windows.shape
    values = indices = log_tail = None  # (N, T, min(k, V)): the vocabulary is known after the first batch
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                ids = windows[start:start + batch_size].to(device)
                # final hidden states (B, T, H); the head runs a chunk of positions at a time, so no
                # (B, T, V) logits (nor their log-softmax and scatter copies) are held for the batch
                states, head, _ = forward_hidden(teacher, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
                flat = states.reshape(-1, states.shape[-1])
                vocab = vocabulary(head, flat)
                if values is None:
                    kk = min(k, vocab)
                    values = torch.empty(n, length, kk, dtype=torch.float16)
                    indices = torch.empty(n, length, kk, dtype=torch.int32)
                    log_tail = torch.empty(n, length, dtype=torch.float32)
                rows = slice(start, start + len(ids))  # views of this batch's rows, (B * T, ...)
                v, i, r = values[rows].view(-1, kk), indices[rows].view(-1, kk), log_tail[rows].view(-1)
                step = chunk_positions(vocab)
                for c in range(0, len(flat), step):
                    logits = head(flat[c:c + step]).float()
                    top = logits.topk(kk, dim=-1)
                    z = logits / temperature
                    rest = torch.logsumexp(z.scatter(-1, top.indices, float("-inf")), -1) - torch.logsumexp(z, -1)
                    # clamped so that a near-certain teacher keeps a finite (negligible) tail; exact -inf at k = V
                    v[c:c + step], i[c:c + step] = top.values.half().cpu(), top.indices.int().cpu()
                    r[c:c + step] = (rest if kk >= vocab else rest.clamp_min(-80.0)).cpu()
    finally:
        teacher.train(was_training)
    if values is None:  # no windows
        values, indices, log_tail = (torch.empty(0, length, k, dtype=torch.float16),
                                     torch.empty(0, length, k, dtype=torch.int32), torch.empty(0, length))
    return values, indices, log_tail


def distill(teacher, student, tokenizer, train_df: pd.DataFrame, data_labels: list[str], cfg: DistillConfig,
            accelerator=None) -> dict:
    """Train ``student`` in place to imitate ``teacher`` on ``train_df``; returns losses and timing."""
    from signals.capture import record_layer_outputs

    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    set_seed(cfg.seed)
    if teacher.config.num_labels != student.config.num_labels:
        raise BadInputError(f"The teacher has {teacher.config.num_labels} classes and the student "
                            f"{student.config.num_labels}; expected the same head.")
    mapping = torch.as_tensor(label_map(student.config, data_labels))
    df = subsample(train_df, cfg.max_train_samples, cfg.seed)
    loader = make_loader(df, tokenizer, cfg.batch_size, cfg.max_length, shuffle=True, seed=cfg.seed, with_index=True,
                         group_by_length=cfg.group_by_length)
    # Examples the student will see (all processes together): more than the data means repeats.
    seen = (cfg.max_steps or math.ceil(cfg.epochs * len(loader))) * cfg.batch_size
    # soft_weight = hidden_weight = 0 is plain fine-tuning through the same loop (the control that
    # tells whether distillation helped): the teacher then never runs.
    needs_teacher = cfg.soft_weight > 0 or cfg.hidden_weight > 0
    cache = needs_teacher and (cfg.cache_teacher_logits == "yes" or (
        cfg.cache_teacher_logits == "auto" and cfg.hidden_weight == 0 and seen > len(df)))
    pairs = layer_map(student.config, teacher.config) if cfg.hidden_weight > 0 else []
    if cfg.hidden_weight > 0 and not pairs:
        raise BadInputError("The 'hidden_weight' parameter needs student layers that came from teacher layers; "
                            "this student shares no original layer with the teacher.")
    flags = [p.requires_grad for p in student.parameters()]
    if cfg.train_layers:  # before the teacher's logits are cached: a bad K fails at once
        from fusion_prune.surgery import train_only_the_top

        train_only_the_top(student, cfg.train_layers, "--distill-layers")
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher_was_training = teacher.training
    teacher.to(accelerator.device).eval()  # it runs under no_grad: its requires_grad flags stay as they are
    t0 = time.perf_counter()
    cached = teacher_logits(teacher, tokenizer, df, cfg.batch_size * 2, cfg.max_length, accelerator) if cache else None
    cache_seconds = time.perf_counter() - t0

    def compute_loss(model, batch):
        idx = batch.pop("index")
        labels = mapping.to(batch["labels"].device)[batch.pop("labels")]
        s_hidden.clear()
        t_hidden.clear()
        s_logits = model(**batch).logits
        if not needs_teacher:
            t_logits = None
        elif cached is not None:
            t_logits = cached[idx.cpu()].to(s_logits.device)
        else:
            with torch.no_grad():
                t_logits = teacher(**batch).logits
        loss = cfg.hard_weight * hard_ce(s_logits, labels)
        if cfg.soft_weight:
            loss = loss + cfg.soft_weight * soft_kl(s_logits, t_logits, cfg.temperature)
        if cfg.hidden_weight:
            loss = loss + cfg.hidden_weight * hidden_mse(s_hidden, [h.detach() for h in t_hidden], pairs,
                                                         batch["attention_mask"])
        return loss

    try:
        with record_layer_outputs(student) as s_hidden, record_layer_outputs(teacher) as t_hidden:
            losses, _ = run_steps(student, loader, compute_loss, accelerator, epochs=cfg.epochs,
                                  max_steps=cfg.max_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip, progress=cfg.progress,
                                  desc="distill")
    finally:
        teacher.train(teacher_was_training)
        for p, flag in zip(student.parameters(), flags):  # handed back as it came
            p.requires_grad_(flag)
    return {"steps": len(losses), "examples": len(df), "teacher_logits_cached": cache,
            "trainable_parameters": int(trainable),
            "cache_seconds": round(cache_seconds, 2), **loss_summary(losses),
            "distill_seconds": round(time.perf_counter() - t0, 2), "config": asdict(cfg), "pairs": pairs}
