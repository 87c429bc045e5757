"""Causal language models (``*ForCausalLM``): perplexity, zero-shot accuracy, healing.

Metric: perplexity on held-out token windows (:mod:`fusion_prune.lm`, one fixed protocol). The
drop-one measurement is the validation next-token NLL without each layer; recovery (off by
default) is full fine-tuning on train windows; the finish is healing (:mod:`fusion_prune.heal`:
LoRA, QLoRA or full) and, optionally, distillation from the teacher's logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fusion_prune.config import opt
from fusion_prune.dropone import next_token_score
from fusion_prune.fusion import DEFAULT_BUNDLE
from fusion_prune.heal import HealConfig
from fusion_prune.lm import TEACHER_TEXT
from fusion_prune.tasks.base import FinishConfig, Task, register_task

log = logging.getLogger(__name__)

#: examples of each zero-shot set scored when its spec gives no ``max_samples``
ZERO_SHOT_SAMPLES = 200
#: tokens of each --guard prompt (its text cut from the left): the label's cue sits at the end, and
#: the guard runs once per measured candidate, so short prompts keep it cheap (bbc-news at 256
#: tokens cost 4x rotten-tomatoes' time in the drop-one pass).
GUARD_MAX_LENGTH = 128


def guard_prompts(tok, guard: str, split: str, samples: int, seed: int, batch_size: int, device=None,
                  by_length: bool = False) -> dict[str, tuple[list[dict], list[int]]]:
    """``{dataset: (batches, verbaliser ids)}`` of :func:`fusion_prune.lm.zero_shot_batches` for each
    of the comma-separated ``guard`` datasets: a seeded sample of ``samples`` examples of ``split``,
    with the dataset's own prompt and verbalisers, at most :data:`GUARD_MAX_LENGTH` tokens
    (``by_length``: similar lengths batched together)."""
    from fusion_prune.data import load_dataset, subsample
    from fusion_prune.errors import BadInputError
    from fusion_prune.lm import parse_verbalisers, zero_shot_batches, zero_shot_defaults

    out = {}
    for name in (n.strip() for n in guard.split(",") if n.strip()):
        ds = load_dataset(name)
        prompt, words = zero_shot_defaults(name)
        try:
            out[name] = zero_shot_batches(tok, subsample(getattr(ds, split), samples, seed), ds.labels, prompt,
                                          parse_verbalisers(words, ds.labels), GUARD_MAX_LENGTH, batch_size, device,
                                          by_length)
        except BadInputError as e:
            raise BadInputError(f"The 'guard' dataset {name!r}: {e}") from None
    return out


def heal_guard(teacher, tok, guard: str, samples: int, seed: int) -> list:
    """The healing guard (:func:`fusion_prune.heal.guard_targets`): the teacher's answers on
    ``samples`` *train* prompts of each ``guard`` dataset (the choice's guard scores validation
    prompts), in batches of :data:`fusion_prune.heal.HEAL_GUARD_BATCH` on the teacher's device."""
    from fusion_prune.heal import HEAL_GUARD_BATCH, guard_targets

    return guard_targets(teacher, guard_prompts(tok, guard, "train", samples, seed, HEAL_GUARD_BATCH,
                                                next(teacher.parameters()).device).values())


@dataclass
class CausalLMFinish(FinishConfig):
    """How ``compress`` ends for a causal LM: healing, then optional distillation, zero-shot checks."""

    heal: HealConfig = opt(HealConfig, help="Healing after the removals (LoRA adapters are merged into the weights).")
    lm_distill_steps: int = opt(0, help="Causal LM: steps of distillation from the teacher's logits after healing.")
    kd_weight: float = opt(0.5, help="Causal LM: weight of the KL term in those steps (the rest is next-token loss).")
    #: {labelled dataset: {prompt, verbalisers, max_samples}} scored zero-shot before and after
    zero_shot: dict = opt(dict, help="Causal LM: labelled datasets to score zero-shot before and after.")
    replace: str = opt("none", help="Causal LM: 'linear' fits one linear map per run of removed layers on calibration "
                                   "tokens (least squares) and folds it into the layer before the run, before "
                                   "healing (ReplaceMe); 'linear-cosine' then lowers the mean cosine distance to "
                                   "the teacher's stream from there; 'layer' puts one trained layer back in place "
                                   "of each run (LLM-Streamline: one more layer per run); 'none' leaves the gap.")
    replace_samples: int = opt(16, help="Causal LM: training windows the --replace map or layer is fitted on.")
    heal_mix: str | None = opt(help="Causal LM: a general-text corpus mixed into the healing windows and those the "
                                    "--replace fit sees (a narrow corpus alone costs general ability); any corpus "
                                    "spec, or 'teacher': text the teacher samples itself (self-data distillation, "
                                    "when no general corpus is at hand).")
    heal_mix_share: float = opt(0.25, help="Causal LM: share of the healing windows that come from --heal-mix.")
    heal_teacher: bool = opt(False, help="Causal LM: also heal a copy of the teacher with the same method, steps and "
                                         "data, and report the student against it (the control that separates "
                                         "recovery from adapting to the corpus; one more healing run).")
    lm_eval: str | None = opt(help="Causal LM: lm-evaluation-harness tasks (comma-separated) scored on the teacher, "
                                   "the pruned and the final model: harness names, or fp_<dataset> built from a "
                                   "labelled asset (offline). Needs fusionprune[lm-eval].")
    lm_eval_include: str | None = opt(help="Causal LM: a folder of your own harness task YAMLs.")
    lm_eval_limit: int | None = opt(help="Causal LM: examples per harness task (default: all).")

    def __post_init__(self) -> None:
        super().__post_init__()
        from fusion_prune.replace import REPLACE_METHODS

        if self.replace not in REPLACE_METHODS:
            from fusion_prune.errors import bad_choice

            raise bad_choice("replace", self.replace, REPLACE_METHODS)
        if not 0 < self.heal_mix_share < 1:
            from fusion_prune.errors import BadInputError

            raise BadInputError(f"The '--heal-mix-share' option must be between 0 and 1 (exclusive). "
                                f"Got {self.heal_mix_share}.")
        if self.heal_mix and self.heal_mix != TEACHER_TEXT:  # a corpus that does not load fails now, not after
            from fusion_prune.corpus import load_corpus  # the choice and the replacement

            load_corpus(self.heal_mix)
        if self.lm_eval:  # a wrong name fails now, not after the hours the run takes to reach it
            from fusion_prune.harness import check_tasks, parse_tasks

            check_tasks(parse_tasks(self.lm_eval), self.lm_eval_include)

    flat: ClassVar[dict[str, str]] = {
        "heal_method": "heal.method", "heal_steps": "heal.steps", "heal_seconds": "heal.max_seconds",
        "heal_lr": "heal.lr", "lora_r": "heal.lora_r", "lora_alpha": "heal.lora_alpha", "lora_targets": "heal.target_modules", "kd_top_k": "heal.kd_top_k",
        "heal_kd_weight": "heal.kd_weight", "heal_guard_weight": "heal.guard_weight",
        "heal_guard_samples": "heal.guard_samples", "heal_eval_every": "heal.eval_every", "heal_patience": "heal.patience",
        "temperature": "heal.temperature", "heal_layers": "heal.top_layers",
    }
    # The run's batch size reaches healing; its learning rate does not (healing has its own, --heal-lr).
    shared: ClassVar[dict[str, tuple[str, ...]]] = {"heal": ("batch_size",)}


@register_task
class CausalLMTask(Task):
    name = "causal-lm"
    metric = "perplexity"
    unit = "windows"
    drop_one_order = (["loss_after_drop", "acc_after_drop"], [True, False])
    step_metric_key = "validation_perplexity"
    step_measured_key = "measured_nll_after_drop"
    # Measured in the loop (benchmarks/journal.md, "Healed alike"): on smollm2-135m, 30 -> 24, three
    # corpora, seeds 0-2, the LM bundle's top 3 decided by the measured drop-one NLL healed level
    # with SLEB (the previous default, which measures all 30 layers; geometric mean 75.5 against
    # 76.5, within noise, and lower at 10x the healing budget) at about half its CPU selection
    # time; the bundle alone (fusion) was behind both.
    default_strategy = "fusion-verify"
    budget_field = "max_perplexity_increase"
    teacher_metric_key = "teacher_validation_perplexity"
    higher_is_better = False
    throughput_unit = "tokens/s"
    streams_layers = True
    mmap_threshold = 4 << 20  # healing's heap slack: 3.1 -> 1.7 GiB on smollm2-135m (docs/memory.md)
    step_defaults: ClassVar[dict[str, Any]] = {"finetune_steps": 0, "signal_samples": 4, "drop_one_samples": 0,
                                               "max_length": 512, "batch_size": 4, "step_eval_samples": 8}
    finish_config = CausalLMFinish
    default_bundle = DEFAULT_BUNDLE.with_name("default-fusion-lm.npz")
    score = staticmethod(next_token_score)
    #: spacing of the predicting positions the MI signals pool over (see signals.capture)
    signal_token_stride = 16
    # The pass's activations (eager attention probabilities of every layer, kept for the gradient)
    # and its full-vocabulary logits were most of its 7.7 GiB peak on smollm2-135m; checkpointed and
    # chunked it peaks at 2.0-2.6 GiB (benchmarks/journal.md, "Peak memory per phase").
    signal_checkpoint_layers = True
    summary_at_last_token = True

    description = "causal LM"
    head_suffixes = ("ForCausalLM", "LMHeadModel")
    needs_unlabelled_data = True
    model_kinds = ("decoder",)
    scores_zero_shot = True

    @classmethod
    def data_type(cls):
        from fusion_prune.corpus import TextCorpus

        return TextCorpus

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[tuple, object] = {}
        self._zero_shot_sets: dict[str, tuple] = {}
        #: the zero-shot guard of the choice: (dataset, batches, scorer) per --guard set, and its weight
        self._guards: list[tuple[str, list[dict], Any]] = []
        self._guard_weight, self._guard_shortlist = 1.0, 0
        #: --calibration's windows {"train": (N, L), "validation": (M, L)}; {} for the dataset's own
        self._calibration: dict[str, Any] = {}

    def budget_limit(self, info, budget):
        # Relative: 0.5 allows 1.5x the teacher's validation perplexity (same windows), before healing.
        return info[self.teacher_metric_key] * (1 + budget)

    def load_data(self, spec, text_column="text", label_column="label"):
        from fusion_prune.corpus import load_corpus

        self.data = load_corpus(spec, text_column)
        self._windows = {}
        return self.data

    def load_model(self, spec):
        from fusion_prune.models import load_causal_lm

        model, tok = load_causal_lm(spec, dtype=self.dtype)
        return model, tok, True

    def windows(self, tok, split: str, step, cap_tokens: int | None = None):
        """Token windows (N, max_length) of one split, tokenised once per run."""
        from fusion_prune.corpus import token_windows

        key = (split, cap_tokens)
        if key not in self._windows:
            self._windows[key] = token_windows(tok, self.data.split(split), step.max_length, cap_tokens,
                                               what=f"{split!r} split of {self.data.spec!r}")
        return self._windows[key]

    def _sample(self, windows, n: int | None, seed: int):
        if n is None or n >= len(windows):
            return windows
        return windows[np.sort(np.random.default_rng(seed).choice(len(windows), n, replace=False))]

    def _ppl(self, model, tok, split, step, cap_windows: int | None = None) -> dict:
        from fusion_prune.lm import perplexity

        w = self.windows(tok, split, step, step.max_eval_tokens)
        return perplexity(model, w if cap_windows is None else w[:cap_windows], batch_size=step.batch_size)

    def prepare_teacher(self, model, tok, step, teacher, teacher_margin, ready, model_spec):
        from fusion_prune.models import check_max_length

        check_max_length(model, step.max_length)
        finish = getattr(step, "finish", None)
        if finish is not None:  # a --lora-targets typo fails now, not when healing starts after the choice
            from fusion_prune.heal import check_lora_targets

            check_lora_targets(model, finish.heal)
            if finish.heal_mix == TEACHER_TEXT:  # and a tokenizer with nothing to start the teacher's text from
                from fusion_prune.lm import start_token

                start_token(tok)
        for split in ("train", "validation", "test"):  # refuse a corpus too short for one window, up front
            self.windows(tok, split, step, step.max_eval_tokens if split != "train" else None)
        return {"teacher_finetuned": False,
                "teacher_validation_perplexity": self._ppl(model, tok, "validation", step, step.step_eval_samples)[
                    "perplexity"],
                "train_windows": int(len(self.windows(tok, "train", step))),
                **self.prepare_choice(lambda: model, tok, step)}

    def prepare_choice(self, teacher, tok, step):
        # each part resets its own state and needs no model when unset; a corpus named by --calibration
        # is read, not sampled, so a resume loads the teacher only for a guard or the teacher's own text
        model = teacher() if step.guard or step.calibration == TEACHER_TEXT else None
        return {**self._prepare_guard(model, tok, step), **self._prepare_calibration(model, tok, step)}

    def check_finish(self, step, finish) -> None:
        if finish.heal.guard_weight and not step.guard:
            from fusion_prune.errors import BadInputError

            raise BadInputError(f"The 'heal_guard_weight' parameter keeps the teacher's answers on --guard datasets' "
                                f"prompts; expected --guard DATASETS with it. Got --heal-guard-weight "
                                f"{finish.heal.guard_weight:g} and no --guard.")

    def _prepare_guard(self, model, tok, step) -> dict:
        """Build the --guard batches (validation examples of each labelled dataset) and score the
        teacher on them; {} without a guard."""
        from fusion_prune.dropone import kept_scores
        from fusion_prune.lm import teacher_answers, teacher_kl_scorer, zero_shot_scorer
        from fusion_prune.surgery import layer_list

        self._guards, self._guard_weight, self._guard_shortlist = [], step.guard_weight, step.guard_shortlist
        if not step.guard:
            return {}
        teacher = {}
        for name, (batches, ids) in guard_prompts(tok, step.guard, "validation", step.guard_samples, step.seed,
                                                  step.batch_size * 4, next(model.parameters()).device,
                                                  by_length=True).items():
            scorer = zero_shot_scorer(ids)
            correct, loss, count = kept_scores(model, batches, scorer, range(len(layer_list(model))))
            if step.guard_target == "teacher":
                batches, scorer = teacher_answers(model, batches, ids), teacher_kl_scorer(ids)
            self._guards.append((name, batches, scorer))
            teacher[name] = {"accuracy": correct / count, "loss": loss / count, "examples": int(count)}
            log.info("guard %s: %d validation examples; teacher zero-shot accuracy %.3f, loss %.4f", name, count,
                     correct / count, loss / count)
        return {"guard": teacher}

    def _prepare_calibration(self, model, tok, step) -> dict:
        """The windows the choice measures on when ``step.calibration`` names other text than the
        dataset: that corpus's train and (capped) validation windows, or for
        :data:`fusion_prune.lm.TEACHER_TEXT` twice as many windows as the dataset's capped validation
        split, written by the teacher (half each); ``{}`` without it."""
        from fusion_prune.corpus import load_corpus, token_windows
        from fusion_prune.lm import sample_windows, start_token

        self._calibration = {}
        if not step.calibration:
            return {}
        if step.calibration == TEACHER_TEXT:
            n = len(self.windows(tok, "validation", step, step.max_eval_tokens))
            log.info("sampling %d windows of %d tokens from the teacher for the choice (--calibration teacher)",
                     2 * n, step.max_length)
            w = sample_windows(model, 2 * n, step.max_length, start_token(tok, "--calibration"), seed=step.seed,
                               progress=step.progress)
            self._calibration = {"validation": w[:n], "train": w[n:]}
        else:
            data = load_corpus(step.calibration)
            self._calibration = {
                split: token_windows(tok, data.split(split), step.max_length, cap,
                                     what=f"{split!r} split of --calibration {step.calibration!r}")
                for split, cap in (("train", None), ("validation", step.max_eval_tokens))}
        return {"calibration": {"text": step.calibration,
                                **{f"{split}_windows": int(len(w)) for split, w in self._calibration.items()}}}

    def _choice_windows(self, tok, split: str, step):
        """The windows of ``split`` that the choice measures on (``--calibration``'s, else the dataset's)."""
        if split in self._calibration:
            return self._calibration[split]
        return self.windows(tok, split, step, step.max_eval_tokens if split != "train" else None)

    def calibration_batches(self, model, tok, step, k):
        from fusion_prune.corpus import window_batches

        w = self._sample(self._choice_windows(tok, "train", step), step.signal_samples, step.seed + k)
        return window_batches(w, step.batch_size, next(model.parameters()).device)

    def drop_one(self, model, tok, step, only=None):
        from fusion_prune.corpus import window_batches
        from fusion_prune.dropone import drop_one_nll

        w = self._choice_windows(tok, "validation", step)[: step.drop_one_samples or None]
        return self._with_guard(model, drop_one_nll(model, window_batches(w, step.batch_size,
                                                                           next(model.parameters()).device),
                                                    progress=step.progress, only=only), only)

    def score_batches(self, model, batches):
        return self._with_guard(model, super().score_batches(model, batches))

    def kept_loss(self, model, batches, keep):
        from fusion_prune.dropone import kept_scores

        loss = super().kept_loss(model, batches, keep)
        for _, guard_batches, scorer in self._guards:
            _, total, count = kept_scores(model, guard_batches, scorer, keep)
            loss += self._guard_weight * total / max(count, 1) / len(self._guards)
        return loss

    def _with_guard(self, model, dropone, only=None):
        """``dropone`` with the guard folded in: ``loss_after_drop`` becomes the next-token NLL
        (kept as ``nll_after_drop``) plus the weight times the guard sets' mean zero-shot loss
        (``guard_loss_after_drop``; their mean accuracy ``guard_acc_after_drop``). With a shortlist
        (--guard-shortlist K) only the K candidates of lowest NLL are scored; the others' guard
        columns and sum are NaN (not measured), which the measuring strategies pass over: a time
        saving that can change the choice where a candidate of higher NLL would win by its guard."""
        if not self._guards:
            return dropone
        from fusion_prune.dropone import drop_one_scores

        n = len(dropone.table)
        nll = dropone.table["loss_after_drop"].to_numpy(dtype=np.float64)
        measured = np.flatnonzero(np.isfinite(nll))
        if self._guard_shortlist and len(measured) > self._guard_shortlist:
            only = sorted(int(i) for i in measured[np.argsort(nll[measured], kind="stable")[: self._guard_shortlist]])
        loss, acc, before = np.zeros(n), np.zeros(n), 0.0
        for _, batches, scorer in self._guards:
            b, a = drop_one_scores(model, batches, scorer, only=only)
            loss += a[:, 1] / a[:, 2] / len(self._guards)
            acc += a[:, 0] / a[:, 2] / len(self._guards)
            before += b[1] / b[2] / len(self._guards)
        table = dropone.table.assign(nll_after_drop=dropone.table["loss_after_drop"], guard_loss_after_drop=loss,
                                     guard_acc_after_drop=acc)
        table["loss_after_drop"] = table["nll_after_drop"] + self._guard_weight * loss
        return replace(dropone, table=table, loss_before=(dropone.loss_before or 0.0) + self._guard_weight * before)

    def row_extras(self, dropone):
        return {"loss_before": dropone.loss_before, "task": self.name}

    def recover(self, model, tok, steps, step, seed, finish=None):
        from fusion_prune.heal import heal

        # Recovery is a short full fine-tune with the healing's own settings (learning rate, batch).
        base = finish.heal if finish is not None else HealConfig()
        heal(model, self.windows(tok, "train", step), replace(base, method="full", steps=steps, max_seconds=0.0,
                                                              seed=seed, kd_weight=0.0, guard_weight=0.0,
                                                              progress=False))

    def step_metric(self, model, tok, step):
        return self._ppl(model, tok, "validation", step, step.step_eval_samples)["perplexity"]

    def nothing_to_finish(self, finish):
        return replace(finish, lm_distill_steps=0, heal=replace(finish.heal, method="none", steps=0))

    def finish(self, teacher, student, tok, step, finish, info, prefinished=None):
        from fusion_prune.heal import heal

        with self.phase("evaluation"):
            teacher_ppl = self._ppl(teacher, tok, "test", step)
            pruned_ppl = self._ppl(student, tok, "test", step)
            zs = {name: {"teacher": self._zero_shot(teacher, tok, name, step, finish),
                         "pruned": self._zero_shot(student, tok, name, step, finish)} for name in finish.zero_shot}
            harness = {who: self._harness(m, tok, finish) for who, m in (("teacher", teacher), ("pruned", student))}
        heals = finish.heal.method != "none" and finish.heal.steps > 0
        limit = f", at most {finish.heal.max_seconds:g} s" if finish.heal.max_seconds else ""
        healing = f"healing ({finish.heal.method}, {finish.heal.steps} steps{limit})" if heals else "no healing"
        log.info("test perplexity: teacher %.2f, pruned %.2f; %s", teacher_ppl["perplexity"],
                 pruned_ppl["perplexity"], healing)
        train_w = self.windows(tok, "train", step)
        if finish.heal_mix:  # the replacement's fit and the healing alike (a map fitted on the corpus alone
            # cost more unseen-text perplexity: benchmarks/journal.md, "Linear replacement and general ability")
            train_w = self._mixed(teacher, tok, train_w, step, finish, heals)
        replace_stats, replaced_ppl = None, None
        if finish.replace != "none":
            from fusion_prune.replace import replace_layers

            with self.phase("replacement"):
                student, replace_stats = replace_layers(teacher, student, self._sample(train_w, finish.replace_samples,
                                                                                       step.seed),
                                                        step.batch_size, method=finish.replace)
            with self.phase("evaluation"):
                replaced_ppl = self._ppl(student, tok, "test", step)["perplexity"]
            log.info("%s replacement: test perplexity %.2f (pruned %.2f)%s", finish.replace, replaced_ppl,
                     pruned_ppl["perplexity"], f"; {replace_stats['added_layers']} layer(s) added"
                     if replace_stats.get("added_layers") else "")
        guard = heal_guard(teacher, tok, step.guard, finish.heal.guard_samples, step.seed) if finish.heal.guard_weight else ()
        # the corpus's own validation windows (never the mix's): healing stops when it over-fits them
        val_w = self.windows(tok, "validation", step, step.max_eval_tokens)
        with self.phase("healing"):
            student, heal_stats = heal(student, train_w, replace(finish.heal, seed=step.seed, progress=step.progress),
                                       teacher=teacher if finish.heal.kd_weight else None, guard=guard,
                                       validation=val_w)
        with self.phase("evaluation"):
            healed_ppl = self._ppl(student, tok, "test", step)
        distill_stats, student_ppl = None, healed_ppl
        if finish.lm_distill_steps:
            log.info("healed perplexity %.2f; distilling (%d steps)", healed_ppl["perplexity"], finish.lm_distill_steps)
            with self.phase("distillation"):
                student, distill_stats = heal(student, train_w, replace(
                    finish.heal, steps=finish.lm_distill_steps, max_seconds=0.0, kd_weight=finish.kd_weight,
                    seed=step.seed + 1, progress=step.progress), teacher=teacher, guard=guard, validation=val_w)
            with self.phase("evaluation"):
                student_ppl = self._ppl(student, tok, "test", step)
        with self.phase("evaluation"):
            for name in finish.zero_shot:
                zs[name]["student"] = self._zero_shot(student, tok, name, step, finish)
            harness["student"] = self._harness(student, tok, finish)
        control = None
        if finish.heal_teacher and heals:
            # Last, when the teacher is needed for nothing else: healed in place, no second copy.
            # auto's choice for the student, not redone; the steps it took (a time limit or the validation
            # check may have cut them), without a check of its own: the same budget
            method, steps = heal_stats.get("method", finish.heal.method), heal_stats.get("steps", finish.heal.steps)
            steps = heal_stats.get("early_stopping", {}).get("best_step") or steps  # the student kept that step's weights
            log.info("healing the teacher alike (%s, %d steps): the control", method, steps)
            with self.phase("healing"):
                teacher, control_stats = heal(teacher, train_w, replace(finish.heal, method=method, steps=steps,
                                                                        max_seconds=0.0, kd_weight=0.0,
                                                                        seed=step.seed, progress=step.progress),
                                               guard=guard)  # alike: the guard too (toward its own answers)
            with self.phase("evaluation"):
                control_ppl = self._ppl(teacher, tok, "test", step)
                for name in finish.zero_shot:
                    zs[name]["healed_teacher"] = self._zero_shot(teacher, tok, name, step, finish)
                harness["healed_teacher"] = self._harness(teacher, tok, finish)
            control = {"perplexity": control_ppl["perplexity"], "nll": control_ppl["nll"],
                       "student_over_healed_teacher": student_ppl["perplexity"] / control_ppl["perplexity"],
                       "heal": control_stats}
        lm_eval = {task: {who: harness[who][task] for who in harness} for task in harness["student"]} or None
        return student, {
            "metric": "perplexity", "teacher_perplexity": teacher_ppl["perplexity"],
            "pruned_perplexity": pruned_ppl["perplexity"], "healed_perplexity": healed_ppl["perplexity"],
            "student_perplexity": student_ppl["perplexity"],
            "teacher_nll": teacher_ppl["nll"], "student_nll": student_ppl["nll"], "test_tokens": teacher_ppl["tokens"],
            "zero_shot": zs or None, "lm_eval": lm_eval, "heal": heal_stats, "distill": distill_stats,
            "healed_teacher": control, "replacement": replace_stats, "replaced_perplexity": replaced_ppl,
            "data": self.data.describe(),
        }

    def _mixed(self, teacher, tok, train_w, step, finish, heals: bool):
        """The healing windows with ``finish.heal_mix``'s train windows (or windows the teacher samples,
        :data:`fusion_prune.lm.TEACHER_TEXT`) as ``heal_mix_share`` of them; the teacher's text is sampled
        only for as many windows as the replacement's fit, healing (when ``heals``) and distillation can read."""
        import contextlib

        import torch

        from fusion_prune.corpus import mix_count, mix_windows
        from fusion_prune.lm import general_windows

        n = mix_count(len(train_w), finish.heal_mix_share)
        sampled = finish.heal_mix == TEACHER_TEXT
        # Sampling is the costly part (seconds a window on a CPU) and the steps read at most `visit`
        # windows: a seeded sample of that many positions of the mixed set, corpus and general alike,
        # is what is built, so only the general windows it holds are sampled. Reading a random part
        # of a random part of the set is reading a random part of it: the mix's share is unchanged.
        visit = ((finish.heal.steps if heals else 0) + finish.lm_distill_steps) * finish.heal.batch_size \
            + (finish.replace_samples or len(train_w) + n if finish.replace != "none" else 0)
        capped = sampled and visit < len(train_w) + n
        if capped:
            pick = torch.randperm(len(train_w) + n, generator=torch.Generator().manual_seed(step.seed))[:visit]
            log.info("the steps read at most %d of the %d mixed windows: sampling those", visit, len(train_w) + n)
            train_w, n = train_w[pick[pick < len(train_w)].sort().values], int((pick >= len(train_w)).sum())
        if sampled:
            log.info("sampling %d windows of %d tokens from the teacher (--heal-mix teacher)", n, step.max_length)
        with self.phase("sampling") if sampled else contextlib.nullcontext():
            general = general_windows(finish.heal_mix, teacher, tok, n, step.max_length, seed=step.seed,
                                      progress=step.progress)
        # capped: the sampled windows are already as many as the share asks of what is read
        mixed = torch.cat([train_w, general]) if capped else mix_windows(train_w, general, finish.heal_mix_share,
                                                                          seed=step.seed)
        log.info("training on %d windows: %d of them general text (%s)", len(mixed), len(mixed) - len(train_w),
                 finish.heal_mix)
        return mixed

    def _harness(self, model, tok, finish) -> dict:
        """lm-evaluation-harness results ``{task: {metric: value}}`` of ``model`` ({} without --lm-eval)."""
        if not finish.lm_eval:
            return {}
        from fusion_prune.harness import parse_tasks, run

        return run(model, tok, parse_tasks(finish.lm_eval), include=finish.lm_eval_include, limit=finish.lm_eval_limit)

    def _zero_shot(self, model, tok, name: str, step, finish) -> dict:
        from fusion_prune.data import load_dataset, subsample
        from fusion_prune.lm import parse_verbalisers, zero_shot, zero_shot_defaults

        spec = finish.zero_shot[name]
        prompt, verbalisers = zero_shot_defaults(name, spec.get("prompt"), spec.get("verbalisers"))
        if name not in self._zero_shot_sets:  # the same examples for the teacher, pruned and final model
            ds = load_dataset(name)
            self._zero_shot_sets[name] = (subsample(ds.test, spec.get("max_samples") or ZERO_SHOT_SAMPLES, step.seed),
                                          ds.labels)
        df, labels = self._zero_shot_sets[name]
        return zero_shot(model, tok, df, labels, prompt, parse_verbalisers(verbalisers, labels),
                         max_length=spec.get("max_length", 256), batch_size=step.batch_size * 2)

    # ------------------------------------------------------------------ analysis
    analysis_drop_one_samples = 8

    def analysis_signals(self, model, tok, step, names, split, progress=True):
        # The windows compress draws at its first step (the train split, whatever `split` says).
        return self.signals(model, self.calibration_batches(model, tok, step, 0), names), "train", step.signal_samples

    def count_drop_one(self, step):
        return step.drop_one_samples

    # ------------------------------------------------------------------ evaluation and reports
    def evaluate(self, model_spec, dataset_spec, *, split="test", text_column="text", label_column="label",
                 batch_size=None, max_length=None, max_samples=None, max_eval_tokens=None, progress=True,
                 zero_shot=False, prompt=None, verbalisers=None, lm_eval=None, lm_eval_include=None,
                 limit=None, **options):
        from fusion_prune import lm
        from fusion_prune.corpus import token_windows
        from fusion_prune.data import load_dataset, subsample
        from fusion_prune.models import resolve_max_length

        if lm_eval:
            from fusion_prune.harness import check_tasks, parse_tasks, run

            tasks = parse_tasks(lm_eval)
            check_tasks(tasks, lm_eval_include)  # before the model is loaded
            net, tok, _ = self.load_model(model_spec)
            return {"lm_eval": run(net, tok, tasks, include=lm_eval_include, limit=limit, batch_size=batch_size or 8,
                                   max_length=max_length or 256), "model": model_spec, "limit": limit,
                    "task": self.name}
        net, tok, _ = self.load_model(model_spec)
        if zero_shot:
            data = load_dataset(dataset_spec, text_column, label_column)
            df = subsample(data.split(split), max_samples, 0)
            prompt, verbalisers = lm.zero_shot_defaults(dataset_spec, prompt, verbalisers)
            res = lm.zero_shot(net, tok, df, data.labels, prompt, lm.parse_verbalisers(verbalisers, data.labels),
                               max_length=max_length or 256, batch_size=batch_size or 8, progress=progress)
            max_length = max_length or 256
        else:
            max_length = resolve_max_length(net, max_length, 512)
            corpus = self.load_data(dataset_spec, text_column)
            windows = token_windows(tok, corpus.split(split), max_length, max_eval_tokens,
                                    what=f"{split!r} split of {dataset_spec!r}")
            res = lm.perplexity(net, windows, batch_size or 4, progress=progress)
        return {**res, "model": model_spec, "dataset": dataset_spec, "split": split, "max_length": max_length,
                "task": self.name}

    def evaluation_line(self, r):
        if "lm_eval" in r:
            return "\n".join(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                             for task, metrics in r["lm_eval"].items())
        if "perplexity" not in r:
            return (f"{r['split']}: zero-shot accuracy {r['accuracy']:.4f}  (majority share {r['majority_share']:.4f}, "
                    f"{r['examples']} examples, {r['eval_seconds']:.1f} s)")
        return (f"{r['split']}: perplexity {r['perplexity']:.3f}  NLL {r['nll']:.4f}  ({r['tokens']} tokens, "
                f"{r['eval_seconds']:.1f} s)")

    def summary_lines(self, report):
        r = report.results
        lines = [f"teacher perplexity {r['teacher_perplexity']:.3f}",
                 f"pruned perplexity  {r['pruned_perplexity']:.3f}  (after removal, before healing)",
                 f"healed perplexity  {r['healed_perplexity']:.3f}  ({_heal_label(r['heal'])})"]
        if r.get("distill"):
            lines.append(f"student perplexity {r['student_perplexity']:.3f}  (after distillation)")
        if r.get("replaced_perplexity") is not None:
            lines.append(f"replaced perplexity {r['replaced_perplexity']:.3f}  ({_replacement_label(r['replacement'])}, "
                         f"before healing)")
        if r.get("healed_teacher"):
            c = r["healed_teacher"]
            lines.append(f"healed teacher     {c['perplexity']:.3f}  (the control, healed alike; student / it "
                         f"{c['student_over_healed_teacher']:.3f})")
        for name, z in (r.get("zero_shot") or {}).items():
            lines.append(f"zero-shot {name}: teacher {z['teacher']['accuracy']:.3f}, pruned "
                         f"{z['pruned']['accuracy']:.3f}, final {z['student']['accuracy']:.3f}")
        for task, z in (r.get("lm_eval") or {}).items():
            metric = "acc" if "acc" in z["teacher"] else next(iter(z["teacher"]))
            lines.append(f"lm-eval {task} {metric}: teacher {z['teacher'][metric]:.3f}, pruned "
                         f"{z['pruned'][metric]:.3f}, final {z['student'][metric]:.3f}")
        return lines

    def report_section(self, report):
        r = report.results
        heal = r.get("heal") or {}
        lines = [
            f"# fusionprune compress (causal LM): {report.model} on {report.dataset}", "",
            f"Strategy `{report.strategy}`: {report.teacher_layers} -> {report.student_layers} layers, "
            f"kept original layers {report.kept_layers}.", "",
            f"Test perplexity over {r['test_tokens']} predicted tokens (windows of "
            f"{report.config['max_length']} tokens, no overlap; see fusion_prune/lm.py):", "",
            "| stage | test perplexity |", "|---|---|",
            f"| teacher | {r['teacher_perplexity']:.3f} |",
            f"| pruned, before healing | {r['pruned_perplexity']:.3f} |",
            f"| {_replacement_label(r['replacement'])}, before healing | {r['replaced_perplexity']:.3f} |"
            if r.get("replaced_perplexity") is not None else "",
            f"| healed ({_heal_label(heal)}) | {r['healed_perplexity']:.3f} |",
            f"| after distillation | {r['student_perplexity']:.3f} |" if r.get("distill") else "",
            f"| teacher healed alike (control) | {r['healed_teacher']['perplexity']:.3f} |"
            if r.get("healed_teacher") else "", "",
        ]
        if r.get("zero_shot"):
            lines += ["| zero-shot accuracy | teacher | pruned | final | majority share |", "|---|---|---|---|---|"]
            for name, z in r["zero_shot"].items():
                lines.append(f"| {name} | {z['teacher']['accuracy']:.3f} | {z['pruned']['accuracy']:.3f} | "
                             f"{z['student']['accuracy']:.3f} | {z['teacher']['majority_share']:.3f} |")
            lines.append("")
        if r.get("lm_eval"):
            lines += ["lm-evaluation-harness (no BOS token, as fusionprune scores; `fp_*` tasks are built from "
                      "fusionprune's labelled assets):", "",
                      "| task | metric | teacher | pruned | final |", "|---|---|---|---|---|"]
            for task, z in r["lm_eval"].items():
                lines += [f"| {task} | {m} | {z['teacher'][m]:.4f} | {z['pruned'][m]:.4f} | {z['student'][m]:.4f} |"
                          for m in z["teacher"]]
            lines.append("")
        for name, g in (report.info.get("guard") or {}).items():
            lines += [f"Zero-shot guard of the choice: {name} ({g['examples']} validation examples; teacher accuracy "
                      f"{g['accuracy']:.3f}, loss {g['loss']:.4f}), weight {report.config.get('guard_weight')}: each "
                      "candidate's measured loss is its next-token NLL plus the weight times the guard's loss ("
                      + ("KL from the teacher's answers" if report.config.get("guard_target") == "teacher"
                         else "cross-entropy of the gold class") + ").", ""]
        c = report.info.get("calibration")
        if c:
            text = "text the teacher sampled itself" if c["text"] == TEACHER_TEXT else f"the corpus {c['text']!r}"
            lines += [f"The choice measured on {text} ({c['train_windows']} calibration and {c['validation_windows']} "
                      "validation windows), not on the dataset's (`--calibration`); the per-step perplexity and "
                      "healing are the dataset's.", ""]
        lines += [f"Wall time {report.wall_seconds:.0f} s; time spent choosing layers {report.selection_seconds:.1f} s.",
                  ""]
        return lines

    def step_table(self, report):
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        measured = "measured NLL + guard loss" if report.info.get("guard") else "measured NLL"
        lines = [f"| step | layers | dropped (original) | {measured} right after | validation perplexity |",
                 "|---|---|---|---|---|"]
        for e in report.history:
            lines.append(f"| {e.step} | {e.layers_before} | {e.dropped_orig} | {fmt(e.measured)} | {e.metric:.3f} |")
        return lines + [""]

    def report_plots(self, report, folder: Path):
        from fusion_prune.report import plot_per_step

        title = f"{report.model_name} on {report.dataset_name}: validation perplexity ({report.strategy})"
        plot_per_step(report, folder / "perplexity.png", report.info[self.teacher_metric_key],
                      [([e.metric for e in report.history], "o-", "after each removal")], "validation perplexity",
                      title, log=True, budget=report.info.get("budget_limit"), fontsize=9,
                      test={"teacher": report.results.get("teacher_perplexity"),
                            "pruned": report.results.get("pruned_perplexity"),
                            "after distillation" if report.results.get("distill") else
                            "after healing" if report.results.get("heal") else "final":
                            report.results.get("student_perplexity")})
        return ["![perplexity](plots/perplexity.png)", ""]


def _heal_label(record: dict) -> str:
    """The report's name for a healing run: method and steps, and whether the time limit or the
    validation check ended it."""
    limit = ", stopped by --heal-seconds" if record.get("stopped_by") == "time limit" else ""
    if record.get("stopped_by") == "validation loss":
        limit = f", stopped by the validation loss (weights of step {record['early_stopping']['best_step']} kept)"
    weight = (record.get("config") or {}).get("kd_weight")
    kd = f", KL to the teacher weighted {weight:g}" if weight else ""
    return f"{record.get('method', 'none')}, {record.get('steps', 0)} steps{kd}{limit}"


def _replacement_label(record: dict) -> str:
    """The report's name for a replacement: what was put where the removed layers were."""
    if record.get("method") == "layer":
        return f"layer replacement ({record.get('added_layers', 0)} trained layer(s) put back)"
    return f"{record.get('method', 'linear')} replacement folded in"
