"""Remove whole transformer layers so that the result is a standard Hugging Face model.

A decoder LLM needs no table row: its layers are found generically, as the one ``nn.ModuleList``
of ``num_hidden_layers`` blocks under ``model.base_model`` (:func:`find_layer_list`), and its
kind comes from transformers' causal-LM registry. :data:`ARCHITECTURES` keeps the exceptions
(encoders, and GPT-2's ``h``), and :data:`REFUSED` the families whose layers cannot be removed
exactly. :func:`drop_layers` then does the same four things for every family:

1. removes the layers from the ``nn.ModuleList``;
2. sets ``config.num_hidden_layers`` (``n_layer`` / ``n_layers`` through ``attribute_map``) and
   updates every per-layer piece of the config (:func:`update_per_layer_config`): lists with one
   entry per layer (``layer_types``, ``no_rope_layers``) are sliced, lists of layer *indices*
   (``mlp_only_layers``) remapped, and index rules (``decoder_sparse_step``,
   ``first_k_dense_replace``) rewritten so that ``from_pretrained`` rebuilds each kept layer as
   it was;
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
    layers_path: str | None  # dotted path from ``model.base_model`` to the nn.ModuleList (None: found)
    kind: Literal["encoder", "decoder"]
    per_layer_config: tuple[str, ...] = ()  # config lists with one entry per layer, beyond PER_LAYER_LISTS


ARCHITECTURES: dict[str, Architecture] = {}
#: model types refused on purpose, with the reason.
REFUSED = {"albert": "ALBERT shares one set of weights across all its layers, so no layer can be removed alone",
           "gemma3n": "Gemma 3n shares key-value caches across layers (num_kv_shared_layers), which cannot be remapped",
           "gemma3n_text": "Gemma 3n shares key-value caches across layers (num_kv_shared_layers), which cannot be "
                           "remapped"}
#: config lists with one entry per layer, sliced with the layers (any family)
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
#: config lists of layer indices, remapped to the kept layers' new indices (any family)
LAYER_INDEX_LISTS = ("mlp_only_layers",)


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
    Architecture("Llama", ("llama",), "layers", "decoder"),
    Architecture("Mistral", ("mistral",), "layers", "decoder"),
    Architecture("Qwen2", ("qwen2",), "layers", "decoder"),
):
    register_architecture(_row)


GENERIC = "any decoder whose layers sit in one list"


def supported_families() -> list[str]:
    """The families of the table, and the generic rule for every other decoder."""
    return sorted({a.family for a in ARCHITECTURES.values()})


def families() -> dict:
    """What layer removal supports: the table's families, the generic rule, and what is refused."""
    return {"table": {a.family: sorted(a.model_types) for a in ARCHITECTURES.values()},
            "generic": f"{GENERIC}: every other causal-LM model_type of transformers; the layers are the one "
                       "nn.ModuleList of num_hidden_layers blocks under the base model, per-layer config lists "
                       "are sliced, layer-index lists remapped, and every layer_idx renumbered",
            "refused": dict(REFUSED) | {"encoder-decoder": "two layer stacks (T5, BART): not supported yet"}}


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def architecture_of(model_or_config) -> Architecture:
    """The table row for a model (or config), the generic decoder row for a causal-LM family the table
    does not list, or a one-line refusal (shared layers, shared KV caches, encoder-decoder, unknown)."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    supported = f"supported: {', '.join(supported_families())} and {GENERIC}"
    if mt in REFUSED:
        raise BadInputError(f"Cannot remove layers of model_type {mt!r}: {REFUSED[mt]}. Expected a model whose "
                            f"layers are independent ({supported}).")
    if mt in ARCHITECTURES:
        return ARCHITECTURES[mt]
    if getattr(config, "is_encoder_decoder", False):
        raise BadInputError(f"The model_type {mt!r} is an encoder-decoder model, which layer removal does not "
                            f"support yet; expected a decoder or an encoder ({supported}).")
    if getattr(config, "num_kv_shared_layers", 0):
        raise BadInputError(f"Cannot remove layers of model_type {mt!r}: it shares key-value caches across layers "
                            f"(num_kv_shared_layers), which cannot be remapped. Expected independent layers.")
    if mt in _causal_lm_types():
        return Architecture(mt, (mt,), None, "decoder")
    raise BadInputError(f"The model_type {mt!r} is not supported for layer removal; expected one of the families "
                        f"{', '.join(supported_families())} (model_types {sorted(ARCHITECTURES)}) or a causal LM.")


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the one ``nn.ModuleList`` of ``num_hidden_layers`` blocks under the base
    model, the shallowest if lists are nested; refused when two lists qualify at that depth."""
    base = getattr(model, "base_model", model)
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and n > 0 and len({type(x) for x in m}) == 1]
    if not found:
        raise BadInputError(f"{type(model).__name__} has no list of {n} layers (config.num_hidden_layers) under its "
                            "base model; expected a decoder whose layers sit in one nn.ModuleList.")
    depth = min(name.count(".") for name, _ in found)
    top = [name for name, _ in found if name.count(".") == depth]
    if len(top) > 1:
        raise BadInputError(f"{type(model).__name__} has several lists of {n} layers ({top}); expected one layer list "
                            "(a model with parallel stacks cannot have layers removed exactly).")
    parent_path, _, attr = top[0].rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    return parent, attr


def _layers_parent(model: nn.Module, arch: Architecture) -> tuple[nn.Module, str]:
    """The module holding the layer list, and the list's attribute name on it."""
    if arch.layers_path is None:
        return find_layer_list(model)
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = getattr(model, "base_model", model)
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    return parent, attr


def update_per_layer_config(config, keep: list[int], n: int, extra_lists: tuple[str, ...] = ()) -> None:
    """Update every per-layer piece of ``config`` for keeping layers ``keep`` (current indices) of ``n``.

    Lists with one entry per layer are sliced; lists of layer indices are remapped; index rules are
    written out so that each kept layer is rebuilt as it was: ``decoder_sparse_step`` (Qwen-MoE: layer
    l is sparse when (l + 1) % step == 0) becomes step 1 with the dense layers in ``mlp_only_layers``,
    and ``first_k_dense_replace`` (DeepSeek-style: the first k layers dense) counts the kept dense ones.
    """
    new_index = {old: new for new, old in enumerate(keep)}
    sparse_step = getattr(config, "decoder_sparse_step", None)
    if isinstance(sparse_step, int) and sparse_step > 0 and getattr(config, "num_experts", 0):
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        dense_kept = [new_index[i] for i in keep if i in dense or (i + 1) % sparse_step != 0]
        config.decoder_sparse_step = 1
        config.mlp_only_layers = dense_kept
    else:
        for name in LAYER_INDEX_LISTS:
            values = getattr(config, name, None)
            if values:
                setattr(config, name, [new_index[i] for i in values if i in new_index])
    k = getattr(config, "first_k_dense_replace", None)
    if isinstance(k, int):
        config.first_k_dense_replace = sum(1 for i in keep if i < k)
    for name in (*PER_LAYER_LISTS, *extra_lists):
        values = getattr(config, name, None)
        if values is not None:
            if len(values) != n:
                raise ValueError(f"config.{name} has {len(values)} entries but the model has {n} layers")
            setattr(config, name, [values[i] for i in keep])


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
    parent, attr = _layers_parent(model, arch)  # found before the config changes
    mlist = getattr(parent, attr)
    n = len(mlist)
    drop = set(check_layers(layers, n))
    keep = [i for i in range(n) if i not in drop]
    config = model.config
    old_kept = kept_layers(config)
    if len(old_kept) != n:
        raise ValueError(f"config.{KEPT_ATTR} has {len(old_kept)} entries but the model has {n} layers")

    new_layers = nn.ModuleList([mlist[i] for i in keep])
    _renumber(new_layers)
    setattr(parent, attr, new_layers)

    # The base model shares the config object with the head model, so one update serves both.
    config.num_hidden_layers = len(keep)
    update_per_layer_config(config, keep, n, arch.per_layer_config)
    setattr(config, KEPT_ATTR, [old_kept[i] for i in keep])
    _derived_flags(model)
    return model


def _renumber(layers: nn.ModuleList) -> None:
    """Set every ``layer_idx`` inside ``layers`` to its layer's position (the KV cache's index)."""
    for new_idx, layer in enumerate(layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx


def _derived_flags(model: nn.Module) -> None:
    """Flags some decoders derive from ``layer_types`` once, at construction."""
    config, base = model.config, getattr(model, "base_model", model)
    if hasattr(base, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        base.has_sliding_layers = "sliding_attention" in config.layer_types


@torch.no_grad()
def insert_layer_(model: nn.Module, layer: nn.Module, orig: int, source_config) -> int:
    """Put ``layer``, a block of original index ``orig`` taken from the model ``source_config``
    describes (the teacher), back into ``model`` **in place**, where ``orig`` falls among the kept
    layers; returns its position. The inverse of removing it: depth, per-layer config (rebuilt
    from the source's, :func:`update_per_layer_config`), ``layer_idx`` numbering and the kept-layer
    record all say the model has it again."""
    arch = architecture_of(model)
    parent, attr = _layers_parent(model, arch)
    config = model.config
    kept, source_kept = kept_layers(config), kept_layers(source_config)
    if orig in kept or orig not in source_kept:
        raise ValueError(f"layer {orig} must be missing from the model ({kept}) and present in the source ({source_kept})")
    missing = [o for o in kept if o not in source_kept]
    if missing:
        raise ValueError(f"the source lacks layers {missing} of the model: its config cannot describe them")
    new_kept = sorted([*kept, orig])
    rebuilt = copy.deepcopy(source_config)  # a config is small; the per-layer pieces come from it
    update_per_layer_config(rebuilt, [source_kept.index(o) for o in new_kept], len(source_kept), arch.per_layer_config)
    for name in (*PER_LAYER_LISTS, *arch.per_layer_config, *LAYER_INDEX_LISTS, "decoder_sparse_step",
                 "first_k_dense_replace"):
        if getattr(rebuilt, name, None) is not None:
            setattr(config, name, getattr(rebuilt, name))
    pos = new_kept.index(orig)
    modules = list(getattr(parent, attr))
    modules.insert(pos, layer)
    new_layers = nn.ModuleList(modules)
    _renumber(new_layers)
    setattr(parent, attr, new_layers)
    config.num_hidden_layers = len(new_layers)
    setattr(config, KEPT_ATTR, new_kept)
    _derived_flags(model)
    return pos


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


def train_only_the_top(model: nn.Module, k: int, option: str) -> None:
    """Freeze every parameter but those of the last ``k`` layers, of the modules after the layer list
    (a causal LM's final norm and head, a classifier's pooler and head) and of the output embedding
    (a head tied to the input embedding trains it too); the modules before the layers (the
    embeddings, with BERT's position embeddings and norm) stay frozen: partial fine-tuning,
    as "Reassessing Layer Pruning" heals. Undo with ``requires_grad_(True)``. ``option`` names the parameter in the error for a ``k`` outside
    [1, depth]."""
    layers = layer_list(model)
    if not 1 <= k <= len(layers):
        raise BadInputError(f"The {option!r} option must be between 1 and the student's depth {len(layers)}. Got {k}.")
    in_layers = {id(p) for p in layers.parameters()}
    out = model.get_output_embeddings()
    head = {id(p) for p in out.parameters()} if out is not None else set()
    top = {id(p) for p in layers[len(layers) - k:].parameters()}
    seen_layers = False  # parameters come in registration order: the input side, the layers, the output side
    for p in model.parameters():
        seen_layers = seen_layers or id(p) in in_layers
        p.requires_grad_(id(p) in top or id(p) in head or (seen_layers and id(p) not in in_layers))


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
    lists = (*PER_LAYER_LISTS, *arch.per_layer_config)
    saved = {name: getattr(config, name) for name in ("num_hidden_layers", *lists)
             if getattr(config, name, None) is not None}
    original = getattr(parent, attr)
    # Writing _modules directly swaps the child without touching anything else: exactly reversible.
    parent._modules[attr] = nn.ModuleList(modules)
    try:
        config.num_hidden_layers = len(modules)
        for name in lists:
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


@contextlib.contextmanager
def checkpointed_layers(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, each layer's forward is activation-checkpointed: under autograd only its
    inputs are kept and its inside is recomputed in the backward pass (one layer's activations at
    a time instead of every layer's). Works in eval mode and for every family; hooks on the layer
    itself run once, hooks on its submodules run again in the recomputation. Put back after."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    try:
        for layer in layers:
            forward = layer.forward

            def run(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            layer.forward = run  # an instance attribute: shadows the class's forward, nothing else
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward
