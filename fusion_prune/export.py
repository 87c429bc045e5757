"""Outputs other runtimes use: recipes that repeat a cut (mergekit, llama.cpp) and ONNX graphs.

A folder fusionprune wrote records the original indices of its kept layers
(``config.fusionprune_kept_layers``) and, in its run record, the model it came from. From these:

- ``mergekit``: a ``passthrough`` merge whose slices take the kept layers from the original model
  (``layer_range: [start, end]``, end exclusive, as mergekit reads it: ``range(start, end)``).
- ``llama.cpp``: the original indices to remove, comma-separated, as ``llama-quantize
  --prune-layers`` takes them (llama.cpp PR 13037), and the command around them. No GGUF file is
  written: the maintained HF -> GGUF converter (``convert_hf_to_gguf.py``) ships with llama.cpp's
  sources, not in the ``gguf`` package on PyPI, so it does not install from the package registry.

- ``onnx``: the folder's model as an ONNX graph (``torch.onnx.export``, the dynamo exporter, batch
  and sequence length dynamic), with its tokenizer and config beside it; outputs are checked
  against PyTorch's before the folder is kept. A causal LM is exported without its KV cache (one
  forward over the whole sequence: scoring and prefill, not step-by-step generation).

The recipes rebuild the *pruned* model from the original weights: what recovery, distillation or healing
changed after the cut is not in them, and a run that trained its own teacher first (a classifier
without a head) cannot be repeated from the original model at all; both are refused or said.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from fusion_prune.errors import BadInputError, bad_choice

#: run record file -> the key naming the model it was made from
RECORDS = {"report.json": "model", "fusionprune_prune.json": "model", "fusionprune_distill.json": "student"}
TARGETS = ("mergekit", "llama.cpp", "onnx")
#: largest |ONNX - PyTorch| allowed on the check batch, relative to the largest |PyTorch| output
ONNX_TOLERANCE = 1e-4


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


def export(folder: str | Path, to: str, output: str | Path | None = None, overwrite: bool = False) -> str:
    """The recipe text for ``to`` (one of :data:`TARGETS`) of the fusionprune output ``folder``; for
    ``onnx``, the ONNX folder written to ``output`` and a one-line summary."""
    if to not in TARGETS:
        raise bad_choice("to", to, TARGETS)
    info = lineage(folder)
    if to == "onnx":
        if output is None:
            raise BadInputError("The '--output' option is needed for --to onnx; expected a folder. Got none.")
        rec = to_onnx(str(folder), output, overwrite)
        return (f"saved {output}: model.onnx ({rec['output']}), largest difference to PyTorch "
                f"{rec['max_abs_diff']:.2e} (relative {rec['relative_diff']:.1e})\n")
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


def to_onnx(model_spec: str, output: str | Path, overwrite: bool = False, opset: int = 18) -> dict:
    """Export ``model_spec`` (any model fusionprune loads) to ``output``/model.onnx with its tokenizer
    and config, after checking onnxruntime's outputs against PyTorch's on a batch of another shape
    than the one traced (:data:`ONNX_TOLERANCE`); returns the record also saved as
    ``fusionprune_onnx.json``. Inputs ``input_ids`` and ``attention_mask`` (B, T); one output: the
    classifier's logits (B, C), the LM's logits (B, T, V) or the encoder's hidden states (B, T, H)."""
    import importlib.util

    for module, package in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
        if importlib.util.find_spec(module) is None:
            raise BadInputError(f"The '--to' option 'onnx' needs {package}, which is not installed: "
                                "pip install 'fusionprune[onnx]'")
    import torch

    from fusion_prune.models import load_native, no_cache_kwargs
    from fusion_prune.utils import atomic_dir, versions, write_json_atomic

    model, tok = load_native(model_spec, device="cpu")
    if tok is None:
        raise BadInputError(f"The model {model_spec!r} has no tokenizer; expected a folder with one (the ONNX "
                            "graph takes token ids).")
    model.eval()

    class Graph(torch.nn.Module):  # keyword inputs in, one tensor out: what the exporter traces
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **no_cache_kwargs(self.inner))[0]

    out_name = _output_name(model)
    trace = _token_batch(tok, ["a short text", "a longer text for the export, with more tokens in it"])
    check = _token_batch(tok, ["another check", "three", "and a third one, the longest of the three sentences"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with atomic_dir(Path(output), overwrite=overwrite) as tmp:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(Graph(model), (trace["input_ids"], trace["attention_mask"]), str(tmp / "model.onnx"),
                              input_names=["input_ids", "attention_mask"], output_names=[out_name],
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                              dynamo=True, opset_version=opset, verbose=False)
            want = Graph(model)(check["input_ids"], check["attention_mask"]).float().numpy()
        got = onnx_session(tmp / "model.onnx").run(None, {k: v.numpy() for k, v in check.items()})[0]
        diff = float(abs(got - want).max())
        scale = float(abs(want).max()) or 1.0
        if got.shape != want.shape or diff > ONNX_TOLERANCE * scale:
            raise RuntimeError(f"the ONNX graph of {model_spec!r} differs from PyTorch by {diff:.3g} "
                               f"(shapes {got.shape} / {want.shape}); not saved")
        tok.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        record = {"model": model_spec, "output": out_name, "opset": opset, "max_abs_diff": diff,
                  "relative_diff": diff / scale, "check_batch": list(want.shape[:2]), "versions": versions()}
        write_json_atomic(tmp / "fusionprune_onnx.json", record)
    return record


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines, its registry notes and its warnings about axis names say
    nothing about the user's model: keep them off the terminal (a failure still raises)."""
    import io
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` (``threads``: intra-op threads, None for its default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _output_name(model) -> str:
    from fusion_prune.logits import is_causal_lm

    if is_causal_lm(model) or type(model).__name__.endswith("ForSequenceClassification"):
        return "logits"
    return "last_hidden_state"


def _token_batch(tok, texts: list[str]) -> dict:
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
