"""Remove whole transformer layers so that the result is a standard Hugging Face model.

One row of :data:`ARCHITECTURES` per family says where the layer list lives (relative to
``model.base_model``) and which per-layer config lists exist. :func:`drop_layers` then does the
same four things for every family:

1. removes the layers from the ``nn.ModuleList``;
2. sets ``config.num_hidden_layers`` (``n_layer`` / ``n_layers`` through ``attribute_map``) and
   slices every per-layer config list (``layer_types``), so that ``from_pretrained`` rebuilds
   exactly the pruned shape;
3. renumbers every ``layer_idx`` attribute inside the kept layers: decoder attention indexes the
   KV cache with it, and a stale index would read another layer's keys;
4. records the original indices of the kept layers in ``config.fusionprune_kept_layers``,
   composed with any earlier record, so a model pruned twice still knows where its layers came
   from.

Adding a family is one :func:`register_architecture` call.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
from torch import nn

from fusion_prune.errors import BadInputError

KEPT_ATTR = "fusionprune_kept_layers"


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its layers, and what else changes with the depth."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path from ``model.base_model`` to the nn.ModuleList
    kind: Literal["encoder", "decoder"]
    per_layer_config: tuple[str, ...] = ()  # config lists with one entry per layer


ARCHITECTURES: dict[str, Architecture] = {}
#: model types refused on purpose, with the reason.
REFUSED = {"albert": "ALBERT shares one set of weights across all its layers, so no layer can be removed alone"}


def register_architecture(arch: Architecture) -> Architecture:
    for mt in arch.model_types:
        if mt in ARCHITECTURES:
            raise ValueError(f"model_type {mt!r} is registered twice")
        ARCHITECTURES[mt] = arch
    return arch


for _row in (
    Architecture("BERT", ("bert",), "encoder.layer", "encoder"),
    Architecture("RoBERTa", ("roberta",), "encoder.layer", "encoder"),
    Architecture("MPNet", ("mpnet",), "encoder.layer", "encoder"),
    Architecture("DistilBERT", ("distilbert",), "transformer.layer", "encoder"),
    Architecture("ELECTRA", ("electra",), "encoder.layer", "encoder"),
    Architecture("DeBERTa-v2", ("deberta-v2",), "encoder.layer", "encoder"),
    Architecture("GPT-2", ("gpt2",), "h", "decoder"),
    Architecture("Llama", ("llama",), "layers", "decoder", ("layer_types",)),
    Architecture("Mistral", ("mistral",), "layers", "decoder", ("layer_types",)),
    Architecture("Qwen2", ("qwen2",), "layers", "decoder", ("layer_types",)),
):
    register_architecture(_row)


def supported_families() -> list[str]:
    return sorted({a.family for a in ARCHITECTURES.values()})


def architecture_of(model_or_config) -> Architecture:
    """The table row for a model (or config); a clear refusal for shared-layer or unknown types."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt in REFUSED:
        raise BadInputError(f"Cannot remove layers of model_type {mt!r}: {REFUSED[mt]}. "
                            f"Supported families: {', '.join(supported_families())}.")
    if mt not in ARCHITECTURES:
        raise BadInputError(f"The model_type {mt!r} is not supported for layer removal; expected one of the "
                            f"families {', '.join(supported_families())} (model_types {sorted(ARCHITECTURES)}).")
    return ARCHITECTURES[mt]


def _layers_parent(model: nn.Module, arch: Architecture) -> tuple[nn.Module, str]:
    """The module holding the layer list, and the list's attribute name on it."""
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = getattr(model, "base_model", model)
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    return parent, attr


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer layers of ``model`` (base model or model with a head)."""
    arch = architecture_of(model)
    parent, attr = _layers_parent(model, arch)
    mod = getattr(parent, attr)
    if not isinstance(mod, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.{arch.layers_path} is a {type(mod).__name__}, not an nn.ModuleList")
    return mod


def num_layers(model: nn.Module) -> int:
    return len(layer_list(model))


def kept_layers(model_or_config) -> list[int]:
    """Original indices of the layers a model still has (``range(n)`` if it was never pruned)."""
    config = getattr(model_or_config, "config", model_or_config)
    kept = getattr(config, KEPT_ATTR, None)
    return list(kept) if kept is not None else list(range(config.num_hidden_layers))


def parse_layers(text: str, param: str = "layers") -> list[int]:
    """Comma-separated layer indices ("3,7") as a list."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise BadInputError(f"The '{param}' option must be comma-separated layer indices such as 3,7. Got {text!r}.")


def check_layers(layers: Iterable[int], n: int, param: str = "layers") -> list[int]:
    """Validate layer indices to drop from an ``n``-layer model; returns them sorted."""
    layers = list(layers)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad:
        raise BadInputError(f"The {param!r} parameter must hold integer layer indices. Got {bad!r}.")
    layers = [int(x) for x in layers]
    if not layers:
        raise BadInputError(f"The {param!r} parameter must name at least one layer to drop. Got [].")
    out_of_range = [x for x in layers if not 0 <= x < n]
    if out_of_range:
        raise BadInputError(f"The {param!r} parameter must hold indices in [0, {n - 1}] for a {n}-layer model. "
                            f"Got {out_of_range}.")
    dupes = sorted({x for x in layers if layers.count(x) > 1})
    if dupes:
        raise BadInputError(f"The {param!r} parameter must not repeat a layer. Got {dupes} more than once.")
    if len(set(layers)) == n:
        raise BadInputError(f"The {param!r} parameter would remove all {n} layers; expected at least one to remain.")
    return sorted(layers)


@torch.no_grad()
def drop_layers_(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Remove ``layers`` (current indices) from ``model`` **in place** and return it."""
    arch = architecture_of(model)
    mlist = layer_list(model)
    n = len(mlist)
    drop = set(check_layers(layers, n))
    keep = [i for i in range(n) if i not in drop]
    config = model.config
    old_kept = kept_layers(config)
    if len(old_kept) != n:
        raise ValueError(f"config.{KEPT_ATTR} has {len(old_kept)} entries but the model has {n} layers")

    new_layers = nn.ModuleList([mlist[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    parent, attr = _layers_parent(model, arch)
    setattr(parent, attr, new_layers)

    # The base model shares the config object with the head model, so one update serves both.
    config.num_hidden_layers = len(keep)
    for name in arch.per_layer_config:
        values = getattr(config, name, None)
        if values is not None:
            if len(values) != n:
                raise ValueError(f"config.{name} has {len(values)} entries but the model has {n} layers")
            setattr(config, name, [values[i] for i in keep])
    setattr(config, KEPT_ATTR, [old_kept[i] for i in keep])
    # Flags some decoders derive from layer_types once, at construction.
    base = getattr(model, "base_model", model)
    if hasattr(base, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        base.has_sliding_layers = "sliding_attention" in config.layer_types
    return model


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def drop_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """A pruned copy of ``model`` without ``layers`` (current indices); ``model`` is not changed.

    The copy's config says its depth and ``fusionprune_kept_layers``; ``save_pretrained`` on it
    gives a folder that plain ``from_pretrained`` loads to the same outputs.
    """
    architecture_of(model)  # refuse unsupported models before copying anything
    check_layers(layers, num_layers(model))
    pruned = copy.deepcopy(model)
    # deepcopy carries the input's hooks over, still bound to the caller's closures (a probe on
    # the original would also fire for the copy); the copy is a new model and starts without them.
    for module in pruned.modules():
        for name in _HOOK_DICTS:
            getattr(module, name, {}).clear()
    return drop_layers_(pruned, layers)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def describe(model: nn.Module) -> dict:
    """Family, class, depth, width, parameters and kept-layer history of a model."""
    arch = architecture_of(model)
    cfg = model.config
    return {
        "family": arch.family,
        "kind": arch.kind,
        "class": type(model).__name__,
        "model_type": cfg.model_type,
        "layers": num_layers(model),
        "hidden_size": cfg.hidden_size,
        "parameters": count_parameters(model),
        "kept_layers": kept_layers(cfg),
        "pruned": getattr(cfg, KEPT_ATTR, None) is not None,
    }


@contextlib.contextmanager
def temporary_layers(model: nn.Module, modules: list[nn.Module], positions: list[int]) -> Iterator[nn.Module]:
    """Within the block, ``model``'s layer list is ``modules``; everything is put back after.

    ``positions[i]`` is the current index whose per-layer config entries (``layer_types``)
    ``modules[i]`` takes: some decoders pick each layer's attention mask by position from the
    config, so the config must describe the temporary list too. Run without a KV cache.
    """
    arch = architecture_of(model)
    if len(modules) != len(positions):
        raise ValueError(f"{len(modules)} modules but {len(positions)} positions")
    parent, attr = _layers_parent(model, arch)
    config = model.config
    saved = {name: getattr(config, name) for name in ("num_hidden_layers", *arch.per_layer_config)
             if getattr(config, name, None) is not None}
    original = getattr(parent, attr)
    # Writing _modules directly swaps the child without touching anything else: exactly reversible.
    parent._modules[attr] = nn.ModuleList(modules)
    try:
        config.num_hidden_layers = len(modules)
        for name in arch.per_layer_config:
            if name in saved:
                setattr(config, name, [saved[name][p] for p in positions])
        yield model
    finally:
        parent._modules[attr] = original
        for name, value in saved.items():
            setattr(config, name, value)


def plain_copy(model):
    """A GGUF-loaded model as a plain model of the same class: transformers refuses to save a model
    loaded from GGUF although its dequantised weights are ordinary float tensors, so build the
    class from a clean config and copy the weights."""
    from transformers import AutoConfig

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = type(model)(AutoConfig.for_model(**cfg))
    clean.load_state_dict(model.state_dict())
    return clean
