"""Healing a pruned causal LM: LoRA (merged), QLoRA, full fine-tuning, and distillation from the
teacher's logits. One function, :func:`heal`, over token windows (:mod:`fusion_prune.corpus`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fusion_prune.config import opt
from fusion_prune.corpus import window_loader
from fusion_prune.errors import BadInputError
from fusion_prune.lm import answers, batch_verbaliser_logits

log = logging.getLogger(__name__)


@dataclass
class HealConfig:
    """Healing after the layers are gone: LoRA (merged afterwards), QLoRA (LoRA on a 4-bit NF4 copy
    of the base, merged into the full-precision weights), full fine-tuning, partial fine-tuning
    (the last ``top_layers`` layers, the final norm and the LM head, as "Reassessing Layer Pruning"
    trains them), or none."""

    method: str = opt("auto", help="Causal LM: healing after the removals. auto: full fine-tuning where its "
                                   "training state (12 bytes a parameter) fits in half the free memory, else "
                                   "lora (adapters merged into the weights); qlora trains them on a 4-bit NF4 "
                                   "copy of the base and needs bitsandbytes.")
    # 30: on smollm2-135m 30 -> 24 (2-core CPU) 26 full fine-tuning steps of 4 x 512 tokens healed to
    # 1.13x the teacher's perplexity (benchmarks/journal.md, "The healing table"); 30 steps take about
    # 4.6 minutes alone. More steps on the user's corpus lower its perplexity further (77 steps:
    # 1.05x) and cost general ability ("Distilling while healing"), so the default stays short.
    steps: int = opt(30, help="Causal LM: healing steps (the ceiling when --heal-seconds is set).")
    max_seconds: float = opt(0.0, help="Causal LM: wall-time limit of the healing steps in seconds (0: none); the "
                                       "learning-rate schedule is fitted to the steps that fit in it.")
    batch_size: int = 4
    lr: float = opt(2e-4, help="Causal LM: healing learning rate.")
    lora_r: int = opt(8, help="LoRA rank.")
    lora_alpha: int = opt(16, help="LoRA alpha.")
    lora_dropout: float = 0.0
    top_layers: int = opt(4, help="--heal partial: the last K layers trained (with the final norm and the LM head; "
                                 "a head tied to the input embedding trains it too).")
    target_modules: str = opt("all-linear", help="Comma-separated module names (q_proj,v_proj) or all-linear.")
    kd_weight: float = opt(0.0, help="Causal LM: weight of the KL to the teacher's logits in the healing loss (the "
                                     "rest is next-token loss; 0: none). The teacher runs beside each step; with "
                                     "--kd-top-k the KL is over its top-k logits.")
    # The zero-shot guard of healing: the KL from the teacher's to the student's distribution over
    # the verbalisers of the --guard datasets' *train* prompts (the teacher's answers, never the
    # gold labels), one batch of prompts beside each step.
    guard_weight: float = opt(0.0, help="Causal LM: weight of the KL to the teacher's answers on --guard datasets' "
                                        "train prompts (distribution over their verbalisers), added to the "
                                        "healing loss; needs --guard (0: none).")
    # 512: the healing table's count (the choice's guard costs time per prompt and candidate, this
    # one only the teacher's answers once, before the steps)
    guard_samples: int = opt(512, help="Causal LM: train prompts of each --guard dataset for --heal-guard-weight.")
    temperature: float = opt(2.0, help="Softmax temperature of the distillation.")
    # 0: the teacher runs beside each step (full-vocabulary KL); k > 0: the KL is over its top-k logits
    # per position (distill.teacher_topk_logits), cached once before training, or per batch under a
    # time limit
    kd_top_k: int = opt(0, help="Causal LM: distil over the teacher's top-k logits per token (and its mass outside "
                                "them), cached before the steps, or taken beside each one under --heal-seconds "
                                "(0: the teacher beside each step, full vocabulary).")
    # Measured on one H200 (benchmarks/journal.md, "The healing table at a GPU's budget"): full
    # fine-tuning of smollm2-135m 30 -> 24 on grimm-tales' 143 train windows was at 1.50x the
    # teacher's test perplexity after 150 steps and 26x after 600 (train loss 0.015): past a few
    # passes it memorises the windows. The validation windows say when; a check costs one forward
    # over them (12 windows of 512 tokens: about 4 s on the 2-core CPU, a few percent of 10 steps).
    eval_every: int = opt(10, help="Causal LM: the healing's next-token loss on the corpus's validation windows every "
                                   "K steps; it stops after --heal-patience checks without a gain and keeps the "
                                   "best weights (0: never checked).")
    patience: int = opt(2, help="Causal LM: validation checks without a gain before healing stops (0: never stops "
                                "early).")
    #: validation windows a check reads (the first ones): the cost of a check is bounded on a large corpus
    eval_windows: int = 16
    seed: int = 0
    progress: bool = True
    #: recompute each layer in the backward pass instead of keeping its activations: one layer's
    #: activations held instead of every layer's, for about one more forward per step
    checkpoint_layers: bool = True

    def __post_init__(self) -> None:
        from fusion_prune.errors import bad_choice

        from fusion_prune.params import validate

        if self.method not in HEAL_METHODS:
            raise bad_choice("heal", self.method, HEAL_METHODS)
        validate(self)  # ranges in fusion_prune/params.py


HEAL_METHODS = ("auto", "lora", "qlora", "full", "partial", "none")
#: bytes each trained parameter adds under full fine-tuning: its gradient and AdamW's two moments (float32)
FULL_TRAINING_BYTES = 12


def resolve_method(model: nn.Module, cfg: HealConfig) -> tuple[str, str]:
    """(method, why): ``cfg.method``, or for ``auto`` full fine-tuning where the training state of
    every parameter fits in half the memory free on the model's device, else LoRA. Measured on
    smollm2-135m 30 -> 24 on a 2-core CPU (benchmarks/journal.md, "The healing table"): in the same
    10 minutes full fine-tuning healed to 1.13x the teacher's perplexity, LoRA to 1.67x."""
    if cfg.method != "auto":
        return cfg.method, "chosen"
    from fusion_prune.memory import available_bytes
    from fusion_prune.surgery import count_parameters

    need, free = count_parameters(model) * FULL_TRAINING_BYTES, available_bytes(next(model.parameters()).device)
    if need <= free / 2:
        return "full", f"auto: full fine-tuning's {need / 2**30:.1f} GiB of training state fits in half the {free / 2**30:.1f} GiB free"
    return "lora", f"auto: full fine-tuning's {need / 2**30:.1f} GiB of training state exceeds half the {free / 2**30:.1f} GiB free"


def lora_targets(cfg: HealConfig) -> str | list[str]:
    """``cfg.target_modules`` as peft takes it: ``"all-linear"`` or a list of module names."""
    return cfg.target_modules if cfg.target_modules == "all-linear" else \
        [t.strip() for t in cfg.target_modules.split(",") if t.strip()]


def check_lora_targets(model: nn.Module, cfg: HealConfig) -> None:
    """Refuse ``--lora-targets`` naming a module ``model`` does not have, when healing may use LoRA:
    called as the teacher loads, not when healing starts after the choice. A name matches a module
    whose dotted name is it or ends with it, as peft matches."""
    targets = lora_targets(cfg)
    if cfg.method not in ("auto", "lora", "qlora") or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise BadInputError(f"The '--lora-targets' option must name modules of {type(model).__name__} (or be "
                            f"all-linear), such as {','.join(linear)}; {', '.join(missing) or 'nothing'} matches "
                            f"none. Got {cfg.target_modules!r}.")


def _lora(model, cfg: HealConfig):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(cfg)
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


#: prompts in each guard batch; one batch goes beside each healing step
HEAL_GUARD_BATCH = 8
#: a guard batch of :func:`fusion_prune.lm.zero_shot_batches`, its verbaliser token ids, and the
#: teacher's verbaliser logits (B, classes) on it
GuardBatch = tuple[dict, Sequence[int], torch.Tensor]


def guard_targets(teacher, guards: Sequence[tuple[Sequence[dict], Sequence[int]]]) -> list[GuardBatch]:
    """The teacher's verbaliser logits (:func:`fusion_prune.lm.answers`) on each guard dataset's
    batches (``guards``: its :func:`fusion_prune.lm.zero_shot_batches` batches and verbaliser
    ids): the healing guard's targets, computed once before the steps."""
    return [(b, verb, t) for batches, verb in guards for b, t in zip(batches, answers(teacher, batches, verb))]


def heal(student, windows: torch.Tensor, cfg: HealConfig, teacher=None,
         guard: Sequence[GuardBatch] = (), validation: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Train ``student`` on token windows (N, T) for ``cfg.steps``; returns (model, stats).

    With ``validation`` windows (M, T), ``cfg.eval_every`` and ``cfg.patience``, the next-token
    loss on the first ``cfg.eval_windows`` of them is checked every ``eval_every`` steps; healing
    stops after ``patience`` checks without a gain and ends with the best checked weights
    (``stats["early_stopping"]``).

    LoRA adapters are merged into the weights before returning, so the result is a plain model
    of the input's class (the input module itself is trained in place and may be the result).
    QLoRA trains the adapters on a 4-bit NF4 copy of ``student`` (whose own weights wait on the CPU
    meanwhile, so that the accelerator holds the 4-bit base only) and merges them into
    ``student``'s full-precision weights, as the QLoRA paper deploys; the merged model is not the
    one the adapters were trained against, so measure it after healing (``compress`` does).
    With ``cfg.kd_weight > 0`` the loss is ``(1 - w) * next-token CE + w * T^2 KL(teacher || student)``
    over the vocabulary at every position, the teacher running beside each step (both models' logits
    are made a chunk of positions at a time, :func:`fusion_prune.logits.next_token_kd_sums`); with
    ``cfg.kd_top_k = k`` the teacher's top-k logits and its mass outside them are cached first and
    the KL is taken over those k + 1 bins (:func:`distill.losses.topk_next_token_kl`); with a time
    limit (``cfg.max_seconds``) as well, they are taken per batch beside each step instead.
    With ``cfg.guard_weight > 0`` each step also takes the next ``guard`` batch (:func:`guard_targets`,
    cycled in a seeded order) and adds the weight times ``KL(teacher || student)`` over its
    verbalisers at each prompt's last token: the teacher's zero-shot answers are kept while the
    corpus heals.
    """
    from distill.losses import soft_kl, teacher_kl, topk_kl_rows
    from distill.trainer import teacher_topk_logits
    from fusion_prune.training import loss_summary, make_accelerator, run_steps
    from fusion_prune.utils import set_seed
    from fusion_prune.logits import causal_lm_of, forward_hidden, next_token_kd_sums
    from fusion_prune.surgery import checkpointed_layers, layer_list
    from signals.capture import task_loss

    if cfg.method == "none" or cfg.steps == 0:
        return student, {"method": "none", "steps": 0}
    method, why = resolve_method(student, cfg)
    if method != cfg.method:
        log.info("healing by %s (%s)", method, why)
        unused = [f"--{k.replace('_', '-')}" for k in ("lora_r", "lora_alpha", "target_modules")
                  if getattr(cfg, k) != getattr(HealConfig, k)]
        if method not in ("lora", "qlora") and unused:  # said, not silently dropped
            log.warning("%s set but --heal auto chose %s fine-tuning: they apply to --heal lora/qlora only",
                        ", ".join(unused).replace("--target-modules", "--lora-targets"), method)
        cfg = replace(cfg, method=method)
    if cfg.kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher")
    if cfg.guard_weight > 0 and not guard:
        raise BadInputError(f"The 'heal_guard_weight' parameter needs --guard datasets whose prompts it keeps; "
                            f"expected --guard with --heal-guard-weight {cfg.guard_weight:g}. Got no guard prompts.")
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    device = next(student.parameters()).device
    if cfg.method == "qlora":
        model = _lora(_quantised_copy(student, cfg.progress), cfg)
        student.to("cpu")
    else:
        model = _lora(student, cfg) if cfg.method == "lora" else student
        if cfg.method == "partial":
            from fusion_prune.surgery import train_only_the_top

            train_only_the_top(causal_lm_of(student), cfg.top_layers, "--heal-layers")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator = make_accelerator()
    cache, kd_stats = None, {}
    if teacher is not None:
        teacher.eval()
    per_step = bool(cfg.kd_weight and cfg.kd_top_k and cfg.max_seconds)
    if per_step:
        # Under a time limit the steps, hence the windows visited, are unknown in advance: the
        # teacher's top-k is taken per batch as the step needs it (the same numbers as the cache;
        # nothing computed for windows never reached, at the price of a second teacher pass for a
        # window visited twice; no (B, T, V) teacher logits kept past the call).
        vocab = teacher.get_output_embeddings().weight.shape[0]
        kd_stats = {"teacher_logits": "top-k beside each step", "top_k": min(cfg.kd_top_k, vocab)}
    elif cfg.kd_weight and cfg.kd_top_k:
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

    def window_loss(m, batch):
        index = batch.pop("index")
        if not cfg.kd_weight:  # next-token loss alone: no (B, T, V) logits are held (fusion_prune.logits)
            res = task_loss(m, batch, batch)
            return res.loss_sum / max(res.count, 1)
        # with KD too: the student's and the teacher's (B, T, V) logits are made a chunk of positions
        # at a time (fusion_prune.logits.next_token_kd_sums), never for the whole batch
        states, head, _ = forward_hidden(m, batch)
        if cache is not None or per_step:
            # the cache lies on the CPU, the prepared batch (index too) on the accelerator
            top = teacher_topk_logits(teacher, batch["input_ids"], cfg.kd_top_k, len(index), states.device,
                                      temperature=cfg.temperature) if per_step else (c[index.cpu()] for c in cache)
            described = tuple(c.to(states.device) for c in top)  # values, ids (B, T, k), log tail (B, T)
            kl = functools.partial(topk_kl_rows, temperature=cfg.temperature)
        else:
            with torch.no_grad():
                t_states, t_head, _ = forward_hidden(teacher, batch)
            described, kl = (t_states,), teacher_kl(t_head, cfg.temperature)
        nll, kd, count = next_token_kd_sums(states, head, batch, described, kl)
        return ((1 - cfg.kd_weight) * nll + cfg.kd_weight * kd) / max(count, 1)

    guard_order = _cycle(len(guard), cfg.seed) if cfg.guard_weight else None
    guard_kl: list[float] = []

    def compute_loss(m, batch):
        loss = window_loss(m, batch)
        if guard_order is not None:
            g, verb, target = guard[next(guard_order)]
            kl = soft_kl(batch_verbaliser_logits(m, g, verb), target, temperature=1.0)
            guard_kl.append(float(kl.detach()))
            loss = loss + cfg.guard_weight * kl
        return loss

    stopper = None
    if validation is not None and len(validation) and cfg.eval_every and cfg.patience:
        from fusion_prune.lm import perplexity
        from fusion_prune.training import EarlyStopping

        check = validation[: cfg.eval_windows]  # bounded: a check's cost does not grow with the corpus
        # finite=False: a diverged check is one without a gain (the best weights come back), not an error
        stopper = EarlyStopping(model, lambda m: perplexity(m, check, cfg.batch_size, finite=False)["nll"],
                                cfg.eval_every, cfg.patience, "validation_nll", higher_is_better=False)
    loader = window_loader(windows, cfg.batch_size, shuffle=True, seed=cfg.seed)
    cuda = device.type == "cuda"
    if cuda:  # the training steps' peak: for QLoRA the 4-bit base, not the copy it was made from
        torch.cuda.reset_peak_memory_stats(device)
    with checkpointed_layers(layer_list(causal_lm_of(model)) if cfg.checkpoint_layers else []):
        losses, _ = run_steps(model, loader, compute_loss, accelerator, epochs=1.0, max_steps=cfg.steps, lr=cfg.lr,
                              weight_decay=0.0, warmup_ratio=0.05, grad_clip=1.0, progress=cfg.progress,
                              desc=f"heal ({cfg.method}{', KD' if cfg.kd_weight else ''})", max_seconds=cfg.max_seconds,
                              on_step=stopper)
    if stopper is not None:
        stopper.restore(len(losses))
    memory = {"gpu_peak_bytes": int(torch.cuda.max_memory_allocated(device))} if cuda else {}
    passes = len(losses) * cfg.batch_size / len(windows)
    stopped_early = stopper is not None and stopper.stopped
    if passes > 1.5 and stopper is None:
        # measured: on smollm2-135m 30 -> 24, three passes over 286 windows left test perplexity at 1.22x
        # the teacher's and unseen text at 2.50x, against 1.06x and 2.08x after one (benchmarks/journal.md,
        # "Distilling while healing")
        log.warning("healing passed over its %d training windows %.1f times; past one pass it over-fits them "
                    "(measured): fewer steps, more text (--heal-mix) or validation checks (--heal-eval-every) serve "
                    "better", len(windows), passes)
    model = accelerator.unwrap_model(model)
    if cfg.method == "lora":
        model = model.merge_and_unload()
    elif cfg.method == "qlora":
        model = _merge_adapters(student, model, cfg).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"method": cfg.method, "method_chosen": why, "steps": len(losses),
                   "stopped_by": "validation loss" if stopped_early else
                   "time limit" if cfg.max_seconds and len(losses) < cfg.steps else "steps",
                   "trainable_parameters": int(trainable),
                   "tokens_seen": int(len(losses) * cfg.batch_size * windows.shape[1]), "passes": round(passes, 2),
                   **loss_summary(losses),
                   **kd_stats, **memory, **_guard_stats(cfg, guard, guard_kl),
                   **(stopper.record() if stopper is not None else {}),
                   "seconds": round(time.perf_counter() - t0, 2), "config": asdict(cfg)}


def _cycle(n: int, seed: int):
    """Indices 0..n-1 in a fresh seeded order each pass, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=g).tolist()


def _guard_stats(cfg: HealConfig, guard: Sequence[GuardBatch], kl: list[float]) -> dict:
    """The guard's record: weight, prompts, and its KL over the first and last tenth of the steps."""
    if not cfg.guard_weight:
        return {}
    tenth = max(len(kl) // 10, 1)
    return {"guard": {"weight": cfg.guard_weight, "prompts": int(sum(len(t) for _, _, t in guard)),
                      "kl_first": float(np.mean(kl[:tenth])) if kl else None,
                      "kl_last": float(np.mean(kl[-tenth:])) if kl else None}}
