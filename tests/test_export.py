"""Recipes for other tools: mergekit's passthrough YAML and llama.cpp's --prune-layers list."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from fusion_prune.cli import main
from fusion_prune.export import export, runs


def test_runs_are_half_open():
    assert runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)] and runs([]) == []


@pytest.fixture(scope="module")
def pruned_twice(tmp_path_factory):
    """A 6-layer Llama pruned twice (layers 1, 4, then the current 2 = original 3): kept [0, 2, 5]."""
    from test_causal_lm import make_tokenizer, tiny_decoder

    root = tmp_path_factory.mktemp("export")
    tiny_decoder("llama", layers=6).save_pretrained(root / "origin")
    make_tokenizer(root / "origin").save_pretrained(root / "origin")
    runner = CliRunner()
    for src, drop, out in (("origin", "1,4", "a"), ("a", "2", "b")):
        res = runner.invoke(main, ["prune", "-m", str(root / src), "--drop", drop, "-o", str(root / out)])
        assert res.exit_code == 0, res.output
    return root


def test_mergekit_yaml_rebuilds_exactly_the_kept_layers(pruned_twice):
    """The slices name the kept original layers (end exclusive, as mergekit reads layer_range), and
    taking them from the original, as passthrough does, gives the pruned folder's weights."""
    from fusion_prune.surgery import drop_layers, layer_list

    res = CliRunner().invoke(main, ["export", str(pruned_twice / "b"), "--to", "mergekit"])
    assert res.exit_code == 0, res.output
    recipe = yaml.safe_load(res.output)
    assert recipe["merge_method"] == "passthrough" and recipe["dtype"] == "float32"
    ranges = [s["sources"][0]["layer_range"] for s in recipe["slices"]]
    assert ranges == [[0, 1], [2, 3], [5, 6]]
    assert {s["sources"][0]["model"] for s in recipe["slices"]} == {str((pruned_twice / "origin").resolve())}
    origin = AutoModelForCausalLM.from_pretrained(pruned_twice / "origin")
    keep = [i for a, b in ranges for i in range(a, b)]
    rebuilt = drop_layers(origin, [i for i in range(len(layer_list(origin))) if i not in keep])
    pruned = AutoModelForCausalLM.from_pretrained(pruned_twice / "b")
    want, got = pruned.state_dict(), rebuilt.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_llama_cpp_gets_the_removed_original_layers(pruned_twice, tmp_path):
    text = export(pruned_twice / "b", "llama.cpp")
    assert "llama-quantize --prune-layers 1,3,4 " in text and "rebuilds it exactly" in text
    out = tmp_path / "prune.txt"
    assert CliRunner().invoke(main, ["export", str(pruned_twice / "b"), "--to", "llama.cpp", "-o", str(out)]).exit_code == 0
    assert out.read_text() == text
    assert CliRunner().invoke(main, ["export", str(pruned_twice / "b"), "--to", "llama.cpp", "-o", str(out)]).exit_code == 2


def test_folders_fusionprune_did_not_write_or_cannot_repeat_are_refused(pruned_twice, tmp_path):
    res = CliRunner().invoke(main, ["export", str(pruned_twice / "origin"), "--to", "mergekit"])
    assert res.exit_code == 2 and "holds no fusionprune run record" in res.output and res.output.count("\n") == 1
    # a classifier run that trained its own teacher first: its layers are not the original's
    fake = tmp_path / "run"
    fake.mkdir()
    (fake / "config.json").write_text((pruned_twice / "a" / "config.json").read_text())
    (fake / "report.json").write_text(json.dumps({"model": str(pruned_twice / "origin"),
                                                  "info": {"teacher_finetuned": True}}))
    res = CliRunner().invoke(main, ["export", str(fake), "--to", "mergekit"])
    assert res.exit_code == 2 and "teacher fine-tuned inside the run" in res.output


def test_onnx_export_matches_pytorch_on_a_new_batch_shape(pruned_twice, tmp_path):
    """A pruned causal LM as an ONNX graph: onnxruntime gives PyTorch's logits on batches of shapes the
    export did not trace (batch and sequence length are dynamic); the folder has tokenizer and config."""
    import numpy as np

    from fusion_prune.export import onnx_session
    from fusion_prune.models import load_tokenizer

    out = tmp_path / "onnx"
    res = CliRunner().invoke(main, ["export", str(pruned_twice / "b"), "--to", "onnx", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert {"model.onnx", "config.json", "fusionprune_onnx.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tok = load_tokenizer(str(out))
    enc = tok(["good movie bad plot"] * 5, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(pruned_twice / "b").eval()
    with torch.no_grad():
        want = model(**enc, use_cache=False).logits.numpy()
    got = onnx_session(out / "model.onnx").run(None, {k: enc[k].numpy() for k in ("input_ids", "attention_mask")})[0]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    res = CliRunner().invoke(main, ["export", str(pruned_twice / "b"), "--to", "onnx"])
    assert res.exit_code == 2 and "'--output' option is needed" in res.output


def test_onnx_export_of_a_classifier(tmp_path):
    from transformers import BertForSequenceClassification

    from conftest import make_tokenizer, tiny_bert_config
    from fusion_prune.api import prune_to_folder
    from fusion_prune.export import to_onnx

    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels=2, layers=3)).save_pretrained(tmp_path / "clf")
    make_tokenizer(tmp_path / "clf").save_pretrained(tmp_path / "clf")
    prune_to_folder(str(tmp_path / "clf"), [0], tmp_path / "student")
    rec = to_onnx(str(tmp_path / "student"), tmp_path / "onnx")
    assert rec["output"] == "logits" and rec["check_batch"][0] == 3 and rec["relative_diff"] < 1e-4
