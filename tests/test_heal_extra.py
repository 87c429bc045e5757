"""Partial fine-tuning (--heal partial) and the healed-teacher control (--heal-teacher)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from test_causal_lm import corpus_txt, llama_dir, word_labels_dir  # noqa: F401 - module fixtures


def test_partial_healing_trains_only_the_top_layers_the_norm_and_the_head(llama_dir):  # noqa: F811
    from fusion_prune.errors import BadInputError
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(llama_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    healed, stats = heal(model, windows, HealConfig(method="partial", top_layers=1, steps=2, batch_size=2, lr=1e-2,
                                                   progress=False))
    after = healed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.3.", "model.norm.", "lm_head.")) for k in changed)
    assert any(k.startswith("model.layers.3.") for k in changed) and "lm_head.weight" in changed
    assert "model.norm.weight" in changed and stats["method"] == "partial"
    assert stats["trainable_parameters"] == sum(before[k].numel() for k in before
                                                if k.startswith(("model.layers.3.", "model.norm.", "lm_head.")))
    assert all(p.requires_grad for p in healed.parameters())  # handed back trainable, as every method does
    with pytest.raises(BadInputError, match="'--heal-layers' option must be between 1 and the student's depth 4"):
        heal(healed, windows, HealConfig(method="partial", top_layers=5, steps=1, batch_size=2, progress=False))


def test_the_healed_teacher_control_is_reported(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    from fusion_prune.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3",
                                    "-o", str(out), "--max-length", "16", "--heal-steps", "2", "--max-eval-tokens",
                                    "64", "--signal-samples", "2", "--batch-size", "2", "--strategy", "deepest",
                                    "--heal", "partial", "--heal-layers", "2", "--heal-teacher"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    c = r["healed_teacher"]
    assert c["heal"]["method"] == "partial" and c["heal"]["steps"] == 2
    assert c["student_over_healed_teacher"] == pytest.approx(r["student_perplexity"] / c["perplexity"])
    assert c["perplexity"] != pytest.approx(r["teacher_perplexity"])  # the teacher was trained, not re-measured
    assert "healed teacher" in res.output and "| teacher healed alike (control) |" in (out / "report.md").read_text()


def test_mixed_windows_hold_the_general_share():
    from fusion_prune.corpus import mix_windows
    from fusion_prune.errors import BadInputError

    narrow, general = torch.zeros(30, 8, dtype=torch.long), torch.arange(1, 7 * 8 + 1).view(7, 8)
    mixed = mix_windows(narrow, general, 0.25, seed=1)
    assert mixed.shape == (40, 8) and torch.equal(mixed[:30], narrow)
    extra = mixed[30:]
    assert all(any(torch.equal(w, g) for g in general) for w in extra)  # whole general windows
    assert len({tuple(w.tolist()) for w in extra}) == 7  # every general window before any twice
    assert torch.equal(mix_windows(narrow, general, 0.25, seed=1), mixed)  # seeded
    with pytest.raises(BadInputError, match="'heal_mix_share' parameter must be in \\[0, 1\\). Got 1.0"):
        mix_windows(narrow, general, 1.0)


def test_compress_replace_layer_and_heal_mix(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    """--replace layer puts a trained layer back per run of two or more removed layers (the output
    is one layer deeper and says where it came from); --heal-mix heals on the corpus plus general text."""
    from fusion_prune.cli import main
    from fusion_prune.surgery import kept_layers

    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(f"General paragraph {i} about the weather, ships and markets." * 3
                                   for i in range(40)))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                                    "-o", str(out), "--max-length", "16", "--heal-steps", "2", "--max-eval-tokens",
                                    "64", "--signal-samples", "2", "--batch-size", "2", "--strategy", "deepest",
                                    "--replace", "layer", "--replace-samples", "4", "--heal", "full",
                                    "--heal-mix", str(general), "--heal-mix-share", "0.5"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    (run,) = r["replacement"]["runs"]
    assert r["replacement"]["method"] == "layer" and r["replacement"]["added_layers"] == 1
    assert run["run"] == [1, 2] and run["initialised_from"] in (1, 2)  # deepest keeps the first and the last
    assert r["student_layers"] == 3 and kept_layers(_config(out)) == [0, run["initialised_from"], 3]
    assert "general text" in res.output and "layer replacement (1 trained layer(s) put back)" in \
        (out / "report.md").read_text()
    bad = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                                    "-o", str(tmp_path / "bad"), "--heal-mix-share", "1.5"])
    assert bad.exit_code != 0 and "'--heal-mix-share' option must be between 0 and 1 (exclusive). Got 1.5." in bad.output


def load_causal_lm_dir(folder):
    from fusion_prune.models import load_causal_lm

    return load_causal_lm(str(folder))


def _config(out):
    from transformers import AutoConfig

    folder = next(p.parent for p in out.rglob("config.json") if "checkpoint" not in str(p))
    return AutoConfig.from_pretrained(folder)


def test_auto_heals_fully_where_the_training_state_fits_else_with_lora(llama_dir, monkeypatch, caplog):  # noqa: F811
    """--heal auto (the default): full fine-tuning when 12 bytes a parameter fit in half the free
    memory, LoRA when they do not; the choice and its reason are in the healing record."""
    import fusion_prune.memory as memory
    from fusion_prune.heal import FULL_TRAINING_BYTES, HealConfig, heal
    from fusion_prune.models import load_causal_lm

    assert HealConfig().method == "auto"
    model, _ = load_causal_lm(str(llama_dir))
    need = sum(p.numel() for p in model.parameters()) * FULL_TRAINING_BYTES
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    cfg = HealConfig(steps=1, batch_size=2, progress=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2 * need)
    _, stats = heal(model, windows, cfg)
    assert stats["method"] == "full" and stats["method_chosen"].startswith("auto: full fine-tuning's")
    with caplog.at_level("WARNING", logger="fusion_prune.heal"):  # LoRA settings that full training ignores: said
        heal(model, windows, replace(cfg, lora_r=4, target_modules="q_proj"))
    assert "--lora-r, --lora-targets set but --heal auto chose full fine-tuning" in caplog.text
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2 * need - 1)
    _, stats = heal(model, windows, cfg)
    assert stats["method"] == "lora" and "exceeds half" in stats["method_chosen"]
    monkeypatch.undo()
    assert 0 < memory.available_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Clock:
    """A stand-in for the ``time`` module: every reading is ``tick`` seconds after the last."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_a_time_limit_ends_healing_with_the_schedule_fitted_to_it(llama_dir, monkeypatch):  # noqa: F811
    import fusion_prune.training as training
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm

    # the limit counts the loop's clock only: a reading at the start and one after each step, 10 s apart
    monkeypatch.setattr(training, "time", _Clock(10.0))
    lrs = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    model, _ = load_causal_lm(str(llama_dir))
    windows = torch.randint(5, 20, (8, 16), generator=torch.Generator().manual_seed(3))
    _, stats = heal(model, windows, HealConfig(method="full", steps=100, max_seconds=35, batch_size=2, lr=1e-2,
                                               progress=False))
    # 10 s a step: three fit in 35 s, and the learning rate decays over those three, not over 100
    assert stats["steps"] == 3 and stats["stopped_by"] == "time limit"
    assert lrs == pytest.approx([0.0, 1e-2 * 2 / 3, 1e-2 / 3])
    _, stats = heal(model, windows, HealConfig(method="full", steps=2, max_seconds=35, batch_size=2, progress=False))
    assert stats["steps"] == 2 and stats["stopped_by"] == "steps"  # the step budget stays the ceiling


def test_the_time_limit_is_checked_on_the_command_line(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    from fusion_prune.cli import main

    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3",
                                    "-o", str(tmp_path / "out"), "--heal-seconds", "-5"])
    assert res.exit_code == 2 and "'--heal-seconds' option must be a number >= 0" in res.output


def test_healing_says_when_it_passes_over_its_windows_more_than_once(llama_dir, caplog):  # noqa: F811
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(llama_dir))
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="fusion_prune.heal"):
        _, once = heal(model, windows, HealConfig(method="full", steps=2, batch_size=2, progress=False))
    assert once["passes"] == 1.0 and "over-fits" not in caplog.text
    with caplog.at_level("WARNING", logger="fusion_prune.heal"):
        _, thrice = heal(model, windows, HealConfig(method="full", steps=6, batch_size=2, progress=False))
    assert thrice["passes"] == 3.0 and "4 training windows 3.0 times" in caplog.text


def test_the_healing_guard_keeps_the_teachers_answers(llama_dir):  # noqa: F811
    """--heal-guard-weight: the teacher's verbaliser logits are the targets; with the guard the
    healed student's answers on the guard prompts end closer to the teacher's than without it, from
    the same start, seed and windows; the record says so; no guard prompts is refused."""
    from conftest import sentiment_frame

    from distill.losses import soft_kl
    from fusion_prune.errors import BadInputError
    from fusion_prune.heal import HealConfig, guard_targets, heal
    from fusion_prune.lm import verbaliser_logits, zero_shot_batches
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import drop_layers

    teacher, tok = load_causal_lm(str(llama_dir))
    df = sentiment_frame(16).assign(label=lambda d: (d.label == "neg").astype(int))
    batches, ids = zero_shot_batches(tok, df, ["pos", "neg"], "{text} is", [" good", " bad"], max_length=32,
                                     batch_size=4)
    guard = guard_targets(teacher, [(batches, ids)])
    assert len(guard) == 4 and all(t.shape == (len(b["labels"]), 2) for b, _, t in guard)
    # the targets are the teacher's own answers: its KL to them is zero, one prompt at a time too
    text = df["text"][0] + " is"
    with torch.no_grad():
        alone = teacher(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, -1, ids]
    assert torch.allclose(guard[0][2][0], alone, atol=1e-4)

    def distance(model):
        with torch.no_grad():
            return sum(float(soft_kl(verbaliser_logits(model, {k: b[k] for k in ("input_ids", "attention_mask")},
                                                       b["labels"][:, 1], v), t, 1.0)) for b, v, t in guard)

    assert distance(teacher) == pytest.approx(0.0, abs=1e-6)
    windows = torch.randint(5, 20, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = HealConfig(method="full", steps=6, batch_size=2, lr=1e-2, progress=False, seed=1)
    plain, _ = heal(drop_layers(teacher, [1]), windows, cfg)
    guarded, stats = heal(drop_layers(teacher, [1]), windows, replace(cfg, guard_weight=5.0), guard=guard)
    assert distance(guarded) < distance(plain)
    g = stats["guard"]
    assert g["weight"] == 5.0 and g["prompts"] == 16 and g["kl_first"] >= 0 and g["kl_last"] >= 0
    with pytest.raises(BadInputError, match="'heal_guard_weight' parameter needs --guard"):
        heal(drop_layers(teacher, [1]), windows, replace(cfg, guard_weight=1.0))


def test_heal_guard_weight_through_compress(llama_dir, corpus_txt, word_labels_dir, tmp_path):  # noqa: F811
    from fusion_prune.cli import main

    base = ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3", "--max-length", "16",
            "--heal-steps", "2", "--max-eval-tokens", "64", "--signal-samples", "2", "--batch-size", "2",
            "--strategy", "deepest", "--heal", "full", "--heal-guard-weight", "2"]
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "refused")])
    assert res.exit_code != 0 and "--heal-guard-weight 2 and no --guard" in res.output
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    # every healing in the run takes it alike or leaves it out: the recovery between removals (off),
    # the distillation after healing and the healed-teacher control (on)
    res = CliRunner().invoke(main, [*base, "-o", str(out), "--guard", str(word_labels_dir), "--guard-samples", "4",
                                    "--heal-guard-samples", "12",
                                    "--finetune-steps", "1", "--lm-distill-steps", "1", "--heal-teacher"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["heal"]["guard"]["prompts"] == 12 and r["heal"]["guard"]["weight"] == 2.0
    assert r["distill"]["guard"]["prompts"] == 12 and r["healed_teacher"]["heal"]["guard"]["prompts"] == 12


def test_healing_stops_when_the_validation_loss_rises_and_keeps_the_best_weights(llama_dir):  # noqa: F811
    """One window repeated is memorised; the validation windows, other tokens, get worse as it is:
    the check every 2 steps stops after 2 checks without a gain and the model ends with the weights
    of the best check."""
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.lm import perplexity
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(llama_dir))
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(5, 12, (1, 16), generator=g).repeat(8, 1)
    validation = torch.randint(12, 23, (4, 16), generator=g)  # the rest of the 23-token vocabulary
    cfg = HealConfig(method="full", steps=200, batch_size=2, lr=1e-2, eval_every=2, patience=2, progress=False)
    healed, stats = heal(model, windows, cfg, validation=validation)
    es = stats["early_stopping"]
    curve = es["curve"]
    assert stats["stopped_by"] == "validation loss" and stats["steps"] < 200
    assert [s for s, _ in curve] == list(range(2, stats["steps"] + 1, 2))
    best = min(v for _, v in curve)
    assert es["best_validation_nll"] == pytest.approx(best, abs=1e-4) and es["best_step"] <= stats["steps"] - 4
    assert all(v > best for _, v in curve[-2:])  # the two checks that stopped it
    assert perplexity(healed, validation, 2)["nll"] == pytest.approx(best, abs=1e-4)  # the best weights, restored
    # no validation windows, or a check every 0 steps: the whole budget, as before
    _, plain = heal(load_causal_lm(str(llama_dir))[0], windows, replace(cfg, steps=6))
    _, off = heal(load_causal_lm(str(llama_dir))[0], windows, replace(cfg, steps=6, eval_every=0),
                  validation=validation)
    assert plain["steps"] == off["steps"] == 6 and "early_stopping" not in plain and "early_stopping" not in off


def test_the_validation_check_of_healing_through_compress(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    from fusion_prune.cli import main

    base = ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3", "--max-length", "16",
            "--heal-steps", "4", "--max-eval-tokens", "64", "--signal-samples", "2", "--batch-size", "2",
            "--strategy", "deepest", "--heal", "full"]
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "refused"), "--heal-eval-every", "-1"])
    assert res.exit_code == 2 and "'--heal-eval-every' option must be" in res.output
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [*base, "-o", str(out), "--heal-eval-every", "1", "--heal-patience", "1",
                                    "--heal-teacher"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    es = r["heal"]["early_stopping"]
    assert es["every"] == 1 and es["patience"] == 1 and len(es["curve"]) == r["heal"]["steps"]
    # the control heals the teacher for the steps whose weights the student kept, with no check of its own
    assert r["healed_teacher"]["heal"]["steps"] == es["best_step"]
    assert "early_stopping" not in r["healed_teacher"]["heal"]


def test_the_report_says_when_the_validation_check_ended_healing():
    from fusion_prune.tasks.causal_lm import _heal_label

    rec = {"method": "full", "steps": 60, "stopped_by": "validation loss", "early_stopping": {"best_step": 40}}
    assert _heal_label(rec) == "full, 60 steps, stopped by the validation loss (weights of step 40 kept)"
    assert _heal_label({"method": "lora", "steps": 30, "stopped_by": "steps"}) == "lora, 30 steps"


def test_lora_targets_are_checked_as_the_teacher_loads(llama_dir, corpus_txt, tmp_path, monkeypatch):  # noqa: F811
    """A --lora-targets name the model lacks is refused in one line before the choice runs; names it
    has, all-linear, and methods that use no adapters pass."""
    from fusion_prune import loop
    from fusion_prune.cli import main
    from fusion_prune.errors import BadInputError
    from fusion_prune.heal import HealConfig, check_lora_targets
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(llama_dir))
    for ok in ("q_proj,v_proj", "all-linear", "self_attn.o_proj", "mlp.down_proj"):
        check_lora_targets(model, HealConfig(method="lora", target_modules=ok))
    check_lora_targets(model, HealConfig(method="full", target_modules="nope"))  # full trains no adapters
    with pytest.raises(BadInputError, match=r"'--lora-targets' option must name modules of LlamaForCausalLM .*"
                                            r"such as .*q_proj.*; c_attn matches none. Got 'q_proj,c_attn'"):
        check_lora_targets(model, HealConfig(method="auto", target_modules="q_proj,c_attn"))

    def no_choice(*a, **k):
        raise AssertionError("the choice ran before the bad --lora-targets was refused")

    monkeypatch.setattr(loop, "measure_state", no_choice)
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--task", "causal-lm",
                                    "--target-layers", "3", "-o", str(tmp_path / "o"), "--max-length", "16",
                                    "--max-eval-tokens", "64", "--lora-targets", "qproj", "--heal", "lora"])
    assert res.exit_code == 2 and "'--lora-targets' option must name modules" in res.output, res.output
    assert "Traceback" not in res.output and "such as" in res.output


def test_sampled_windows_follow_the_model_and_leave_its_state(llama_dir):  # noqa: F811
    """--heal-mix teacher's text: seeded, from the start token, at temperature 1 with no top-k (the
    first sampled token's frequencies match the model's softmax), end-of-text no stop, and neither
    the global random state nor the model's mode changed."""
    from fusion_prune.lm import sample_windows

    model, _ = load_causal_lm_dir(llama_dir)
    model.train()
    rng_before = torch.get_rng_state()
    w = sample_windows(model, 6, 12, start_id=3, seed=5, batch_size=4)
    assert w.shape == (6, 12) and w.dtype == torch.long and (w[:, 0] == 3).all()
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training
    assert torch.equal(sample_windows(model, 6, 12, start_id=3, seed=5, batch_size=4), w)
    assert not torch.equal(sample_windows(model, 6, 12, start_id=3, seed=6, batch_size=4), w)
    assert sample_windows(model, 0, 12, start_id=3).shape == (0, 12)
    # a token the model's generation config calls end-of-text is sampled on, not stopped at
    model.generation_config.eos_token_id = int(w[0, 5])
    assert torch.equal(sample_windows(model, 6, 12, start_id=3, seed=5, batch_size=4), w)
    # temperature 1, whole vocabulary: the first sampled token is drawn from softmax(logits)
    first = sample_windows(model, 3000, 2, start_id=3, seed=0, batch_size=1000)[:, 1]
    with torch.no_grad():
        p = model(torch.tensor([[3]])).logits[0, -1].softmax(-1)
    freq = torch.bincount(first, minlength=len(p)).double() / len(first)
    assert 0.5 * (freq - p.double()).abs().sum() < 0.06  # total variation
    assert (freq > 0).all()  # no top-k or top-p cut: every token of the vocabulary is drawn


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampling_over_the_kv_cache_draws_what_whole_passes_draw(family):
    """Replayed with the same generator, sampling from whole-sequence passes (no cache) draws the
    same tokens: the cached loop's distributions are the model's (positions included)."""
    from test_causal_lm import tiny_decoder

    from fusion_prune.lm import sample_windows

    model = tiny_decoder(family).eval()
    w = sample_windows(model, 3, 9, start_id=3, seed=2, batch_size=3)
    gen, seqs = torch.Generator().manual_seed(2), torch.full((3, 1), 3)
    with torch.no_grad():
        for _ in range(8):
            p = model(seqs, attention_mask=torch.ones_like(seqs), use_cache=False).logits[:, -1].float().softmax(-1)
            seqs = torch.cat([seqs, torch.multinomial(p, 1, generator=gen)], 1)
    assert torch.equal(seqs, w)


def test_compress_heals_on_the_teachers_own_text(llama_dir, corpus_txt, tmp_path, monkeypatch):  # noqa: F811
    """--heal-mix teacher samples the mix from the teacher (its own memory phase); a tokenizer with
    no BOS or EOS to start from is refused before the choice runs."""
    import shutil

    from fusion_prune import loop
    from fusion_prune.cli import main
    from fusion_prune.models import load_tokenizer

    with_eos = tmp_path / "with-eos"
    shutil.copytree(llama_dir, with_eos)
    tok = load_tokenizer(str(with_eos))
    tok.add_special_tokens({"eos_token": "[SEP]"})
    tok.save_pretrained(with_eos)
    args = ["--target-layers", "3", "--max-length", "16", "--heal-steps", "2", "--max-eval-tokens", "64",
            "--signal-samples", "2", "--batch-size", "2", "--strategy", "deepest", "--heal", "full",
            "--heal-mix", "teacher", "--heal-mix-share", "0.5"]
    out = tmp_path / "out"
    from fusion_prune import lm

    asked, sample = [], lm.sample_windows
    monkeypatch.setattr(lm, "sample_windows", lambda model, n, *a, **k: asked.append(n) or sample(model, n, *a, **k))
    res = CliRunner().invoke(main, ["compress", "-m", str(with_eos), "-d", str(corpus_txt), "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert "sampling" in r["info"]["peak_memory"] and "from the teacher" in res.output and "general text (teacher)" in res.output
    # 2 steps of 2 windows read 4 windows: only the teacher's windows among those 4 are sampled, not
    # as many as the corpus has train windows
    assert "the steps read at most 4 of the" in res.output and "training on 4 windows" in res.output, res.output
    assert len(asked) == 1 and asked[0] <= 4, asked

    def no_choice(*a, **k):
        raise AssertionError("the choice ran before the tokenizer was refused")

    monkeypatch.setattr(loop, "measure_state", no_choice)
    bad = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "-o",
                                    str(tmp_path / "bad"), *args])
    assert bad.exit_code == 2 and "needs a tokenizer with a BOS or an EOS token" in bad.output, bad.output


def test_a_diverged_check_counts_as_no_gain_and_the_best_weights_come_back(llama_dir):  # noqa: F811
    """A validation check of a diverged model (NaN or inf NLL) stops nothing by raising: it is a
    check without a gain, and the finite best weights are restored. Outside training a non-finite
    NLL is still refused."""
    from fusion_prune.errors import BadInputError
    from fusion_prune.lm import perplexity
    from fusion_prune.models import load_causal_lm
    from fusion_prune.training import EarlyStopping

    layer = torch.nn.Linear(2, 2)
    values = iter([2.0, float("nan"), float("inf")])
    stopper = EarlyStopping(layer, lambda m: next(values), every=1, patience=2, what="validation_nll",
                            higher_is_better=False)
    kept = layer.weight.detach().clone()
    assert not stopper(1)
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    assert not stopper(2) and stopper(3) and stopper.best == 2.0 and stopper.best_step == 1
    stopper.restore(3)
    assert torch.equal(layer.weight, kept)
    model, _ = load_causal_lm(str(llama_dir))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    windows = torch.randint(5, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    from fusion_prune import logits

    assert math.isnan(perplexity(model, windows, 2, finite=False)["nll"])
    assert type(model) not in logits._FULL_LOGITS  # not taken for a family whose head the check cannot read
    with pytest.raises(BadInputError, match="NLL is not finite"):
        perplexity(model, windows, 2)
