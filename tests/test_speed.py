"""Speed by depth (fusion_prune.speed): views of the full model, timed in alternating rounds."""

from __future__ import annotations

import pytest
import torch

from test_causal_lm import tiny_decoder


def test_depth_speeds_count_the_flops_of_real_pruned_copies_and_restore_the_model():
    from fusion_prune.speed import depth_speeds, flops
    from fusion_prune.surgery import drop_layers, layer_list

    model = tiny_decoder("llama", layers=4).eval()
    before = list(layer_list(model))
    batch = {"input_ids": torch.randint(3, 20, (2, 16), generator=torch.Generator().manual_seed(0))}
    rows = depth_speeds(model, [[0, 1, 2, 3], [0, 2, 3], [0, 3]], batch, per_token=True, repeats=2)
    assert [r["layers"] for r in rows] == [4, 3, 2] and all(len(r["seconds"]) == 2 for r in rows)
    assert list(layer_list(model)) == before and model.config.num_hidden_layers == 4  # put back
    prefill = batch | {"logits_to_keep": 1}  # a causal LM is timed as a prefill
    full = flops(model, prefill)
    for r, drop in zip(rows[1:], ([1], [1, 2])):
        assert r["ideal_speedup"] == pytest.approx(full / flops(drop_layers(model, drop), prefill))
    assert rows[0]["ideal_speedup"] == 1.0 and rows[0]["speedup"] == 1.0
    assert rows[2]["ideal_speedup"] > rows[1]["ideal_speedup"] > 1
    assert all(r["throughput"] == pytest.approx(32 / min(r["seconds"])) for r in rows)


def test_a_causal_lm_is_timed_as_a_prefill_and_a_classifier_as_is(tiny_base_model):
    from transformers import AutoModel

    from fusion_prune.speed import prefill_kwargs

    assert prefill_kwargs(tiny_decoder("llama", layers=2)) == {"logits_to_keep": 1}
    assert prefill_kwargs(AutoModel.from_pretrained(tiny_base_model)) == {}
