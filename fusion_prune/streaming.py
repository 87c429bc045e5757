"""Layers streamed from disk: choose and remove layers of a causal LM that does not fit in memory.

The model is built with its parameters on the meta device (accelerate's ``init_empty_weights``,
buffers such as rotary frequencies stay real); everything outside the layer list (embeddings,
final norm, head) is read into memory, and each layer's weights are read from the checkpoint's
safetensors files when that layer runs and dropped right after (SLEB's block streaming, with the
disk as the slow tier). Layers that fit in ``max_memory`` beside the rest are kept resident, in
order, as accelerate's ``device_map`` fills a device. Reads copy into fresh tensors, not through
a memory map, so the file's pages never count as the process's resident memory.

Every forward-only measurement runs unchanged on such a model, because the streaming lives in
hooks on the layer modules: the cached drop-one NLL (``oracle``, ``sleb``), perplexity, angular
distances, positional rules. The streamed model runs on the CPU (the disk-to-GPU path is the same
hooks with a device; not built yet). Gradient signals do not: a streamed
layer's weights are gone by the time its backward would need them, so strategies that need the
signals pass are refused. Cost: the cached drop-one pass re-reads the layers above each
candidate, ``L (L + 1) / 2`` layer reads per batch for the streamed layers.

:func:`fusion_prune.loop.compress_streamed` is the greedy loop over such a model;
:func:`save_streamed` writes the pruned model tensor by tensor, so no step ever holds more than
``max_memory`` of weights.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fusion_prune.errors import BadInputError
from fusion_prune.utils import human_bytes

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str | int, param: str = "max_memory") -> int:
    """Bytes in ``text``: ``"2GiB"``, ``"1.5GB"``, ``"800MiB"`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise BadInputError(f"The {param!r} parameter must be a size such as 2GiB, 1.5GB or 800MiB. Got {text!r}.")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BadInputError(f"The {param!r} parameter must be a positive size. Got {text!r}.")
    return value


# --------------------------------------------------------------------------- the checkpoint's tensors


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFiles:
    """The tensors of a model folder's ``*.safetensors`` files (one file or an index of shards),
    read one at a time with plain reads (nothing stays mapped)."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise BadInputError(f"The model {str(folder)!r} has no safetensors files; expected a folder of "
                                "*.safetensors weights to stream layers from (save it with save_pretrained).")
        self.entries: dict[str, _Entry] = {}
        for path in files:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if e["dtype"] not in _SAFETENSORS_DTYPES:
                    raise BadInputError(f"The tensor {name!r} of {str(path)!r} has dtype {e['dtype']}; expected one "
                                        f"of {sorted(_SAFETENSORS_DTYPES)} (full-precision or integer weights).")
                b, end = e["data_offsets"]
                self.entries[name] = _Entry(path, _SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + b,
                                            8 + n + end)
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def dtype_as_read(self, name: str, dtype: torch.dtype | None) -> torch.dtype:
        """The dtype :meth:`read` returns for ``name``: ``dtype`` for floating-point tensors, else as stored."""
        stored = self.entries[name].dtype
        return dtype if dtype is not None and stored.is_floating_point else stored

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` as stored (shape as in the file), cast to ``dtype`` when given."""
        e = self.entries[name]
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        with open(e.path, "rb", buffering=0) as f:
            f.seek(e.start)
            if f.readinto(buf.numpy()) != e.end - e.start:
                raise BadInputError(f"The file {str(e.path)!r} ends inside tensor {name!r}; expected a complete "
                                    "safetensors file (truncated download?).")
        self.bytes_read += e.end - e.start
        t = buf.view(e.dtype).reshape(e.shape)
        return t.to(self.dtype_as_read(name, dtype))


# --------------------------------------------------------------------------- the streamed model


def _to_meta(module: nn.Module) -> None:
    """Drop ``module``'s parameters (they become meta tensors of the same shape)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


@dataclass
class Streamer:
    """The hooks that read each streamed layer in before it runs and drop it after."""

    files: SafetensorsFiles
    prefix: str  # state-dict prefix of the layer list, e.g. "model.layers"
    dtype: torch.dtype
    keys: list[list[str]]  # each original layer's state-dict keys (relative to it; MoE layers differ)
    layer_bytes: list[int]  # bytes of each original layer in the run's dtype
    other_bytes: int  # bytes of everything outside the layer list
    resident: set[int] = field(default_factory=set)  # original indices kept in memory
    reads: int = 0  # layer reads from disk so far
    handles: list = field(default_factory=list)

    def layer_state(self, orig: int) -> dict[str, torch.Tensor]:
        return {k: self.files.read(f"{self.prefix}.{orig}.{k}", self.dtype) for k in self.keys[orig]}

    def load(self, layer: nn.Module, orig: int) -> None:
        layer.load_state_dict(self.layer_state(orig), strict=False, assign=True)
        self.reads += 1

    def attach(self, layers: nn.ModuleList) -> None:
        for orig, layer in enumerate(layers):
            if orig in self.resident:
                self.load(layer, orig)
                continue

            def pre(module, args, orig=orig):
                self.load(module, orig)

            def post(module, args, output):
                _to_meta(module)

            self.handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def resident_bytes(self) -> int:
        """Weights held at most at once: the non-layer weights, the resident layers and one streamed layer."""
        streamed = [b for i, b in enumerate(self.layer_bytes) if i not in self.resident]
        return self.other_bytes + sum(self.layer_bytes[i] for i in self.resident) + max(streamed, default=0)


def _layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, m in model.named_modules():
        if m is layers:
            return name
    raise ValueError("the layer list is not a submodule of the model")  # pragma: no cover


@contextlib.contextmanager
def streamed_causal_lm(spec: str | Path, dtype: str = "float32", max_memory: str | int | None = None
                       ) -> Iterator[tuple[nn.Module, object, Streamer]]:
    """``(model, tokenizer, streamer)`` of ``spec`` (a local folder or asset) with its layers streamed
    from disk, on the CPU. ``max_memory``: the weights to hold at once (the non-layer weights, the
    layers kept resident and one streamed layer); None keeps none resident beyond what is needed.
    A cap below the non-layer weights plus the largest layer is refused. The hooks are removed on exit.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from fusion_prune.models import load_config, load_tokenizer, resolve, resolve_dtype
    from fusion_prune.surgery import architecture_of, layer_list

    dt = resolve_dtype(dtype, "cpu")
    cap = parse_size(max_memory) if max_memory is not None else None
    src = resolve(spec)
    if src.gguf_file or not Path(src.location).is_dir():
        raise BadInputError(f"The model {str(spec)!r} is not a local folder of safetensors weights; expected a "
                            "folder or fetched asset to stream layers from (a hub id or GGUF file cannot be streamed).")
    config = load_config(spec)
    if getattr(config, "quantization_config", None):
        raise BadInputError(f"The model {str(spec)!r} is quantised; expected full-precision weights to stream.")
    architecture_of(config)
    files = SafetensorsFiles(src.location)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    layers = layer_list(model)
    prefix = _layer_prefix(model, layers)
    keys = [list(layer.state_dict().keys()) for layer in layers]
    layer_bytes = [sum(p.numel() for p in layer.parameters()) * dt.itemsize for layer in layers]
    missing = [f"{prefix}.{i}.{k}" for i in range(len(layers)) for k in keys[i] if f"{prefix}.{i}.{k}" not in files]
    other = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}
    tied = _tied_head_key(model)
    missing += [k for k in other if k not in files and k != tied]
    if missing:
        raise BadInputError(f"The checkpoint of {str(spec)!r} lacks {len(missing)} tensors the model needs, e.g. "
                            f"{missing[0]!r}; expected the model's own tensor names (families whose weights transformers "
                            "converts while loading, such as fused MoE experts, cannot be streamed yet).")
    state = {k: files.read(k, dt) for k in other if k in files}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    other_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    streamer = Streamer(files, prefix, dt, keys, layer_bytes, other_bytes)
    need = other_bytes + max(layer_bytes)
    if cap is not None and cap < need:
        raise BadInputError(f"The 'max_memory' parameter must hold the weights outside the layers "
                            f"({human_bytes(other_bytes)}) plus the largest layer ({human_bytes(max(layer_bytes))}), "
                            f"{human_bytes(need)} in all. Got {human_bytes(cap)}.")
    if cap is not None:  # fill in order with what fits beside one streamed layer
        room = cap - need
        for i, b in enumerate(layer_bytes):
            if b > room:
                break
            streamer.resident.add(i)
            room -= b
    streamer.attach(layers)
    tok = load_tokenizer(spec)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    try:
        yield model, tok, streamer
    finally:
        streamer.close()


def _tied_head_key(model: nn.Module) -> str | None:
    """The state-dict name of the head's weight when it is tied to the embeddings (checkpoints leave it
    out), else None."""
    out = model.get_output_embeddings()
    if out is None or not getattr(model.config, "tie_word_embeddings", False):
        return None
    return next(n for n, m in model.named_modules() if m is out) + ".weight"


# --------------------------------------------------------------------------- writing the pruned model


def save_streamed(model: nn.Module, streamer: Streamer, tok, folder: Path) -> None:
    """Write the pruned streamed ``model`` to ``folder`` as ``save_pretrained`` would (config,
    tokenizer, one ``model.safetensors``), reading each kept layer's tensors from the source one at a
    time; the folder loads with plain ``from_pretrained``."""
    from fusion_prune.surgery import kept_layers

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    # (name, source name or in-memory tensor): the non-layer weights once (tied ones by their first
    # name), then each kept layer under its new index.
    seen, plan, tied = set(), [], _tied_head_key(model)
    for name, t in model.state_dict().items():
        if name.startswith(streamer.prefix + ".") or t.data_ptr() in seen or name == tied:
            continue
        seen.add(t.data_ptr())
        plan.append((name, t))
    for new, orig in enumerate(kept_layers(model.config)):
        plan += [(f"{streamer.prefix}.{new}.{k}", f"{streamer.prefix}.{orig}.{k}") for k in streamer.keys[orig]]
    header, offset = {}, 0
    for name, src in plan:
        if isinstance(src, torch.Tensor):
            shape, dtype = tuple(src.shape), src.dtype
        else:
            shape, dtype = streamer.files.entries[src].shape, streamer.files.dtype_as_read(src, streamer.dtype)
        n = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, src in plan:
            t = src if isinstance(src, torch.Tensor) else streamer.files.read(src, streamer.dtype)
            f.write(t.detach().contiguous().view(torch.uint8).numpy().tobytes())


def summary_lines(report: dict, output: Path) -> list[str]:
    """The CLI's closing lines for a streamed run."""
    s = report["streaming"]
    first = report["info"].get("teacher_validation_perplexity")
    last = report["steps"][-1]["validation_perplexity"] if report["steps"] else first
    return [f"{report['teacher_layers']} -> {len(report['kept_layers'])} layers (streamed), removed original "
            f"{report['removed_layers']} by {report['strategy']}",
            f"validation perplexity {first:.4f} -> {last:.4f} (no healing)",
            f"weights held at most {human_bytes(s['weights_held_at_most_bytes'])}, {s['layer_reads']} layer reads "
            f"({human_bytes(s['bytes_read'])} read), {report['seconds']:.0f} s",
            *(f"peak {name}: {human_bytes(e['cpu_rss_bytes'])}" for name, e in report["peak_memory"].items()),
            f"saved to {output}"]
