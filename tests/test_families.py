"""Layer removal on decoder families the table does not list: found generically (surgery.find_layer_list).

For each family a tiny random causal LM is built from its config. After removing two layers, the
saved and reloaded model gives the logits of the original model run with those layers replaced by
the identity, and greedy generation with the KV cache equals generation without it.
"""

from __future__ import annotations

import pytest
import torch

V = 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
#: model_type -> config overrides; sliding windows shorter than the test's sequences, so they matter
FAMILIES = {
    "qwen3": {},
    "qwen3_moe": dict(**MOE, decoder_sparse_step=2, mlp_only_layers=[0]),
    "qwen2_moe": dict(**MOE, shared_expert_intermediate_size=32, decoder_sparse_step=2),
    "gemma": {},
    "gemma2": dict(sliding_window=4),
    "gemma3_text": dict(sliding_window=4),
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "olmoe": MOE,
    "mixtral": dict(**MOE, sliding_window=None),
    "granite": {},
    "granitemoe": MOE,
    "stablelm": {},
    "starcoder2": {},
    "cohere": {},
    "helium": {},
    "smollm3": {},
    "glm": {},
    "phi": {},
    "gpt_neox": {},
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, _without=("head_dim",)),  # head_dim is derived
    "ministral": {},
    "exaone4": dict(sliding_window=4),
}
DROP = [1, 3]


def _tiny(mt: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    over = dict(FAMILIES[mt])
    without = over.pop("_without", ())
    cfg = AutoConfig.for_model(mt, **{k: v for k, v in {**COMMON, **over}.items() if k not in without})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def _identity_logits(model, ids, layers: list[int]) -> torch.Tensor:
    """Logits of ``model`` with ``layers`` returning their input unchanged (hooks removed after)."""
    from fusion_prune.surgery import layer_list

    def identity(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    blocks = layer_list(model)
    handles = [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("mt", sorted(FAMILIES))
def test_a_family_loses_two_layers_and_reloads_exactly(mt, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusion_prune.surgery import architecture_of, drop_layers, kept_layers, num_layers

    model = _tiny(mt)
    assert architecture_of(model).kind == "decoder" and num_layers(model) == 5
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _identity_logits(model, ids, DROP)
    pruned = drop_layers(model, DROP)
    assert num_layers(model) == 5  # the input is not changed
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert num_layers(reloaded) == 3 and kept_layers(reloaded) == [0, 2, 4]
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    prompt = ids[:1, :6]
    with_cache = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    without = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_index_rules_are_written_out_for_the_kept_layers():
    """Qwen3-MoE: layer l is sparse when (l + 1) % 2 == 0 and l is not in mlp_only_layers; after removing
    layers 1 and 3 (both sparse) the kept 0, 2, 4 are all dense, written out explicitly."""
    from fusion_prune.surgery import drop_layers

    pruned = drop_layers(_tiny("qwen3_moe"), DROP)
    assert pruned.config.decoder_sparse_step == 1 and pruned.config.mlp_only_layers == [0, 1, 2]
    kinds = [type(layer.mlp).__name__ for layer in pruned.model.layers]
    assert kinds == ["Qwen3MoeMLP"] * 3


@pytest.mark.parametrize("mt", sorted(FAMILIES))
def test_cached_drop_one_nll_equals_dropping_then_evaluating(mt):
    """The drop-one measurement (cached prefixes, the layer list swapped for one forward) on every family."""
    from fusion_prune.corpus import window_batches
    from fusion_prune.dropone import drop_one_nll, drop_one_nll_naive

    model = _tiny(mt)
    windows = torch.randint(3, V, (3, 12), generator=torch.Generator().manual_seed(2))
    batches = window_batches(windows, 2, "cpu")
    fast, slow = drop_one_nll(model, batches), drop_one_nll_naive(model, batches)
    assert fast.table["loss_after_drop"].to_numpy() == pytest.approx(slow.table["loss_after_drop"].to_numpy(),
                                                                     rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mt", sorted(FAMILIES))
def test_the_12_signals_on_every_family(mt):
    import numpy as np

    from fusion_prune.corpus import window_batches
    from signals import DEFAULT_SIGNALS, signals_on_batches

    model = _tiny(mt)
    windows = torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(3))
    table = signals_on_batches(model, window_batches(windows, 2, "cpu"), token_stride=4, progress=False)
    assert list(table["layer"]) == list(range(5)) and np.isfinite(table[list(DEFAULT_SIGNALS)].to_numpy()).all()
    assert not any(m._forward_hooks for m in model.modules())  # the pass leaves no hook behind


def test_inspect_lists_the_families_and_the_rule():
    import json

    from click.testing import CliRunner

    from fusion_prune.cli import main

    res = CliRunner().invoke(main, ["inspect", "--families", "--json"])
    f = json.loads(res.stdout)
    assert res.exit_code == 0 and "Llama" in f["table"] and "one nn.ModuleList" in f["generic"]
    assert "albert" in f["refused"] and "encoder-decoder" in f["refused"]
