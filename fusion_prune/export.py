"""Recipes that repeat a fusionprune cut in other tools: mergekit and llama.cpp.

A folder fusionprune wrote records the original indices of its kept layers
(``config.fusionprune_kept_layers``) and, in its run record, the model it came from. From these:

- ``mergekit``: a ``passthrough`` merge whose slices take the kept layers from the original model
  (``layer_range: [start, end]``, end exclusive, as mergekit reads it: ``range(start, end)``).
- ``llama.cpp``: the original indices to remove, comma-separated, as ``llama-quantize
  --prune-layers`` takes them (llama.cpp PR 13037), and the command around them. No GGUF file is
  written: the maintained HF -> GGUF converter (``convert_hf_to_gguf.py``) ships with llama.cpp's
  sources, not in the ``gguf`` package on PyPI, so it does not install from the package registry.

Both rebuild the *pruned* model from the original weights: what recovery, distillation or healing
changed after the cut is not in them, and a run that trained its own teacher first (a classifier
without a head) cannot be repeated from the original model at all; both are refused or said.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusion_prune.errors import BadInputError, bad_choice

#: run record file -> the key naming the model it was made from
RECORDS = {"report.json": "model", "fusionprune_prune.json": "model", "fusionprune_distill.json": "student"}
TARGETS = ("mergekit", "llama.cpp")


def lineage(folder: str | Path) -> dict:
    """``{"origin", "kept", "depth", "trained", "dtype"}`` of a folder fusionprune wrote: the
    never-pruned model it descends from (following pruned sources back), the original indices of the
    kept layers, the origin's depth, which steps changed weights after a cut, the origin's dtype."""
    from fusion_prune.models import load_config
    from fusion_prune.surgery import kept_layers

    folder = Path(folder)
    trained: list[str] = []
    src: str | None = str(folder)
    while src is not None and Path(src).is_dir() and any((Path(src) / r).is_file() for r in RECORDS):
        here = Path(src)
        name = next(r for r in RECORDS if (here / r).is_file())
        record = json.loads((here / name).read_text())
        trained += _weight_changes(name, record)
        src = record[RECORDS[name]]
    if src is None or src == str(folder):
        raise BadInputError(f"The 'folder' parameter {str(folder)!r} holds no fusionprune run record "
                            f"({', '.join(RECORDS)}); expected a folder fusionprune compress, prune or distill wrote.")
    origin = load_config(src)
    depth = getattr(origin, "num_hidden_layers", None) or origin.get_text_config().num_hidden_layers
    dtype = str(getattr(origin, "dtype", None) or "float32").replace("torch.", "")
    return {"origin": src, "kept": kept_layers(load_config(folder)), "trained": trained, "depth": int(depth),
            "dtype": dtype}


def _weight_changes(record_name: str, record: dict) -> list[str]:
    if record_name == "fusionprune_distill.json":
        return ["distillation"]
    if record_name != "report.json":
        return []
    out = []
    if (record.get("info") or {}).get("teacher_finetuned"):
        out.append("teacher fine-tuned in the run")
    if (record.get("config") or {}).get("finetune_steps"):
        out.append("recovery")
    if record.get("distill"):
        out.append("distillation")
    if (record.get("heal") or {}).get("steps"):
        out.append("healing")
    return out


def runs(kept: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of the sorted ``kept`` indices as ``(start, end)``, end exclusive."""
    out: list[list[int]] = []
    for i in sorted(kept):
        if out and i == out[-1][1]:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def mergekit_yaml(origin: str, kept: list[int], note: str = "", dtype: str = "float32") -> str:
    """A mergekit passthrough config that keeps exactly ``kept`` (original indices) of ``origin``."""
    lines = ["# fusionprune: the kept layers of the original model, rebuilt by mergekit (mergekit-yaml THIS OUT)."]
    lines += [f"# {line}" for line in note.splitlines() if line]
    lines += ["slices:"]
    for a, b in runs(kept):
        lines += ["  - sources:", f"      - model: {json.dumps(origin)}", f"        layer_range: [{a}, {b}]"]
    lines += ["merge_method: passthrough", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def llama_cpp_command(removed: list[int]) -> str:
    """The ``llama-quantize`` call that removes ``removed`` (original indices) from a GGUF of the original."""
    return (f"llama-quantize --prune-layers {','.join(map(str, sorted(removed)))} ORIGINAL-f16.gguf "
            "PRUNED-q8_0.gguf q8_0")


def export(folder: str | Path, to: str) -> str:
    """The recipe text for ``to`` (one of :data:`TARGETS`) of the fusionprune output ``folder``."""
    if to not in TARGETS:
        raise bad_choice("to", to, TARGETS)
    info = lineage(folder)
    if "teacher fine-tuned in the run" in info["trained"]:
        raise BadInputError(f"The 'folder' {str(folder)!r} was cut from a teacher fine-tuned inside the run, which "
                            f"was not kept; expected a run on a model that already had its head (its layers are "
                            f"then the original's). Got a run whose teacher was trained first.")
    after = ", ".join(info["trained"])
    note = (f"It does not carry what {after} changed after the cut: the folder's own weights do."
            if after else "The folder was not trained after the cut: this rebuilds it exactly.")
    if to == "mergekit":
        return mergekit_yaml(_mergekit_source(info["origin"]), info["kept"], note, info["dtype"])
    removed = sorted(set(range(info["depth"])) - set(info["kept"]))
    return "\n".join([f"# fusionprune: the original layers to remove, for llama.cpp's layer pruning. {note}",
                      f"# Make ORIGINAL-f16.gguf from {info['origin']} with llama.cpp's convert_hf_to_gguf.py "
                      "(in llama.cpp's sources, not on PyPI).",
                      llama_cpp_command(removed), ""])


def _mergekit_source(origin: str) -> str:
    """An asset's local folder (its weights, not the hub's) or the folder or hub id as given."""
    from fusion_prune.models import resolve

    src = resolve(origin)
    return str(Path(src.location).resolve()) if src.local else src.location
