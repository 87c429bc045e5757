"""The model card every output folder carries: ``README.md`` in the Hugging Face model-card form.

YAML metadata first (``base_model``, ``library_name``, ``license``, ``pipeline_tag``, ``tags``),
then what was removed (original layer indices), how (method), the measurements before and after
with their protocol (the run's own report section), the command that made it, and versions.
``base_model`` and ``license`` come from the source where they are known: an asset's table row,
or the metadata of a card already in the source folder (so a pruned model pruned again keeps them);
otherwise the card says they are unknown rather than guess.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from fusion_prune import assets

#: the model hub's licence identifiers the asset table's licence texts start with
_LICENSE_IDS = ("apache-2.0", "mit", "gemma", "cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0")


def _license_id(text: str) -> str:
    key = text.strip().lower()
    return next((hub_id for hub_id in _LICENSE_IDS if key.startswith(hub_id)), "other")


def _front_matter(text: str) -> dict[str, str]:
    """The flat ``key: value`` lines of a card's YAML header (lists and nesting are skipped)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and value.strip() and not line.startswith((" ", "-")):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def source_metadata(spec: str) -> dict[str, str]:
    """``base_model`` and ``license`` of the model ``spec`` where known (an asset, or a folder whose
    README.md has them), else {}; a hub id is its own ``base_model``."""
    if spec in assets.ASSETS:
        a = assets.ASSETS[spec]
        meta = {"license": _license_id(a.license)}
        if a.license and meta["license"] == "other":
            meta["license_name"] = a.license
        return {**meta, **({"base_model": a.base_model} if a.base_model else {})}
    path = Path(spec).expanduser()
    card = path / "README.md" if path.is_dir() else path.parent / "README.md"
    if card.is_file():
        meta = _front_matter(card.read_text(errors="replace"))
        return {k: meta[k] for k in ("base_model", "license", "license_name") if k in meta}
    if not path.exists() and spec.count("/") == 1:
        return {"base_model": spec}
    return {}


def pipeline_tag(architecture: str) -> str:
    """The model hub's task tag of a model class name."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if architecture.endswith("ForSequenceClassification"):
        return "text-classification"
    return "feature-extraction"


def architecture_of(folder: str | os.PathLike) -> str:
    """``architectures[0]`` of the saved model in ``folder`` (its config.json)."""
    import json

    return (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or ["PreTrainedModel"])[0]


def invocation() -> str | None:
    """The ``fusionprune ...`` command line of this process, or None when it is not the CLI."""
    exe = Path(sys.argv[0])
    if exe.name != "fusionprune" and exe.parent.parts[-2:] != ("fusion_prune", "cli"):  # also python -m fusion_prune.cli
        return None
    return "fusionprune " + shlex.join(sys.argv[1:])


def model_card(*, source: str, architecture: str, teacher_layers: int, removed: Sequence[int], kept: Sequence[int],
               parameters: int | None, method: Sequence[str], results: Sequence[str], versions: dict[str, str],
               command: str | None = None) -> str:
    """The README.md text. ``removed`` and ``kept``: original layer indices (of the model before any
    pruning) this run removed and the model keeps; ``teacher_layers``: the source's depth;
    ``method`` and ``results``: markdown lines (results: the run's own tables with their protocol)."""
    meta = source_metadata(source)
    removed = sorted(removed)
    name = Path(source).name or source
    header = ["---"]
    if "base_model" in meta:
        header.append(f"base_model: {meta['base_model']}")
    header += ["library_name: transformers", f"license: {meta.get('license', 'unknown')}"]
    if "license_name" in meta:
        header.append(f"license_name: {meta['license_name']!r}")
    header += [f"pipeline_tag: {pipeline_tag(architecture)}", "tags:", "- fusionprune", "- layer-pruning",
               "- depth-pruning", "---", ""]
    body = [f"# {name}, {len(kept)} of {teacher_layers} layers", "",
            f"A depth-pruned copy of `{source}` made by [fusionprune](https://pypi.org/project/fusionprune/): "
            f"whole layers were removed, the rest are unchanged in kind, and the folder loads with plain "
            f"`transformers` (`{architecture}.from_pretrained`; for a causal LM, generation with the KV cache "
            "works as before).", "",
            "## What was removed", "",
            f"- Original layers removed: {removed} ({len(removed)} of the source's {teacher_layers}).",
            f"- Original layers kept, in order: {list(kept)} (also in `config.json` as `fusionprune_kept_layers`).",
            *([f"- Parameters: {parameters:,}."] if parameters else []),
            f"- Base model: {meta.get('base_model', 'unknown')}; licence: "
            f"{meta.get('license_name', meta.get('license', 'unknown'))} (carried over from the source "
            f"where known: check the base model's terms before you share this model).", "",
            "## Method", "", *method, "",
            "## Results", "", *results, "",
            "## How it was made", "",
            "```", command or "the Python API (fusion_prune); the full configuration is in report.json", "```", "",
            "## Versions", "", *(f"- {k} {v}" for k, v in versions.items()), ""]
    return "\n".join(header + body)


def write_model_card(folder: str | os.PathLike, **card) -> Path:
    """Write :func:`model_card` to ``folder``/README.md (the folder is being written atomically)."""
    from fusion_prune.utils import write_text_atomic

    path = Path(folder) / "README.md"
    write_text_atomic(path, model_card(**card))
    return path
