"""Causal language models on tiny random decoders (Llama, Qwen2, GPT-2) built from configs."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import FILLER, WORDS_NEG, WORDS_POS, make_tokenizer, sentiment_frame
from fusion_prune.errors import BadInputError

WORDS = WORDS_POS + WORDS_NEG + FILLER


def tiny_decoder(family: str, layers: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS) + 5, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                                      pad_token_id=0))


def prose(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(n_docs)]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def decoder_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_decoder(request.param).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_decoder("llama").save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eos_llama_dir(llama_dir, tmp_path_factory):
    """The tiny llama with an EOS token, which teacher text starts from."""
    import shutil

    from fusion_prune.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-eos")
    shutil.copytree(llama_dir, folder, dirs_exist_ok=True)
    tok = load_tokenizer(str(folder))
    tok.add_special_tokens({"eos_token": "[SEP]"})
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "story.txt"
    path.write_text("\n\n".join(prose(60)))
    return path


def test_windows_follow_the_protocol(llama_dir):
    from fusion_prune.corpus import token_windows
    from fusion_prune.models import load_tokenizer

    tok = load_tokenizer(str(llama_dir))
    texts = ["good movie", "bad plot"]
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    w = token_windows(tok, texts, 2)
    assert w.shape == (len(ids) // 2, 2)  # the last partial window is dropped
    assert w.flatten().tolist() == ids[: w.numel()]
    with pytest.raises(BadInputError, match="fewer than one window"):
        token_windows(tok, texts, 64)


def test_perplexity_is_exp_of_mean_next_token_nll(llama_dir):
    from fusion_prune.lm import perplexity
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(llama_dir))
    windows = torch.randint(5, 20, (3, 10), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows.to(model.device)).logits.cpu()  # the model may sit on a GPU
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res["tokens"] == 3 * 9
    assert res["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_cached_prefix_nll_labels_equal_drop_then_evaluate(decoder_dir):
    from fusion_prune.corpus import window_batches
    from fusion_prune.dropone import drop_one_nll, drop_one_nll_naive
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(decoder_dir))
    windows = torch.randint(5, 20, (4, 12), generator=torch.Generator().manual_seed(1))
    batches = window_batches(windows, 2, model.device)
    fast, slow = drop_one_nll(model, batches), drop_one_nll_naive(model, batches)
    np.testing.assert_allclose(fast.table.loss_after_drop, slow.table.loss_after_drop, rtol=1e-5)
    assert fast.table.acc_after_drop.tolist() == slow.table.acc_after_drop.tolist()
    assert fast.loss_before == pytest.approx(slow.loss_before, rel=1e-5)
    assert fast.examples == 4 * 11
    assert not any(m._forward_hooks for m in model.modules())


def test_lm_signals_are_the_12_and_finite(decoder_dir):
    from fusion_prune.corpus import window_batches
    from fusion_prune.models import load_causal_lm
    from signals import DEFAULT_SIGNALS, signals_on_batches

    model, _ = load_causal_lm(str(decoder_dir))
    windows = torch.randint(5, 20, (6, 33), generator=torch.Generator().manual_seed(2))
    table = signals_on_batches(model, window_batches(windows, 3, model.device), [*DEFAULT_SIGNALS, "block_influence"],
                               token_stride=4, progress=False)
    assert list(table.columns) == ["layer", "orig_layer", *DEFAULT_SIGNALS, "block_influence"]
    assert len(table) == 4 and np.isfinite(table[list(DEFAULT_SIGNALS)].to_numpy()).all()
    assert (table.block_influence >= 0).all() and (table.block_influence <= 2).all()
    assert (table.mi_task > 0).any()  # next tokens bucketed to the frequent ones carry information
    assert not any(m._forward_hooks for m in model.modules())


def test_mi_buckets_keep_frequent_tokens():
    from signals.information import bucket_tokens

    gold, pred = bucket_tokens(np.array([7, 7, 7, 3, 3, 9]), np.array([3, 5]), buckets=3)
    assert gold.tolist() == [0, 0, 0, 1, 1, 2] and pred.tolist() == [1, 2]


def test_last_token_angular_distance_by_hand():
    """One layer that doubles its input keeps the angle 0; a layer that maps h to -h gives 1."""
    from signals.capture import block_angular_distance

    model = tiny_decoder("llama", layers=2)
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    flips = []
    for layer in model.model.layers:
        flips.append(layer.register_forward_hook(lambda m, a, k, o: -a[0] if a else -k["hidden_states"],
                                                 with_kwargs=True))
    try:
        d = block_angular_distance(model, [batch], 1, last_token=True)
        d2 = block_angular_distance(model, [batch], 2, last_token=True)
    finally:
        for h in flips:
            h.remove()
    np.testing.assert_allclose(d, [1.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(d2, [0.0], atol=2e-3)


def test_zero_shot_scores_single_and_multi_token_verbalisers(llama_dir):
    from fusion_prune.lm import zero_shot
    from fusion_prune.models import load_causal_lm

    model, tok = load_causal_lm(str(llama_dir))
    df = sentiment_frame(12).assign(label=lambda d: (d.label == "neg").astype(int))
    one = zero_shot(model, tok, df, ["pos", "neg"], verbalisers=[" good", " bad"], max_length=32)
    assert one["examples"] == 12 and 0 <= one["accuracy"] <= 1
    # the same single tokens scored through the general path give the same choices
    two = zero_shot(model, tok, df, ["pos", "neg"], verbalisers=[" good good", " bad bad"], max_length=32)
    assert 0 <= two["accuracy"] <= 1 and two["verbalisers"] == [" good good", " bad bad"]
    with pytest.raises(BadInputError, match="must contain"):
        zero_shot(model, tok, df, ["pos", "neg"], prompt="no placeholder")


def test_detection_and_its_errors(llama_dir, corpus_txt, sentiment_csv_dir, tiny_base_model):
    from fusion_prune.tasks import detect_task

    assert detect_task(str(llama_dir), str(corpus_txt)) == "causal-lm"
    with pytest.raises(BadInputError, match="expected --task causal-lm"):
        detect_task(str(llama_dir), str(sentiment_csv_dir))
    assert detect_task(str(llama_dir), str(sentiment_csv_dir), "classification") == "classification"
    assert detect_task(str(tiny_base_model), str(sentiment_csv_dir)) == "classification"


def _lm_cfg(**kw):
    from fusion_prune.heal import HealConfig
    from fusion_prune.loop import CompressConfig

    base = dict(target_layers=2, task="causal-lm", max_length=16, batch_size=2, signal_samples=2, max_eval_tokens=64,
                step_eval_samples=2, heal=HealConfig(steps=3, batch_size=2, progress=False), progress=False)
    return CompressConfig.from_options(**{**base, **kw})


@pytest.mark.parametrize("strategy", ["block-influence", "angular-block", "deepest", "sleb", "taylor", "fusion", "evo-search",
                                      "oracle", "random"])
def test_lm_compress_every_strategy(llama_dir, corpus_txt, tmp_path, strategy):
    from fusion_prune.loop import compress_with_config as compress
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    data = task.load_data(str(corpus_txt))
    cfg = _lm_cfg(strategy=strategy, drop_one_samples=2 if strategy == "oracle" else 0)
    r = compress(str(llama_dir), data, cfg, tmp_path / "out", task=task)
    assert r["student_layers"] == 2 and len(r["kept_layers"]) == 2
    for key in ("teacher_perplexity", "pruned_perplexity", "healed_perplexity", "student_perplexity"):
        assert math.isfinite(r[key]) and r[key] > 1
    if strategy == "deepest":
        assert r["kept_layers"] == [0, 3]
    if strategy == "oracle":  # the oracle drops the layer of lowest measured NLL
        for e in r["history"]:
            assert e["measured_nll_after_drop"] == min(e["drop_one"]["loss_after_drop"])
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "plots" / "perplexity.png").is_file()
    from test_compress import check_candidates

    for e in r["history"]:
        check_candidates(e, strategy, 4)


def test_lm_output_reloads_and_generates_the_same(llama_dir, corpus_txt, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import drop_layers

    model, tok = load_causal_lm(str(llama_dir))
    pruned = drop_layers(model, [1, 2])
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    healed, stats = heal(pruned, windows, HealConfig(method="lora", steps=2, batch_size=2, progress=False))
    assert stats["method"] == "lora" and stats["trainable_parameters"] < sum(p.numel() for p in model.parameters())
    assert type(healed).__name__ == "LlamaForCausalLM"  # LoRA merged: a plain model again
    healed.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").to(healed.device).eval()
    prompt = torch.tensor([[5, 6, 7, 8]], device=healed.device)
    gen = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert healed.eval().generate(prompt, **gen).tolist() == again.generate(prompt, **gen).tolist()
        torch.testing.assert_close(healed(prompt).logits, again(prompt).logits)
    assert again.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in again.model.layers] == [0, 1]


def test_qlora_trains_on_a_4bit_copy_and_merges_into_full_precision(llama_dir, tmp_path):
    """QLoRA: the adapters train on an NF4 copy (Linear4bit modules), are merged as W + (alpha / r) B A
    into the full-precision weights (norms and embeddings untouched), and the output reloads."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from fusion_prune.heal import HealConfig, _lora, _merge_adapters, _quantised_copy, heal
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import drop_layers

    model, _ = load_causal_lm(str(llama_dir))
    cfg = HealConfig(method="qlora", steps=2, batch_size=2, lr=1e-2, progress=False)
    # the merge by hand: random adapters on the quantised copy land in the full-precision weights
    student = drop_layers(model, [1, 2])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    q = _lora(_quantised_copy(student, progress=False), cfg)
    assert isinstance(q.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    torch.manual_seed(1)
    adapters = {n: p for n, p in q.named_parameters() if "lora_" in n}
    for n, p in adapters.items():
        p.data.normal_(0, 0.1)
    merged = _merge_adapters(student, q, cfg)
    scale = cfg.lora_alpha / cfg.lora_r
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a = adapters[f"base_model.model.{name}.lora_A.default.weight"]
        b = adapters[f"base_model.model.{name}.lora_B.default.weight"]
        torch.testing.assert_close(merged.get_submodule(name).weight - before[f"{name}.weight"], scale * b @ a)
    assert torch.equal(merged.model.norm.weight, before["model.norm.weight"])
    assert torch.equal(merged.model.embed_tokens.weight, before["model.embed_tokens.weight"])

    # heal end to end: a plain model whose adapted projections moved, which saves and reloads
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    pruned = drop_layers(model, [1, 2])
    w0 = {k: v.clone() for k, v in pruned.state_dict().items()}
    healed, stats = heal(pruned, windows, cfg)
    assert stats["method"] == "qlora" and stats["steps"] == 2 and math.isfinite(stats["final_loss"])
    assert type(healed).__name__ == "LlamaForCausalLM" and all(p.dtype == torch.float32 for p in healed.parameters())
    changed = {k for k in w0 if not torch.equal(healed.state_dict()[k], w0[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    healed.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").to(healed.device).eval()
    prompt = torch.tensor([[5, 6, 7, 8]], device=healed.device)
    with torch.no_grad():
        torch.testing.assert_close(healed.eval()(prompt).logits, again(prompt).logits)


def test_cli_compress_heals_with_qlora(llama_dir, corpus_txt, tmp_path):
    """--heal qlora end to end: the report's student perplexity is the saved (merged) model's."""
    pytest.importorskip("bitsandbytes")
    from fusion_prune.cli import main

    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                               "-o", str(out), "--max-length", "16", "--heal", "qlora", "--heal-steps", "2",
                               "--max-eval-tokens", "64", "--signal-samples", "2", "--batch-size", "2",
                               "--lm-distill-steps", "1"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["heal"]["method"] == "qlora" and r["heal"]["steps"] == 2 and r["distill"]["method"] == "qlora"
    res = runner.invoke(main, ["evaluate", "-m", str(out), "-d", str(corpus_txt), "--max-length", "16",
                               "--max-eval-tokens", "64", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["perplexity"] == pytest.approx(r["student_perplexity"], rel=1e-4)


def test_qlora_without_bitsandbytes_is_one_clear_error(llama_dir, monkeypatch):
    import sys

    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    model, _ = load_causal_lm(str(llama_dir))
    with pytest.raises(BadInputError, match=r"'--heal' option 'qlora' needs bitsandbytes"):
        heal(model, torch.randint(5, 20, (2, 8)), HealConfig(method="qlora", steps=1, progress=False))


def test_heal_with_a_top_k_teacher_cache(llama_dir):
    """The teacher's top-k logits cached once equal its logits' top k; at k = V with every window
    visited the cached distillation follows the beside-the-step one (up to the float16 cache); with
    fewer steps than windows only the windows the steps visit are cached."""
    from distill import teacher_topk_logits
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import drop_layers

    teacher, _ = load_causal_lm(str(llama_dir))
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    values, ids, tail = teacher_topk_logits(teacher, windows, 5, batch_size=3, device=teacher.device,
                                            temperature=2.0)
    with torch.no_grad():
        logits = teacher(input_ids=windows.to(teacher.device)).logits.cpu()
        ref = logits.topk(5, dim=-1)
    assert values.shape == ids.shape == (4, 16, 5) and values.dtype == torch.float16 and ids.dtype == torch.int32
    rest = 1 - torch.softmax(logits / 2.0, -1).gather(-1, ref.indices).sum(-1)  # mass outside the top 5 at T = 2
    torch.testing.assert_close(tail.exp(), rest, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values.float(), ref.values, atol=1e-2, rtol=1e-2)
    assert (ids.long() == ref.indices).float().mean() > 0.99  # ties aside
    vocab = teacher.config.vocab_size
    cfg = HealConfig(steps=2, batch_size=2, kd_weight=0.5, method="full", progress=False)
    runs = {}
    for k in (0, vocab):
        student = drop_layers(teacher, [1, 2])
        _, runs[k] = heal(student, windows, replace(cfg, kd_top_k=k), teacher=teacher)
    assert runs[0]["teacher_logits"] == "computed beside each step"
    assert runs[vocab]["teacher_logits"] == "top-k cached" and runs[vocab]["top_k"] == vocab
    assert runs[vocab]["cache_bytes"] == 4 * 16 * (vocab * 6 + 4)  # every window: 2 steps x 2 = 4 visited
    assert runs[vocab]["first_loss"] == pytest.approx(runs[0]["first_loss"], rel=1e-3)
    assert runs[vocab]["final_loss"] == pytest.approx(runs[0]["final_loss"], rel=1e-2)
    # under a time limit the top-k is taken per batch beside each step: the same loss as the cache
    _, beside = heal(drop_layers(teacher, [1, 2]), windows, replace(cfg, kd_top_k=vocab, max_seconds=1e6),
                     teacher=teacher)
    assert beside["teacher_logits"] == "top-k beside each step" and "cache_bytes" not in beside
    assert beside["steps"] == 2
    assert beside["first_loss"] == pytest.approx(runs[vocab]["first_loss"], rel=1e-4)
    assert beside["final_loss"] == pytest.approx(runs[vocab]["final_loss"], rel=1e-4)
    _, one = heal(drop_layers(teacher, [1, 2]), windows, replace(cfg, steps=1, kd_top_k=8), teacher=teacher)
    assert one["cache_bytes"] == 2 * 16 * (8 * 6 + 4) and math.isfinite(one["final_loss"])  # 1 step x 2 windows


def test_lm_distillation_after_healing_with_zero_shot(llama_dir, corpus_txt, sentiment_csv_dir, tmp_path):
    from fusion_prune.loop import compress_with_config as compress
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    zs = {str(sentiment_csv_dir): {"verbalisers": "pos=good,neg=bad", "max_samples": 8, "max_length": 32}}
    r = compress(str(llama_dir), task.load_data(str(corpus_txt)),
                 _lm_cfg(strategy="deepest", lm_distill_steps=2, zero_shot=zs), tmp_path / "out", task=task)
    assert r["distill"]["steps"] == 2 and math.isfinite(r["student_perplexity"])
    z = r["zero_shot"][str(sentiment_csv_dir)]
    assert set(z) == {"teacher", "pruned", "student"} and all(v["examples"] == 8 for v in z.values())
    assert "zero-shot accuracy" in (tmp_path / "out" / "report.md").read_text()


def _stop_after_one_step(monkeypatch, run) -> None:
    """Call ``run()`` (a compress) with the run stopped by a KeyboardInterrupt after its first removal."""
    from fusion_prune import loop as greedy

    real, calls = greedy.apply_drop, {"n": 0}

    def stop_after_one(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(greedy, "apply_drop", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(greedy, "apply_drop", real)


def test_lm_compress_resumes(llama_dir, corpus_txt, tmp_path, monkeypatch):
    from fusion_prune import loop as greedy
    from fusion_prune.tasks import get_task

    cfg = _lm_cfg(strategy="block-influence", target_layers=1)
    task = get_task("causal-lm")
    data = task.load_data(str(corpus_txt))
    full = greedy.compress_with_config(str(llama_dir), data, cfg, tmp_path / "full", task=task)

    _stop_after_one_step(monkeypatch, lambda: greedy.compress_with_config(str(llama_dir), data, cfg, tmp_path / "run",
                                                                          task=task))
    resumed = greedy.compress_with_config(str(llama_dir), data, cfg, tmp_path / "run", resume=True, task=get_task("causal-lm"))
    assert resumed["kept_layers"] == full["kept_layers"]
    assert [h["dropped_orig"] for h in resumed["history"]] == [h["dropped_orig"] for h in full["history"]]


def test_cli_lm_compress_evaluate_and_bad_inputs(llama_dir, corpus_txt, sentiment_csv_dir, tmp_path):
    from fusion_prune.cli import main

    runner = CliRunner()
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("good movie\n\nbad plot\n\nthe actor")
    res = runner.invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                               "-o", str(out), "--max-length", "16", "--heal-steps", "2", "--max-eval-tokens", "64",
                               "--signal-samples", "2", "--batch-size", "2", "--lm-distill-steps", "1",
                               "--kd-top-k", "4"])
    assert res.exit_code == 0, res.output
    assert "healed perplexity" in res.output
    r = json.loads((out / "report.json").read_text())
    assert r["distill"]["teacher_logits"] == "top-k cached" and r["distill"]["top_k"] == 4
    res = runner.invoke(main, ["evaluate", "-m", str(out), "-d", str(corpus_txt), "--max-length", "16",
                               "--max-eval-tokens", "64", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert ev["perplexity"] == pytest.approx(r["student_perplexity"], rel=1e-4)
    assert {"perplexity", "nll", "tokens"} <= set(ev)
    res = runner.invoke(main, ["evaluate", "-m", str(out), "-d", str(sentiment_csv_dir), "--zero-shot",
                               "--verbalisers", "pos=good,neg=bad", "--max-samples", "10", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["examples"] == 10
    bad = {
        "labelled": (["compress", "-m", str(llama_dir), "-d", str(sentiment_csv_dir), "--target-layers", "2", "-o",
                      str(tmp_path / "x")], "expected --task causal-lm"),
        "short": (["compress", "-m", str(llama_dir), "-d", str(short), "--target-layers", "2", "-o",
                   str(tmp_path / "y"), "--max-length", "16"], "fewer than one window"),
        "deep": (["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "4", "-o",
                  str(tmp_path / "z"), "--max-length", "16"], "below the model's depth 4"),
        "lora": (["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3", "-o",
                  str(tmp_path / "w"), "--max-length", "16", "--max-eval-tokens", "64", "--lora-targets", "c_attn",
                  "--heal", "lora", "--heal-steps", "1"], "'--lora-targets' option must name modules of"),
        "position": (["evaluate", "-m", str(llama_dir), "-d", str(corpus_txt), "--max-length", "4096"],
                     "position limit 128"),
        "batch": (["evaluate", "-m", str(llama_dir), "-d", str(corpus_txt), "--batch-size", "0"], "'--batch-size' option must be an int >= 1. Got 0"),
    }
    for name, (args, msg) in bad.items():
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (name, res.output)
        assert msg in res.output and "Traceback" not in res.output, (name, res.output)
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()


def test_quantised_model_is_refused(llama_dir, tmp_path):
    import shutil

    from fusion_prune.models import load_causal_lm

    q = tmp_path / "q"
    shutil.copytree(llama_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="quantised"):
        load_causal_lm(str(q))


def test_corpus_from_folder_and_column(tmp_path):
    from fusion_prune.corpus import load_corpus

    (tmp_path / "docs").mkdir()
    for i, t in enumerate(prose(10)):
        (tmp_path / "docs" / f"{i}.txt").write_text(t)
    c = load_corpus(str(tmp_path / "docs"))
    assert len(c.train) + len(c.validation) + len(c.test) == 10 and c.test and c.validation
    pd.DataFrame({"body": prose(10) + [None, "  "]}).to_parquet(tmp_path / "d.parquet")
    c2 = load_corpus(str(tmp_path / "d.parquet"), text_column="body")
    assert len(c2.train) + len(c2.validation) + len(c2.test) == 10 and any("dropped 2" in n for n in c2.notes)
    with pytest.raises(BadInputError, match="text_column 'text'"):
        load_corpus(str(tmp_path / "d.parquet"))


def test_lm_compress_in_bfloat16_saves_bfloat16(llama_dir, corpus_txt, tmp_path):
    """--dtype bfloat16 loads, computes, heals and saves in bfloat16; the metrics stay finite."""
    from fusion_prune.loop import compress_with_config as compress
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    data = task.load_data(str(corpus_txt))
    r = compress(str(llama_dir), data, _lm_cfg(strategy="sleb", dtype="bfloat16"), tmp_path / "out", task=task)
    assert r["config"]["dtype"] == "bfloat16"
    assert all(math.isfinite(r[k]) for k in ("teacher_perplexity", "pruned_perplexity", "healed_perplexity"))
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}


def test_dtype_choices_and_their_errors():
    from fusion_prune.errors import BadInputError
    from fusion_prune.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") is torch.float32  # the CPU gets float32 unless asked
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16 and resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(BadInputError, match="'dtype' parameter must be one of .*'float64'"):
        resolve_dtype("float64", "cpu")
    with pytest.raises(BadInputError, match="'dtype'"):
        _lm_cfg(dtype="int8")


def test_zero_shot_defaults_are_the_datasets_own_and_each_given_one_wins():
    from fusion_prune.lm import DEFAULT_PROMPT, zero_shot_defaults

    # a sentiment prompt and words for the reviews: the generic "Answer:" scored the teacher at chance
    assert zero_shot_defaults("rotten-tomatoes") == ("Review: {text}\nSentiment:", "fresh=positive,rotten=negative")
    assert zero_shot_defaults("rotten-tomatoes", "Q: {text}\nA:") == ("Q: {text}\nA:", "fresh=positive,rotten=negative")
    assert zero_shot_defaults("bbc-news", verbalisers="tech=tech") == ("{text}\nTopic:", "tech=tech")
    assert zero_shot_defaults("/my/own/reviews.csv") == (DEFAULT_PROMPT, None)


# --------------------------------------------------------------------------- the zero-shot guard of the choice


@pytest.fixture(scope="module")
def word_labels_dir(tmp_path_factory):
    """The tiny sentiment task with labels the tiny tokenizer knows as words ("good", "bad"), so the
    default verbalisers " good" / " bad" are two distinct tokens."""
    folder = tmp_path_factory.mktemp("word-labels")
    for split, n, seed in (("train", 200, 1), ("test", 40, 2)):
        sentiment_frame(n, seed).replace({"label": {"pos": "good", "neg": "bad"}}).to_csv(folder / f"{split}.csv",
                                                                                         index=False)
    return folder


def test_guard_scorer_is_zero_shot_accuracy_and_its_cross_entropy(llama_dir):
    from fusion_prune.dropone import kept_scores
    from fusion_prune.lm import zero_shot, zero_shot_batches, zero_shot_scorer
    from fusion_prune.models import load_causal_lm

    model, tok = load_causal_lm(str(llama_dir))
    df = sentiment_frame(12).assign(label=lambda d: (d.label == "neg").astype(int))
    words = [" good", " bad"]
    batches, ids = zero_shot_batches(tok, df, ["pos", "neg"], "{text} is", words, max_length=32, batch_size=5)
    assert [len(b["labels"]) for b in batches] == [5, 5, 2] and ids == [tok.convert_tokens_to_ids(w.strip())
                                                                        for w in words]
    correct, loss, count = kept_scores(model, batches, zero_shot_scorer(ids), range(4))
    ref = zero_shot(model, tok, df, ["pos", "neg"], "{text} is", words, max_length=32)
    assert count == 12 and correct / count == pytest.approx(ref["accuracy"])
    # the loss by hand: the gold class's share of the two verbalisers' probabilities, one example at a time
    by_hand = 0.0
    for text, gold in zip(df["text"], df["label"]):
        ids_ = tok(text + " is", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids_).logits[0, -1, ids]
        by_hand -= float(logits.log_softmax(-1)[gold])
    assert loss == pytest.approx(by_hand, rel=1e-4)
    # batched by length: the same sums on fewer padded tokens (reviews of 1-4 times their length)
    varied = df.assign(text=[" ".join([t] * (1 + i % 4)) for i, t in enumerate(df["text"])])
    plain, grouped = (zero_shot_batches(tok, varied, ["pos", "neg"], "{text} is", words, max_length=32,
                                        batch_size=5, by_length=g)[0] for g in (False, True))
    assert kept_scores(model, grouped, zero_shot_scorer(ids), range(4)) == pytest.approx(
        kept_scores(model, plain, zero_shot_scorer(ids), range(4)), rel=1e-5)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in plain)
    with pytest.raises(BadInputError, match="distinct tokens"):
        zero_shot_batches(tok, df, ["pos", "neg"], "{text} is", [" good", " good"])


def test_guard_joins_the_measured_loss_of_every_measuring_path(llama_dir, corpus_txt, word_labels_dir):
    from fusion_prune.dropone import kept_scores
    from fusion_prune.surgery import drop_layers
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    task.load_data(str(corpus_txt))
    model, tok, _ = task.load_model(str(llama_dir))
    plain = _lm_cfg(drop_one_samples=2)
    guarded = _lm_cfg(drop_one_samples=2, guard=str(word_labels_dir), guard_weight=0.5, guard_samples=10)
    task.prepare_teacher(model, tok, plain, None, 0.0, True, str(llama_dir))
    before = task.drop_one(model, tok, plain).table
    batches = task.calibration_batches(model, tok, plain, 0)
    sleb_before = task.score_batches(model, batches).table
    kept_before = task.kept_loss(model, batches, [0, 3])
    info = task.prepare_teacher(model, tok, guarded, None, 0.0, True, str(llama_dir))
    g = info["guard"][str(word_labels_dir)]
    assert g["examples"] == 10 and 0 <= g["accuracy"] <= 1
    (_, gb, scorer), = task._guards
    # each candidate's guard loss is that of the model without the layer (a copy), scored the slow way
    after = task.drop_one(model, tok, guarded, only=[1, 2]).table
    assert after[["layer", "nll_after_drop"]].dropna().equals(before[["layer", "loss_after_drop"]].iloc[[1, 2]]
                                                                .rename(columns={"loss_after_drop": "nll_after_drop"}))
    for layer in (1, 2):
        _, loss, count = kept_scores(drop_layers(model, [layer]), gb, scorer, range(3))
        row = after.set_index("layer").loc[layer]
        assert row["guard_loss_after_drop"] == pytest.approx(loss / count, rel=1e-5)
        assert row["loss_after_drop"] == pytest.approx(row["nll_after_drop"] + 0.5 * loss / count, rel=1e-6)
    assert after.set_index("layer").loc[[0, 3], "loss_after_drop"].isna().all()
    sleb = task.score_batches(model, batches).table
    assert np.allclose(sleb["nll_after_drop"], sleb_before["loss_after_drop"])
    assert np.allclose(sleb["loss_after_drop"], sleb["nll_after_drop"] + 0.5 * sleb["guard_loss_after_drop"])
    _, loss, count = kept_scores(model, gb, scorer, [0, 3])
    assert task.kept_loss(model, batches, [0, 3]) == pytest.approx(kept_before + 0.5 * loss / count, rel=1e-6)


def test_guard_target_teacher_is_the_kl_from_the_teachers_answers(llama_dir, corpus_txt, word_labels_dir):
    from fusion_prune.dropone import kept_scores
    from fusion_prune.lm import verbaliser_logits
    from fusion_prune.loop import CompressConfig
    from fusion_prune.surgery import drop_layers
    from fusion_prune.tasks import get_task
    from fusion_prune.tasks.causal_lm import guard_prompts

    task = get_task("causal-lm")
    task.load_data(str(corpus_txt))
    model, tok, _ = task.load_model(str(llama_dir))
    cfg = _lm_cfg(drop_one_samples=2, guard=str(word_labels_dir), guard_samples=10, guard_target="teacher")
    task.prepare_teacher(model, tok, cfg, None, 0.0, True, str(llama_dir))
    (_, gb, scorer), = task._guards
    (_, ids), = guard_prompts(tok, str(word_labels_dir), "validation", 10, cfg.seed, 1).values()
    assert kept_scores(model, gb, scorer, range(4))[1] == pytest.approx(0.0, abs=1e-5)  # the teacher against itself
    table = task.drop_one(model, tok, cfg).table.set_index("layer")
    for layer in (1, 2):  # by hand: KL(teacher || the model without the layer), a copy, per prompt
        student, kl, count = drop_layers(model, [layer]).eval(), 0.0, 0
        for b in gb:
            inputs, last = {k: b[k] for k in ("input_ids", "attention_mask")}, b["labels"][:, 1]
            with torch.no_grad():
                t = verbaliser_logits(model, inputs, last, ids).log_softmax(-1)
                s = verbaliser_logits(student, inputs, last, ids).log_softmax(-1)
            kl, count = kl + float((t.exp() * (t - s)).sum()), count + len(t)
        assert kl > 0 and table.loc[layer, "guard_loss_after_drop"] == pytest.approx(kl / count, rel=1e-4)
    with pytest.raises(BadInputError, match="guard_target"):
        CompressConfig.from_options(task="causal-lm", target_layers=2, guard="rotten-tomatoes", guard_target="gold")


def test_guard_shortlist_scores_only_the_lowest_nll_candidates(llama_dir, corpus_txt, word_labels_dir):
    from fusion_prune.strategies import STRATEGIES
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    task.load_data(str(corpus_txt))
    model, tok, _ = task.load_model(str(llama_dir))
    tables = {}
    for k in (0, 2):  # 0: every candidate
        cfg = _lm_cfg(drop_one_samples=2, guard=str(word_labels_dir), guard_samples=10, guard_shortlist=k)
        task.prepare_teacher(model, tok, cfg, None, 0.0, True, str(llama_dir))
        tables[k] = task.drop_one(model, tok, cfg).table.set_index("layer")
    full, short = tables[0], tables[2]
    lowest = set(full["nll_after_drop"].nsmallest(2).index)
    assert set(short["guard_loss_after_drop"].dropna().index) == lowest
    assert short.loc[sorted(lowest), "loss_after_drop"].to_numpy() == pytest.approx(
        full.loc[sorted(lowest), "loss_after_drop"].to_numpy(), rel=1e-6)
    assert short.drop(index=sorted(lowest))["loss_after_drop"].isna().all()
    assert short["nll_after_drop"].notna().all()
    # the measuring strategies choose among the scored ones (SLEB's argmax would take a NaN)
    assert task.best_candidate(short.reset_index()) in lowest
    state = SimpleNamespace(task=task, model=model, batches=task.calibration_batches(model, tok, cfg, 0),
                            n_layers=4, orig_layers=[0, 1, 2, 3], full_layers=4, note=lambda *a: None)
    sleb = task.score_batches(model, state.batches).table.set_index("layer")
    assert sleb["guard_loss_after_drop"].notna().sum() == 2
    assert STRATEGIES["sleb"].fn(state)[0] in set(sleb["guard_loss_after_drop"].dropna().index)


def test_lm_compress_with_a_guard_records_it(llama_dir, corpus_txt, word_labels_dir, tmp_path):
    from fusion_prune.loop import compress_with_config as compress
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    cfg = _lm_cfg(strategy="oracle", drop_one_samples=2, guard=str(word_labels_dir), guard_samples=8)
    r = compress(str(llama_dir), task.load_data(str(corpus_txt)), cfg, tmp_path / "out", task=task)
    assert r["info"]["guard"][str(word_labels_dir)]["examples"] == 8
    for e in r["history"]:  # the oracle takes the lowest guarded loss, which is NLL + weight x guard loss
        d = pd.DataFrame(e["drop_one"])
        assert e["measured_nll_after_drop"] == d["loss_after_drop"].min()
        assert np.allclose(d["loss_after_drop"], d["nll_after_drop"] + d["guard_loss_after_drop"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Zero-shot guard of the choice" in report and "measured NLL + guard loss" in report


def test_guard_is_refused_where_it_cannot_apply(llama_dir, corpus_txt, sentiment_csv_dir, tmp_path):
    from fusion_prune.loop import CompressConfig

    with pytest.raises(BadInputError, match="The 'guard' parameter guards zero-shot accuracy.*classification"):
        CompressConfig.from_options(task="classification", target_layers=1, guard="rotten-tomatoes")
    with pytest.raises(BadInputError, match="The 'guard' parameter is not supported when layers are streamed"):
        CompressConfig.from_options(task="causal-lm", target_layers=2, strategy="sleb", max_memory="1GiB",
                                    heal_method="none", guard="rotten-tomatoes")
    with pytest.raises(BadInputError, match="guard_weight"):
        CompressConfig.from_options(task="causal-lm", target_layers=2, guard="rotten-tomatoes", guard_weight=-1.0)
    from fusion_prune.cli import main

    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                                   "--max-length", "16", "--guard", str(sentiment_csv_dir), "-o", str(tmp_path / "o")])
    # pos / neg are one unknown token each in the tiny vocabulary: one line that says so
    assert res.exit_code != 0 and f"The 'guard' dataset {str(sentiment_csv_dir)!r}" in res.output
    assert "must start with distinct tokens" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- --calibration: the choice's text
def test_calibration_text_is_what_the_choice_measures_on(eos_llama_dir, corpus_txt, tmp_path):
    """--calibration CORPUS: the drop-one table and the calibration batches come from that corpus's
    validation and train windows; --calibration teacher: from windows the teacher samples (seeded,
    half each). The per-step perplexity stays the dataset's."""
    from fusion_prune.corpus import load_corpus, token_windows
    from fusion_prune.dropone import drop_one_nll
    from fusion_prune.corpus import window_batches
    from fusion_prune.lm import sample_windows, start_token
    from fusion_prune.tasks import get_task

    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(prose(60, seed=7)))
    task = get_task("causal-lm")
    task.load_data(str(corpus_txt))
    model, tok, _ = task.load_model(str(eos_llama_dir))
    plain = _lm_cfg(drop_one_samples=2)
    task.prepare_teacher(model, tok, plain, None, 0.0, True, str(eos_llama_dir))
    own = task.drop_one(model, tok, plain).table["loss_after_drop"].to_numpy()
    metric = task.step_metric(model, tok, plain)

    cfg = _lm_cfg(drop_one_samples=2, calibration=str(other))
    info = task.prepare_teacher(model, tok, cfg, None, 0.0, True, str(eos_llama_dir))
    data = load_corpus(str(other))
    val = token_windows(tok, data.validation, 16, 64)
    train = token_windows(tok, data.train, 16, None)
    assert info["calibration"] == {"text": str(other), "train_windows": len(train), "validation_windows": len(val)}
    got = task.drop_one(model, tok, cfg).table["loss_after_drop"].to_numpy()
    want = drop_one_nll(model, window_batches(val[:2], 2, "cpu")).table["loss_after_drop"].to_numpy()
    assert np.allclose(got, want) and not np.allclose(got, own)
    rows = {tuple(r) for r in train.tolist()}
    assert all(tuple(r) in rows for b in task.calibration_batches(model, tok, cfg, 0) for r in b["input_ids"].tolist())
    assert task.step_metric(model, tok, cfg) == metric

    def no_teacher():
        raise AssertionError("a corpus named by --calibration is read; a resume must not load the teacher for it")

    assert task.prepare_choice(no_teacher, tok, cfg) == {"calibration": info["calibration"]}
    assert np.allclose(task.drop_one(model, tok, cfg).table["loss_after_drop"].to_numpy(), want)

    sampled = _lm_cfg(drop_one_samples=2, calibration="teacher")
    info = task.prepare_teacher(model, tok, sampled, None, 0.0, True, str(eos_llama_dir))
    n = len(token_windows(tok, task.data.validation, 16, 64))
    w = sample_windows(model, 2 * n, 16, start_token(tok), seed=sampled.seed)
    assert info["calibration"] == {"text": "teacher", "train_windows": n, "validation_windows": n}
    got = task.drop_one(model, tok, sampled).table["loss_after_drop"].to_numpy()
    assert np.allclose(got, drop_one_nll(model, window_batches(w[:2], 2, "cpu")).table["loss_after_drop"].to_numpy())
    rows = {tuple(r) for r in w[n:].tolist()}
    assert all(tuple(r) in rows for b in task.calibration_batches(model, tok, sampled, 1) for r in b["input_ids"].tolist())
    task.prepare_teacher(model, tok, plain, None, 0.0, True, str(eos_llama_dir))  # and back to the dataset's own
    assert np.allclose(task.drop_one(model, tok, plain).table["loss_after_drop"].to_numpy(), own)


def test_calibration_is_refused_where_it_cannot_apply(llama_dir, corpus_txt, tmp_path):
    from fusion_prune.cli import main
    from fusion_prune.loop import CompressConfig

    with pytest.raises(BadInputError, match="The 'calibration' parameter names the text.*classification"):
        CompressConfig.from_options(task="classification", target_layers=1, calibration="teacher")
    with pytest.raises(BadInputError, match="The 'calibration' parameter cannot be 'teacher' when layers are streamed"):
        CompressConfig.from_options(task="causal-lm", target_layers=2, strategy="sleb", max_memory="1GiB",
                                    heal_method="none", calibration="teacher")
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                                    "--max-length", "16", "--calibration", str(tmp_path / "missing.txt"),
                                    "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "missing.txt" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_measures_with_its_guard_and_calibration(eos_llama_dir, corpus_txt, word_labels_dir, tmp_path,
                                                               monkeypatch):
    """The guard's prompts and --calibration's sampled text are rebuilt when a stopped run resumes
    (they are not saved): its steps measure what an uninterrupted run measures."""
    from fusion_prune import loop as greedy
    from fusion_prune.tasks import get_task

    cfg = _lm_cfg(strategy="oracle", target_layers=1, drop_one_samples=2, guard=str(word_labels_dir),
                  guard_samples=8, calibration="teacher")
    data = get_task("causal-lm").load_data(str(corpus_txt))
    full = greedy.compress_with_config(str(eos_llama_dir), data, cfg, tmp_path / "full", task=get_task("causal-lm"))
    _stop_after_one_step(monkeypatch, lambda: greedy.compress_with_config(str(eos_llama_dir), data, cfg,
                                                                          tmp_path / "run", task=get_task("causal-lm")))
    resumed = greedy.compress_with_config(str(eos_llama_dir), data, cfg, tmp_path / "run", resume=True,
                                          task=get_task("causal-lm"))  # a fresh task: nothing carried over
    assert len(full["history"]) == 3
    for a, b in zip(resumed["history"], full["history"]):
        assert a["dropped_orig"] == b["dropped_orig"]
        pd.testing.assert_frame_equal(pd.DataFrame(a["drop_one"]).sort_index(axis=1),
                                      pd.DataFrame(b["drop_one"]).sort_index(axis=1))


def test_healing_can_distil_from_the_teacher(llama_dir, corpus_txt, tmp_path):
    """--heal-kd-weight puts the KL to the teacher's logits into the healing loss; under
    --heal-seconds with --kd-top-k the teacher's top-k is taken beside each step."""
    from fusion_prune.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                                    "-o", str(out), "--max-length", "16", "--heal", "full", "--heal-steps", "2",
                                    "--heal-seconds", "100000", "--heal-kd-weight", "1", "--kd-top-k", "4",
                                    "--max-eval-tokens", "64", "--signal-samples", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    heal = r["heal"]
    assert heal["teacher_logits"] == "top-k beside each step" and heal["top_k"] == 4
    assert heal["config"]["kd_weight"] == 1.0 and heal["steps"] == 2 and math.isfinite(heal["final_loss"])
    assert "KL to the teacher weighted 1" in (out / "report.md").read_text()
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                                    "-o", str(tmp_path / "bad"), "--heal-kd-weight", "1.5"])
    assert res.exit_code == 2 and "--heal-kd-weight" in res.output and "1.5" in res.output, res.output
