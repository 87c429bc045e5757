"""The model card (README.md) every output folder carries, in the Hugging Face form."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from fusion_prune.card import model_card, source_metadata
from fusion_prune.cli import main


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_prune_writes_a_card_that_names_original_layers_across_two_prunes(tmp_path):
    from transformers import BertModel

    from conftest import make_tokenizer, tiny_bert_config

    src = tmp_path / "src"
    BertModel(tiny_bert_config(layers=3)).save_pretrained(src)
    make_tokenizer(src).save_pretrained(src)
    (src / "README.md").write_text("---\nlicense: mit\nbase_model: someone/tiny-bert\n---\n# tiny\n")
    runner = CliRunner()
    assert runner.invoke(main, ["prune", "-m", str(src), "--drop", "0", "-o", str(tmp_path / "a")]).exit_code == 0
    first = (tmp_path / "a" / "README.md").read_text()
    meta = _front(first)
    assert meta["license"] == "mit" and meta["base_model"] == "someone/tiny-bert"  # carried from the source card
    assert meta["library_name"] == "transformers" and "layer-pruning" in meta["tags"]
    assert meta["pipeline_tag"] == "feature-extraction" and "Original layers removed: [0]" in first
    # Pruned again: the card carries the metadata on and names the removed layer by its original index.
    assert runner.invoke(main, ["prune", "-m", str(tmp_path / "a"), "--drop", "0", "-o", str(tmp_path / "b")]).exit_code == 0
    second = (tmp_path / "b" / "README.md").read_text()
    assert _front(second)["license"] == "mit" and "Original layers removed: [1]" in second
    assert "Original layers kept, in order: [2]" in second and "--drop 0" in second


def test_assets_and_hub_ids_give_what_is_known_and_nothing_else(tmp_path):
    assert source_metadata("smollm2-135m") == {"license": "apache-2.0",
                                               "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    gemma = source_metadata("gemma3-270m")
    assert gemma["license"] == "gemma" and gemma["base_model"] == "google/gemma-3-270m"
    assert source_metadata("org/model") == {"base_model": "org/model"}
    assert source_metadata(str(tmp_path)) == {}  # a folder with no card: unknown, not guessed
    card = model_card(source=str(tmp_path), architecture="LlamaForCausalLM", teacher_layers=4, removed=[3, 1],
                      kept=[0, 2], parameters=None, method=["- m"], results=["| r |"], versions={"torch": "x"})
    meta = _front(card)
    assert meta["license"] == "unknown" and "base_model" not in meta and meta["pipeline_tag"] == "text-generation"
    assert "Original layers removed: [1, 3]" in card and "the Python API" in card and "- torch x" in card
