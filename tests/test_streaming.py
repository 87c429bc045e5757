"""Layers streamed from disk (fusion_prune.streaming): the same measurements, choices and output as
in memory, with at most the weights the memory cap allows held at once."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tokenizer
from fusion_prune.errors import BadInputError
from test_causal_lm import corpus_txt, llama_dir, prose, tiny_decoder  # noqa: F401  (fixtures)
from test_families import V, _tiny

FAMILIES = ["qwen3", "gemma3_text", "phi3", "falcon"]  # plain, sliding + global, fused qkv, no "model." prefix


def _layer_bytes(model) -> list[int]:
    from fusion_prune.surgery import layer_list

    return [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layer_list(model)]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"stream-{request.param}")
    model = _tiny(request.param)
    model.save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("resident", [0, 2])
def test_streamed_drop_one_equals_in_memory_and_the_output_reloads(family_dir, resident, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusion_prune.corpus import window_batches
    from fusion_prune.dropone import drop_one_nll
    from fusion_prune.streaming import save_streamed, streamed_causal_lm
    from fusion_prune.surgery import drop_layers, drop_layers_, layer_list

    folder, model = family_dir
    layer_bytes = _layer_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # the cap holds everything but the last len - resident layers, plus one streamed layer
    cap = total - sum(layer_bytes[resident:]) + max(layer_bytes[resident:])
    windows = torch.randint(3, V, (3, 12), generator=torch.Generator().manual_seed(2))
    batches = window_batches(windows, 2, "cpu")
    want = drop_one_nll(model, batches).table
    with streamed_causal_lm(folder, max_memory=cap) as (streamed, tok, streamer):
        assert sorted(streamer.resident) == list(range(resident))
        assert streamer.resident_bytes <= cap
        assert all(p.device.type == "meta" for i, layer in enumerate(layer_list(streamed)) if i >= resident
                   for p in layer.parameters())  # nothing streamed stays in memory between forwards
        got = drop_one_nll(streamed, batches).table
        assert all(p.device.type == "meta" for i, layer in enumerate(layer_list(streamed)) if i >= resident
                   for p in layer.parameters())
        # per batch: the intact forward reads every streamed layer, candidate l the streamed ones above it
        n = len(layer_bytes)
        per_batch = (n - resident) + sum(max(0, n - max(l + 1, resident)) for l in range(n))
        assert streamer.reads == resident + 2 * per_batch
        drop_layers_(streamed, [1, 3])
        save_streamed(streamed, streamer, tok, tmp_path / "out")
        assert streamer.handles  # two hooks per streamed layer while open
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in streamed.modules())  # removed on exit
    torch.testing.assert_close(torch.tensor(got.loss_after_drop.to_numpy()), torch.tensor(want.loss_after_drop.to_numpy()),
                               atol=1e-5, rtol=1e-5)
    assert list(got.acc_after_drop) == pytest.approx(list(want.acc_after_drop), abs=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=windows).logits, drop_layers(model, [1, 3])(input_ids=windows).logits,
                                   atol=1e-5, rtol=1e-4)


def _cfg(**kw):
    from fusion_prune.heal import HealConfig
    from fusion_prune.loop import CompressConfig

    base = dict(target_layers=2, task="causal-lm", max_length=16, batch_size=2, max_eval_tokens=64,
                step_eval_samples=2, drop_one_samples=2, strategy="oracle",
                heal=HealConfig(method="none", progress=False), progress=False)
    return CompressConfig.from_options(**{**base, **kw})


@pytest.mark.parametrize("strategy", ["oracle", "sleb"])
def test_streamed_compress_chooses_what_compress_chooses(llama_dir, corpus_txt, tmp_path, strategy):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from fusion_prune.loop import compress_streamed, compress_with_config
    from fusion_prune.tasks import get_task

    task = get_task("causal-lm")
    data = task.load_data(str(corpus_txt))
    ref = compress_with_config(str(llama_dir), data, _cfg(strategy=strategy), tmp_path / "ref", task=task)
    model = tiny_decoder("llama")
    layer_bytes = _layer_bytes(model)
    cap = sum(p.numel() * p.element_size() for p in model.parameters()) - sum(layer_bytes) + max(layer_bytes)
    # the cap holds the embeddings, the head and one layer
    r = compress_streamed(str(llama_dir), data, _cfg(strategy=strategy, max_memory=str(cap)), tmp_path / "out")
    assert r["streaming"]["resident_layers"] == [] and r["streaming"]["layer_reads"] > 0
    assert r["kept_layers"] == ref["kept_layers"]
    assert [s["dropped_orig"] for s in r["steps"]] == [e["dropped_orig"] for e in ref["history"]]
    for s, e in zip(r["steps"], ref["history"]):
        assert s["validation_perplexity"] == pytest.approx(e["validation_perplexity"], rel=1e-5)
        if strategy == "oracle":
            assert s["drop_one"]["loss_after_drop"] == pytest.approx(e["drop_one"]["loss_after_drop"], rel=1e-5)
            assert s["measured_nll_after_drop"] == pytest.approx(e["measured_nll_after_drop"], rel=1e-5)
    assert r["info"]["teacher_validation_perplexity"] == pytest.approx(
        ref["info"]["teacher_validation_perplexity"], rel=1e-5)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"load", "teacher", "evaluation", "save"} <= set(saved["peak_memory"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "streamed" in md and f"| 0 | 4 | {r['steps'][0]['dropped_orig']} |" in md and "| load |" in md
    card = (tmp_path / "out" / "README.md").read_text()  # the model card: what was removed, and the steps
    removed = sorted(i for s in r["steps"] for i in s["dropped_orig"])
    assert "pipeline_tag: text-generation" in card and f"Original layers removed: {removed}" in card
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert student.config.num_hidden_layers == 2


def test_streamed_bad_inputs_are_one_line(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from fusion_prune.cli import main
    from fusion_prune.heal import HealConfig
    from fusion_prune.streaming import parse_size, streamed_causal_lm

    with pytest.raises(BadInputError, match="'max_memory' parameter must hold the weights outside the layers"):
        with streamed_causal_lm(llama_dir, max_memory="10KB"):
            pass
    moe = tmp_path / "moe"
    _tiny("qwen3_moe").save_pretrained(moe)  # experts fused in memory, one tensor each on disk
    make_tokenizer(moe).save_pretrained(moe)
    with pytest.raises(BadInputError, match="cannot be streamed yet"):
        with streamed_causal_lm(moe):
            pass
    with pytest.raises(BadInputError, match="'max_memory' parameter must be a size"):
        parse_size("lots")
    assert parse_size("1.5GiB") == int(1.5 * 2 ** 30) and parse_size("800MB") == 800_000_000
    with pytest.raises(BadInputError, match="'strategy' parameter must need no signals pass"):
        _cfg(strategy="fusion-verify", max_memory="1GiB")
    with pytest.raises(BadInputError, match="'heal' parameter must be 'none'"):
        _cfg(heal=HealConfig(method="lora", steps=3, progress=False), max_memory="1GiB")
    runner = CliRunner()
    res = runner.invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "2",
                               "-o", str(tmp_path / "o"), "--max-memory", "1GiB"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "'strategy'" in res.stderr
    res = runner.invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3",
                               "-o", str(tmp_path / "o"), "--max-memory", "1GiB", "--strategy", "sleb", "--heal", "none",
                               "--max-length", "16", "--batch-size", "2", "--max-eval-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "streamed" in res.output and (tmp_path / "o" / "report.json").is_file()
