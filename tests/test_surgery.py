"""Layer surgery: every family round-trips through save_pretrained / plain from_pretrained."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from fusion_prune.errors import BadInputError
from fusion_prune.surgery import (ARCHITECTURES, KEPT_ATTR, describe, drop_layers, drop_layers_, kept_layers,
                                  layer_list, supported_families)

V = 64  # vocabulary of every tiny model
ENC = dict(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
           max_position_embeddings=64)
DEC = dict(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
           intermediate_size=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "bert": lambda: T.BertConfig(**ENC),
    "roberta": lambda: T.RobertaConfig(**{**ENC, "max_position_embeddings": 70}, pad_token_id=1),
    "mpnet": lambda: T.MPNetConfig(**{**ENC, "max_position_embeddings": 70}),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=V, dim=16, n_layers=4, n_heads=2, hidden_dim=32,
                                             max_position_embeddings=64),
    "electra": lambda: T.ElectraConfig(**ENC, embedding_size=8),
    "deberta-v2": lambda: T.DebertaV2Config(**ENC),
    "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=16, n_layer=4, n_head=2, n_positions=64, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2),
    "llama": lambda: T.LlamaConfig(**DEC),
    "mistral": lambda: T.MistralConfig(**DEC, sliding_window=4),
    # Qwen2 with sliding-window layers on top: layer_types is a per-layer list that must be sliced.
    "qwen2": lambda: T.Qwen2Config(**DEC, use_sliding_window=True, sliding_window=4, max_window_layers=2),
}
ENCODER_CLASSES = (T.AutoModel, T.AutoModelForSequenceClassification)
DECODER_CLASSES = (T.AutoModel, T.AutoModelForSequenceClassification, T.AutoModelForCausalLM)
CASES = [(mt, auto) for mt in CONFIGS
         for auto in (DECODER_CLASSES if ARCHITECTURES[mt].kind == "decoder" else ENCODER_CLASSES)]


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second example
    ids[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _build(mt, auto):
    torch.manual_seed(0)
    return auto.from_config(CONFIGS[mt]()).eval()


def test_table_covers_the_design_families():
    assert set(CONFIGS) == set(ARCHITECTURES)
    assert supported_families() == sorted(["BERT", "RoBERTa", "MPNet", "DistilBERT", "ELECTRA", "DeBERTa-v2",
                                           "GPT-2", "Llama", "Mistral", "Qwen2"])


@pytest.mark.parametrize("mt, auto", CASES, ids=[f"{m}-{a.__name__[9:] or 'Base'}" for m, a in CASES])
def test_prune_save_reload_same_outputs(mt, auto, tmp_path):
    model = _build(mt, auto)
    inputs = _inputs()
    before = _outputs(model, inputs)
    pruned = drop_layers(model, [1, 3])
    # The input model is untouched.
    assert len(layer_list(model)) == 4 and model.config.num_hidden_layers == 4
    assert getattr(model.config, KEPT_ATTR, None) is None
    torch.testing.assert_close(_outputs(model, inputs), before)
    # The copy has the kept layers, with the original weights, and a config that says so.
    assert len(layer_list(pruned)) == 2 and pruned.config.num_hidden_layers == 2
    assert kept_layers(pruned) == [0, 2]
    for new, old in ((0, 0), (1, 2)):
        for (n1, p1), (n2, p2) in zip(layer_list(pruned)[new].named_parameters(),
                                      layer_list(model)[old].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    if getattr(model.config, "layer_types", None) is not None:
        assert pruned.config.layer_types == [model.config.layer_types[i] for i in (0, 2)]
    out = _outputs(pruned, inputs)
    assert not torch.allclose(out, before)  # two layers fewer is a different function
    pruned.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    assert reloaded.config.num_hidden_layers == 2 and kept_layers(reloaded) == [0, 2]
    torch.testing.assert_close(_outputs(reloaded, inputs), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mt", [m for m in CONFIGS if ARCHITECTURES[m].kind == "decoder"])
def test_decoder_generate_with_cache_matches(mt, tmp_path):
    model = _build(mt, T.AutoModelForCausalLM)
    pruned = drop_layers(model, [0, 2])
    # Attention indexes the KV cache by layer_idx: it must now be 0..n-1.
    idx = sorted({m.layer_idx for m in pruned.modules() if isinstance(getattr(m, "layer_idx", None), int)})
    assert idx == [0, 1]
    pruned.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = _inputs()["input_ids"][:1, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = pruned.generate(prompt, use_cache=True, **kw)
    assert torch.equal(with_cache, reloaded.generate(prompt, use_cache=True, **kw))
    # A stale layer_idx would make the cached run diverge from the uncached one.
    assert torch.equal(with_cache, pruned.generate(prompt, use_cache=False, **kw))


def test_pruning_twice_composes_original_indices(tmp_path):
    model = _build("bert", T.AutoModel)
    once = drop_layers(model, [1])          # keeps original 0, 2, 3
    twice = drop_layers(once, [0])          # drops original 0: keeps 2, 3
    assert kept_layers(once) == [0, 2, 3] and kept_layers(twice) == [2, 3]
    twice.save_pretrained(tmp_path)
    assert getattr(T.AutoConfig.from_pretrained(tmp_path), KEPT_ATTR) == [2, 3]
    for new, old in ((0, 2), (1, 3)):
        assert torch.equal(layer_list(twice)[new].output.dense.weight, layer_list(model)[old].output.dense.weight)


def test_in_place_variant_mutates_and_returns_same_object():
    model = _build("llama", T.AutoModelForCausalLM)
    assert drop_layers_(model, [3]) is model and model.config.num_hidden_layers == 3


def test_copy_does_not_carry_the_input_models_hooks():
    model = _build("bert", T.AutoModel)
    calls: list[int] = []
    handle = layer_list(model)[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        pruned = drop_layers(model, [3])
        pruned(**_inputs())
        assert calls == []  # the probe belongs to the original only
        model(**_inputs())
        assert calls == [1]
    finally:
        handle.remove()


def test_pruned_equals_running_only_the_kept_layers():
    """Hand check on BERT: the pruned encoder is the embeddings followed by the kept layers."""
    model = _build("bert", T.AutoModel)
    ids = _inputs()["input_ids"]  # no padding, so no attention mask is needed
    pruned = drop_layers(model, [0, 3])
    with torch.no_grad():
        h = model.embeddings(input_ids=ids)
        for i in (1, 2):
            out = model.encoder.layer[i](h)
            h = out[0] if isinstance(out, tuple) else out
        expected = h
        got = pruned(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_describe_counts_parameters():
    model = _build("gpt2", T.AutoModelForCausalLM)
    d0 = describe(model)
    d1 = describe(drop_layers(model, [0]))
    per_layer = sum(p.numel() for p in layer_list(model)[0].parameters())
    assert d0["parameters"] - d1["parameters"] == per_layer
    assert (d0["family"], d0["kind"], d0["layers"], d1["layers"], d1["kept_layers"]) == ("GPT-2", "decoder", 4, 3,
                                                                                         [1, 2, 3])


# --------------------------------------------------------------------------- refusals


def test_albert_is_refused_naming_supported_families():
    model = T.AlbertModel(T.AlbertConfig(vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=32))
    with pytest.raises(BadInputError, match="ALBERT shares one set of weights.*supported: BERT"):
        drop_layers(model, [0])


def test_unknown_and_encoder_decoder_architectures_are_refused():
    vit = T.ViTModel(T.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4))
    with pytest.raises(BadInputError, match="model_type 'vit' is not supported.*BERT.*or a causal LM"):
        drop_layers(vit, [0])
    t5 = T.T5Model(T.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    with pytest.raises(BadInputError, match="'t5' is an encoder-decoder model"):
        drop_layers(t5, [0])


@pytest.mark.parametrize("layers, message", [
    ([0, 1, 2, 3], "would remove all 4 layers"),
    ([4], r"indices in \[0, 3\] for a 4-layer model. Got \[4\]"),
    ([-1], r"Got \[-1\]"),
    ([1, 1], r"must not repeat a layer. Got \[1\]"),
    ([], "at least one layer"),
    (["1"], "integer layer indices"),
])
def test_bad_layer_lists(layers, message):
    model = _build("bert", T.AutoModel)
    with pytest.raises(BadInputError, match=message):
        drop_layers(model, layers)
    assert model.config.num_hidden_layers == 4
