"""Model specs: folders, assets, GGUF files, hub ids, and their errors."""

from __future__ import annotations

import pytest

from fusion_prune.errors import BadInputError
from fusion_prune.models import load_base, load_classifier, resolve


def test_local_folder_never_uses_the_network(tiny_base_model):
    src = resolve(str(tiny_base_model))
    assert src.local and src.kwargs() == {"trust_remote_code": False, "local_files_only": True}
    model, tok = load_base(str(tiny_base_model))
    assert model.config.num_hidden_layers == 2 and tok.pad_token == "[PAD]"


def test_hub_id_is_not_local(monkeypatch):
    from fusion_prune import models

    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    src = resolve("someone/some-model")
    assert not src.local and src.kwargs() == {"trust_remote_code": False}


def test_an_unknown_name_offline_fails_at_once_with_the_closest_asset(monkeypatch):
    """A misspelled asset on a machine without the hub: one line, no hub retries, a suggestion and
    the list (it used to retry for about 30 s and end with a connection error)."""
    import time

    from fusion_prune import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    models.hub_reachable.cache_clear()
    try:
        t0 = time.perf_counter()
        with pytest.raises(BadInputError) as e:
            resolve("minilm-l7")
        assert time.perf_counter() - t0 < 1.0
        msg = str(e.value)
        assert "\n" not in msg and "Did you mean 'minilm-l6'?" in msg and "smollm2-135m" in msg
        with pytest.raises(BadInputError, match="does not exist.*Did you mean 'minilm-l6'"):
            resolve("./runs/minilm-l6x")
    finally:
        models.hub_reachable.cache_clear()


def test_gguf_file_is_passed_through(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    src = resolve(str(tmp_path / "m.gguf"))
    assert src.gguf_file == "m.gguf" and src.location == str(tmp_path)
    src = resolve(str(tmp_path))  # a folder holding one .gguf and no config.json
    assert src.gguf_file == "m.gguf"


def test_missing_path_and_folder_without_config(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="has no config.json"):
        resolve(str(tmp_path / "empty"))


def test_dataset_asset_is_not_a_model():
    with pytest.raises(BadInputError, match="names the dataset asset 'rotten-tomatoes'; expected a model"):
        resolve("rotten-tomatoes")


def test_classifier_without_head_needs_labels(tiny_base_model):
    with pytest.raises(BadInputError, match="has no classification head"):
        load_classifier(str(tiny_base_model))


def test_decoder_gets_a_pad_token(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "good": 2, "bad": 3}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, t, trained = load_classifier(str(tmp_path), ["neg", "pos"])
    assert not trained and t.pad_token == "<eos>" and model.config.pad_token_id == 0
    enc = t(["good bad good", "bad"], padding=True, return_tensors="pt")
    assert model(**enc.to(model.device)).logits.shape == (2, 2)


def test_models_load_onto_this_process_device(tiny_base_model, monkeypatch):
    import torch

    from fusion_prune.models import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # accelerate launch: one GPU a process
    assert default_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _, _ = load_classifier(str(tiny_base_model), ["neg", "pos"], device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    base, _ = load_base(str(tiny_base_model), device=None)
    assert next(base.parameters()).device.type == "cpu"
