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
    "gemma2": dict(sliding_window=4, final_logit_softcapping=0.05),  # a cap the tiny logits reach
    "gemma3_text": dict(sliding_window=4),
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "olmoe": MOE,
    "mixtral": dict(**MOE, sliding_window=None),
    "granite": dict(logits_scaling=2.0),  # its logits are lm_head(h) / logits_scaling
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


def _padded_windows(seed: int) -> dict:
    ids = torch.randint(3, V, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: its positions predict nothing
    return {"input_ids": ids, "attention_mask": mask}


def _full_logits_nll(model, batch) -> tuple[torch.Tensor, int]:
    logits = model(**batch, use_cache=False).logits.float()
    target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), target.reshape(-1), ignore_index=-100,
                                            reduction="sum")
    real = target != -100
    return nll, int((logits[:, :-1].argmax(-1).eq(target) & real).sum())


@pytest.mark.parametrize("mt", sorted(FAMILIES))
def test_chunked_next_token_loss_equals_the_full_logits_one(mt):
    """The head the chunked loss applies (lm_head and the family's transform) is the model's own, and
    the chunked, checkpointed loss has the full-logits loss's value and gradients."""
    from fusion_prune import logits as L
    from fusion_prune.surgery import layer_list

    model = _tiny(mt)
    batch = _padded_windows(4)
    params = list(layer_list(model).parameters())
    want, want_right = _full_logits_nll(model, batch)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    states, head, _ = L.forward_hidden(model, batch)
    assert type(model) not in L._FULL_LOGITS and head is not L._identity
    got, right, count = L.next_token_sums(states, head, batch, chunk_tokens=5)  # several chunks, a ragged last one
    assert count == 2 * 11 + 8 and right == want_right
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mt", ["qwen3", "gemma2"])  # gemma2: a head with a softcap
@pytest.mark.parametrize("top_k", [0, 5])
def test_chunked_distillation_equals_the_full_logits_one(mt, top_k):
    """Healing's KD loss made a chunk of positions at a time (the student's logits, and the teacher's
    from its hidden states or its top-k with the tail) has the full-logits loss's value and gradients,
    and leaves the teacher's head untrained."""
    from distill import next_token_kl, teacher_kl, teacher_topk_logits, topk_next_token_kl
    from fusion_prune import logits as L
    from fusion_prune.surgery import drop_layers, layer_list

    teacher = _tiny(mt)
    student = drop_layers(teacher, [1])
    batch = {"input_ids": _padded_windows(6)["input_ids"]}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # healing's windows are full
    temp = 2.0
    params = list(layer_list(student).parameters())
    logits = student(**batch, use_cache=False).logits
    if top_k:
        top = teacher_topk_logits(teacher, batch["input_ids"], top_k, 2, temperature=temp)
        full_kd = topk_next_token_kl(logits, *top[:2], temp, teacher_log_tail=top[2])
    else:
        with torch.no_grad():
            t_logits = teacher(**batch, use_cache=False).logits
        full_kd = next_token_kl(logits, t_logits, temp)
    want = (L.next_token_loss(logits, batch), full_kd)
    want_grads = [torch.autograd.grad(w, params, retain_graph=True) for w in want]
    states, head, _ = L.forward_hidden(student, batch)
    if top_k:
        from distill import topk_kl_rows

        described, kl = top, lambda s, v, i, t: topk_kl_rows(s, v, i, t, temperature=temp)
    else:
        with torch.no_grad():
            t_states, t_head, _ = L.forward_hidden(teacher, batch)
        described, kl = (t_states,), teacher_kl(t_head, temp)
    nll, kd, count = L.next_token_kd_sums(states, head, batch, described, kl, chunk_tokens=5)
    assert count == 3 * 11 and float(kd.detach()) > 0
    for got, w, w_grads in zip((nll / count, kd / count), want, want_grads):  # the CE, then the KL
        assert float(got.detach()) == pytest.approx(float(w.detach()), rel=1e-5)
        for g, wg in zip(torch.autograd.grad(got, params, retain_graph=True), w_grads):
            torch.testing.assert_close(g, wg, atol=1e-7, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_top_k_is_taken_a_chunk_of_positions_at_a_time(monkeypatch):
    """The teacher's top-k cache equals the top k of its full logits (values, ids, tail) when its head
    runs on a few positions at a time."""
    from distill import teacher_topk_logits
    from fusion_prune import logits as L

    teacher = _tiny("qwen3")
    ids = _padded_windows(7)["input_ids"]
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 7 * V)  # 7 positions per head call
    values, idx, tail = teacher_topk_logits(teacher, ids, 4, batch_size=2, temperature=2.0)
    with torch.no_grad():
        logits = teacher(input_ids=ids, use_cache=False).logits.float()
    ref = logits.topk(4, dim=-1)
    torch.testing.assert_close(values.float(), ref.values, atol=1e-2, rtol=1e-2)
    assert torch.equal(idx.long(), ref.indices)
    rest = 1 - torch.softmax(logits / 2.0, -1).gather(-1, ref.indices).sum(-1)
    torch.testing.assert_close(tail.exp(), rest, atol=1e-5, rtol=1e-4)


def test_head_chunks_hold_the_same_number_of_logits_whatever_the_vocabulary(monkeypatch):
    """The default chunk is sized by logits, not positions: 512 positions of a 49,152-token vocabulary,
    96 of Gemma 3's 262,144, at least one; the loss splits into that many positions per head call."""
    from fusion_prune import logits as L

    assert (L.chunk_positions(49_152), L.chunk_positions(262_144), L.chunk_positions(10**9)) == (512, 96, 1)
    model = _tiny("qwen3")
    batch = _padded_windows(4)
    want = L.next_token_sums(*L.forward_hidden(model, batch)[:2], batch)
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 7 * V)  # 7 positions per call: several chunks here
    calls = []
    states, head, _ = L.forward_hidden(model, batch)
    got = L.next_token_sums(states, lambda x: calls.append(len(x)) or head(x), batch)
    assert calls[1:] == [7, 7, 7, 7, 2] and (got[1], got[2]) == (want[1], want[2])  # calls[0]: the width probe
    assert float(got[0].detach()) == pytest.approx(float(want[0].detach()), rel=1e-6)


def test_a_head_the_table_does_not_know_falls_back_to_full_logits(monkeypatch, caplog):
    """Without the softcap transform Gemma 2's head check fails: the score comes from its full logits,
    with one warning, and is still right."""
    from fusion_prune import logits as L

    model = _tiny("gemma2")
    monkeypatch.setattr(L, "LOGIT_TRANSFORMS", ())
    monkeypatch.setattr(L, "_FULL_LOGITS", set())
    batch = _padded_windows(5)
    with caplog.at_level("WARNING", logger="fusion_prune.logits"):
        states, head, _ = L.forward_hidden(model, batch)
    assert head is L._identity and states.shape == (3, 12, V) and "LOGIT_TRANSFORMS" in caplog.text
    want, _ = _full_logits_nll(model, batch)
    assert float(L.next_token_sums(states, head, batch)[0].detach()) == pytest.approx(float(want.detach()), rel=1e-6)


@pytest.mark.parametrize("mt", ["qwen3", "gemma3_text", "phi", "falcon", "mixtral"])
def test_checkpointed_signals_equal_the_plain_pass(mt):
    """Recomputing each layer in the backward (what the causal-LM task runs) changes no signal, and
    leaves every layer's forward as it was."""
    from fusion_prune.corpus import window_batches
    from fusion_prune.surgery import layer_list
    from signals import DEFAULT_SIGNALS, signals_on_batches

    model = _tiny(mt)
    batches = window_batches(torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(6)), 2, "cpu")
    plain = signals_on_batches(model, batches, token_stride=4, progress=False)
    ckpt = signals_on_batches(model, batches, token_stride=4, checkpoint_layers=True, progress=False)
    for name in DEFAULT_SIGNALS:
        assert ckpt[name].to_numpy() == pytest.approx(plain[name].to_numpy(), rel=1e-4, abs=1e-7), name
    assert not any("forward" in vars(layer) for layer in layer_list(model))
