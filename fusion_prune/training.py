"""The one training loop every trainer shares (fine-tuning, recovery, distillation, healing).

It runs on :class:`accelerate.Accelerator`, so the same code runs on CPU, on one GPU (bf16
autocast) and, under ``accelerate launch``, on several GPUs or processes.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "auto"):
    """An Accelerator with bf16 autocast on CUDA (when supported) and full precision elsewhere."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    # cpu=True on a machine without CUDA: only then does accelerate run several CPU processes
    # (torchrun / `accelerate launch --multi_gpu`) as one MULTI_CPU job over gloo.
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)


def step_budget(batches_per_epoch: int, epochs: float, max_steps: int | None, min_steps: int = 0) -> int:
    """Training steps for a budget in epochs (``max_steps`` overrides it; at least ``min_steps``, at least 1)."""
    return max_steps or max(1, math.ceil(epochs * batches_per_epoch), min_steps)


def run_steps(model, loader, compute_loss, accelerator, *, epochs: float, max_steps: int | None, lr: float,
              weight_decay: float, warmup_ratio: float, grad_clip: float, progress: bool,
              desc: str, min_steps: int = 0, on_step=None, max_seconds: float = 0.0) -> tuple[list[float], int]:
    """The one training loop: AdamW with linear warm-up and decay; returns (losses, steps an epoch).

    ``compute_loss(model, batch) -> scalar`` is called under autocast. ``model`` and ``loader``
    are prepared with ``accelerator`` here, so that under several processes an epoch counts the
    steps of one process's shard. ``on_step(step, model) -> bool`` runs after every step (every
    process) and stops training when it returns True. The model is trained in place and left in
    eval mode.

    ``max_seconds > 0`` limits the wall time of the steps (preparation not counted): after every
    step the steps that still fit at the mean pace so far are counted, the planned total (and the
    learning-rate schedule's warm-up and decay with it) becomes that, and training stops when the
    next step would not fit. The step budget stays a ceiling.
    """
    from tqdm.auto import tqdm

    # Weight decay on matrices only: biases and LayerNorm gains are not decayed (as in BERT).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    ceiling = total = step_budget(len(loader), epochs, max_steps, min_steps)

    # transformers' linear warm-up and decay, over a total that a time limit can shrink
    def factor(step: int) -> float:
        warm = int(warmup_ratio * total)
        if step < warm:
            return step / max(1, warm)
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    wrapped.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, disable=not (progress and accelerator.is_local_main_process), dynamic_ncols=True)
    start = time.perf_counter()
    try:
        while len(losses) < total:
            for batch in loader:
                with accelerator.autocast():
                    loss = compute_loss(wrapped, batch)
                accelerator.backward(loss)
                if grad_clip:
                    accelerator.clip_grad_norm_(wrapped.parameters(), grad_clip)
                opt.step()
                losses.append(loss.item())
                if max_seconds:  # before the schedule's step, so that the next learning rate knows the new total
                    # re-planned every step, up or down: the first steps are the slow ones
                    total = _steps_in_time(len(losses), time.perf_counter() - start, max_seconds, ceiling)
                    bar.total = total
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                if on_step is not None and on_step(len(losses), wrapped):
                    total = len(losses)  # stopped early: the outer loop ends too
                if len(losses) >= total:
                    break
    finally:
        bar.close()
        model.eval()
    return losses, len(loader)


class EarlyStopping:
    """``on_step`` callback of :func:`run_steps`: ``measure(model) -> float`` every ``every`` steps,
    the best *trainable* weights kept on the CPU, stop after ``patience`` checks without a gain of
    more than ``min_delta``.

    ``what`` names the measure in the record and the log (``"validation_accuracy"``);
    ``higher_is_better=False`` for a loss. ``curve`` holds ``(step, value)`` of every check;
    :meth:`restore` loads the best weights. Only parameters that train are copied (LoRA: the
    adapters; full fine-tuning: the whole model, once, in CPU memory).
    """

    def __init__(self, model, measure, every: int, patience: int, what: str, higher_is_better: bool = True,
                 min_delta: float = 1e-4) -> None:
        self.model, self.measure, self.every, self.patience, self.what = model, measure, every, patience, what
        self.sign, self.min_delta = (1.0 if higher_is_better else -1.0), min_delta
        self.curve: list[tuple[int, float]] = []
        self.best, self.best_step, self.best_state, self.bad = None, 0, None, 0

    @property
    def stopped(self) -> bool:
        """Whether the last check ended training."""
        return self.bad >= self.patience

    def __call__(self, step: int, wrapped=None) -> bool:
        if step % self.every:
            return False
        value = float(self.measure(self.model))
        self.curve.append((step, round(value, 5)))
        # a diverged model (NaN or inf) is never the best: it counts as a check without a gain
        if math.isfinite(value) and (self.best is None or self.sign * (value - self.best) > self.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
            self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                               if p.requires_grad}
        else:
            self.bad += 1
        what = self.what.replace("_", " ")
        log.info("step %d: %s %.4f (best %.4f at step %d)", step, what, value,
                 math.nan if self.best is None else self.best, self.best_step)
        if self.stopped:
            log.info("early stop at step %d: no gain in %d checks; keeping the weights of step %d (%s %.4f)",
                     step, self.bad, self.best_step, what, self.best)
            return True
        return False

    def restore(self, final_step: int) -> None:
        """Load the best weights unless the final ones were never checked (then they may be better)."""
        if self.best_state is not None and self.curve and self.curve[-1][0] == final_step \
                and self.best_step != final_step:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in self.best_state:
                        p.copy_(self.best_state[n].to(p.device))
        self.best_state = None  # the copy is not needed past here

    def record(self) -> dict:
        return {"early_stopping": {"every": self.every, "patience": self.patience, "best_step": self.best_step,
                                   f"best_{self.what}": None if self.best is None else round(self.best, 5),
                                   "curve": [list(c) for c in self.curve]}}


def _steps_in_time(done: int, elapsed: float, seconds: float, ceiling: int) -> int:
    """Steps in all (at least ``done``, at most ``ceiling``) when the rest of ``seconds`` goes at the mean pace."""
    return max(done, min(ceiling, done + int((seconds - elapsed) // max(elapsed / done, 1e-9))))


def loss_summary(losses: list[float]) -> dict:
    return {"first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-20:])) if losses else None}
