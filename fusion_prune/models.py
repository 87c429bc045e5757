"""Load a model and its tokenizer from an asset name, a local folder, a GGUF file or a hub id.

Local sources never touch the network (``local_files_only=True``) and ``trust_remote_code`` is
always off: a model folder is data, not code.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_prune import assets
from fusion_prune.errors import BadInputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local folder (maybe with a GGUF file in it) or a hub id."""

    spec: str
    location: str
    local: bool
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        kw: dict = {"trust_remote_code": False}
        if self.local:
            kw["local_files_only"] = True
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def resolve(spec: str | Path) -> ModelSource:
    """Resolve ``spec`` without loading anything; fetches an asset on first use."""
    spec = str(spec)
    if spec in assets.ASSETS:
        asset = assets.ASSETS[spec]
        if asset.kind != "model":
            raise BadInputError(f"The 'model' parameter names the {asset.kind} asset {spec!r}; expected a model.")
        return ModelSource(spec, str(assets.fetch(spec)), local=True)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, str(path.parent), local=True, gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, str(path), local=True)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, str(path), local=True, gguf_file=ggufs[0].name)
        raise BadInputError(
            f"The model folder {spec!r} has no config.json (nor a single .gguf file); "
            "expected a save_pretrained folder."
        )
    if spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") > 1:
        raise BadInputError(f"The model path {spec!r} does not exist; expected a folder, an asset name or a hub id."
                            + _closest_asset(spec))
    if not _in_hub_cache(spec) and not hub_reachable():
        # Without this, transformers retries the hub for about 30 s and ends with a connection error
        # that never says the name matched nothing here.
        models = ", ".join(sorted(n for n, a in assets.ASSETS.items() if a.kind == "model"))
        raise BadInputError(f"The 'model' parameter {spec!r} is neither an asset nor an existing folder, and the "
                            f"model hub cannot be reached to look it up.{_closest_asset(spec)} Model assets: "
                            f"{models}.")
    return ModelSource(spec, spec, local=False)


def _closest_asset(spec: str) -> str:
    import difflib

    names = [n for n, a in assets.ASSETS.items() if a.kind == "model"]
    close = difflib.get_close_matches(Path(spec).name, names, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _in_hub_cache(spec: str) -> bool:
    """Whether the hub id ``spec`` was downloaded before (transformers then loads it offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub would reject is simply not cached
        return False


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub can be reached: never with ``HF_HUB_OFFLINE`` set, else one TCP
    connection to its endpoint within ``timeout`` seconds (asked once per process)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load-time chatter (newly initialised heads are reported by us) and its
    progress bars (a "Writing model shards" bar per checkpoint says nothing a user needs)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_error(spec: str, e: Exception) -> BadInputError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BadInputError(f"Could not load the model {spec!r}: {first}")


def load_config(spec: str | Path):
    """The transformers config of ``spec``."""
    from transformers import AutoConfig

    src = resolve(spec)
    try:
        return AutoConfig.from_pretrained(src.location, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(str(spec), e) from e


def load_tokenizer(spec: str | Path):
    """The tokenizer of ``spec``, with a pad token (decoders reuse their EOS token for padding)."""
    from transformers import AutoTokenizer

    src = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src.location, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(str(spec), e) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise BadInputError(f"The tokenizer of {str(spec)!r} has neither a pad nor an EOS token; expected one of them.")
        tok.pad_token = tok.eos_token
    return tok


def head_labels(config) -> list[str] | None:
    """Class names of a trained sequence-classification head, or ``None`` if there is none."""
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in range(len(id2label))]


def default_device() -> torch.device:
    """This process's GPU when there is one (``cuda:$LOCAL_RANK`` under ``accelerate launch``), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


#: ``--dtype`` choices; "auto": bfloat16 on a GPU that supports it, else float32
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, device: str | None = "auto", auto_on_cuda: str = "bfloat16") -> "torch.dtype":
    """The torch dtype ``name`` means on ``device`` (as in :func:`load_classifier`).

    "auto" is ``auto_on_cuda`` on a CUDA device that supports it and float32 elsewhere (the CPU
    computes bfloat16, but a user on the CPU gets float32 unless asked). A dtype the device cannot
    run is refused with one line.
    """
    import torch

    from fusion_prune.errors import bad_choice

    if name not in DTYPES:
        raise bad_choice("dtype", name, DTYPES)
    target = default_device() if device in ("auto", None) else torch.device(device)
    cuda = target.type == "cuda"
    if name == "auto":
        name = auto_on_cuda if cuda else "float32"
        if name == "bfloat16" and not torch.cuda.is_bf16_supported():
            name = "float32"
    if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise BadInputError(f"The '--dtype' option bfloat16 is not supported by {torch.cuda.get_device_name(target)}; "
                            "expected float16 or float32 on this GPU.")
    return getattr(torch, name)


def check_finite(model, spec: str | Path) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such parameter and its layer.

    Such a model gives NaN signals, losses and accuracies far downstream; one line here is clearer.
    """
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            m = re.search(r"\.(?:layers?|h|block)\.(\d+)\.", f".{name}")
            where = f"layer {m.group(1)} ({name})" if m else name
            raise BadInputError(f"The model {str(spec)!r} has non-finite weights (NaN or inf) in {where}; "
                                "expected finite weights: re-save or re-train it.")


def _place(model, device: str | None, spec: str | Path = "model"):
    # Loaded models go where accelerate will train them, so that evaluation, signals and labels
    # (which run on the model's own device) use the GPU too, not only the training loops.
    check_finite(model, spec)
    if device is None:
        return model
    return model.to(default_device() if device == "auto" else device)


def load_classifier(spec: str | Path, labels: list[str] | None = None, device: str | None = "auto",
                    seed: int = 0, dtype: str = "float32", auto_on_cuda: str = "float32"):
    """Load ``spec`` as a sequence classifier for class names ``labels``.

    Returns ``(model, tokenizer, head_trained)``. ``head_trained`` is True when ``spec`` already
    has a classification head for exactly these labels; otherwise a new head is initialised
    (with ``labels=None`` an existing head is kept as it is) from ``seed``, so that two runs start
    from the same head; the caller's random state is left as it was. ``device``: "auto" (this
    process's GPU, else the CPU), a torch device string, or None to leave the model on the CPU.
    ``dtype``: one of :data:`DTYPES` (:func:`resolve_dtype`), for the weights as loaded and saved;
    "auto" is float32 for a classifier (it is trained, in mixed precision on a GPU), unless
    ``auto_on_cuda`` says otherwise.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    src = resolve(spec)
    config = load_config(spec)
    tokenizer = load_tokenizer(spec)
    existing = head_labels(config)
    kw = src.kwargs()
    head_trained = existing is not None and (labels is None or existing == list(labels))
    if not head_trained:
        if labels is None:
            raise BadInputError(f"The model {str(spec)!r} has no classification head; expected labels to build one.")
        kw.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=existing is not None,
        )
    try:
        # Without a seed here the new head would come from torch's start-up state, which differs
        # between processes in this torch build: the same command gave different teachers.
        with quiet_transformers(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(src.location, dtype=resolve_dtype(
                dtype, device, auto_on_cuda), **kw)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e)
        if "Unrecognized configuration class" in msg or "does not support" in msg:
            raise BadInputError(
                f"The model {str(spec)!r} (model_type {getattr(config, 'model_type', '?')!r}) has no "
                "sequence-classification class in transformers; expected an encoder or decoder family."
            ) from e
        raise _load_error(str(spec), e) from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not head_trained:
        logging.getLogger("fusionprune").info("initialised a new %d-class head on %s", len(labels or []), spec)
    return _place(model, device, spec), tokenizer, head_trained


def load_base(spec: str | Path, device: str | None = "auto"):
    """Load ``spec`` with ``AutoModel`` (no head): ``(model, tokenizer)``; ``device`` as in :func:`load_classifier`."""
    from transformers import AutoModel

    src = resolve(spec)
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(src.location, dtype="float32", **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(str(spec), e) from e
    return _place(model, device, spec), load_tokenizer(spec)


def load_native(spec: str | Path, device: str | None = "auto"):
    """Load ``spec`` as the class its config names (``architectures[0]``), else ``AutoModel``.

    Returns ``(model, tokenizer_or_None)``: a folder without tokenizer files is still a model.
    ``device`` as in :func:`load_classifier`.
    """
    import transformers

    src = resolve(spec)
    config = load_config(spec)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModel
    try:
        with quiet_transformers():
            model = cls.from_pretrained(src.location, dtype="float32", **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(str(spec), e) from e
    try:
        tok = load_tokenizer(spec)
    except BadInputError:
        tok = None
    return _place(model, device, spec), tok


@contextlib.contextmanager
def attention_implementation(model, impl: str):
    """Run a block with ``model`` switched to attention ``impl`` (e.g. ``"eager"``), then restore it.

    Eager attention is what exposes attention probabilities and what FLOP counters can see (on
    CPU, SDPA runs as one opaque kernel).
    """
    before = model.config._attn_implementation
    if before == impl:
        yield model
        return
    model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def position_limit(model) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no fixed limit)."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def resolve_max_length(model, max_length: int | None, default: int, param: str = "max_length") -> int:
    """An explicit ``max_length`` checked against the model's limit, or ``default`` shortened to it."""
    if max_length is None:
        limit = position_limit(model)
        return default if limit is None else min(default, limit)
    check_max_length(model, max_length, param)
    return max_length


def check_max_length(model, max_length: int, param: str = "max_length") -> None:
    """Refuse a sequence length beyond the model's position embeddings."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise BadInputError(f"The {param!r} parameter must be at most the model's position limit {limit}. "
                            f"Got {max_length}.")


def load_causal_lm(spec: str | Path, device: str | None = "auto", dtype: str = "float32"):
    """Load ``spec`` as a causal LM: ``(model, tokenizer)``.

    A GGUF source is dequantised and rebuilt as a plain model (so the result can be saved); a
    model quantised by bitsandbytes/GPTQ/AWQ is refused: its pruned weights could not be saved as
    a plain folder.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_prune.surgery import architecture_of

    dt = resolve_dtype(dtype, device)  # a bad dtype fails before anything is read
    src = resolve(spec)
    config = load_config(spec)
    if getattr(config, "quantization_config", None) and not src.gguf_file:
        method = (config.quantization_config or {}).get("quant_method", "?") \
            if isinstance(config.quantization_config, dict) else "?"
        raise BadInputError(f"The model {str(spec)!r} is quantised ({method}); expected full-precision weights "
                            "(a quantised model cannot be saved as a plain pruned folder).")
    architecture_of(config)  # unsupported families fail before the weights are read
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                src.location, dtype=torch.float32 if src.gguf_file else dt, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        msg = str(e)
        if "Unrecognized configuration class" in msg:
            raise BadInputError(f"The model {str(spec)!r} (model_type {getattr(config, 'model_type', '?')!r}) has no "
                                "causal-LM class in transformers; expected a decoder.") from e
        raise _load_error(str(spec), e) from e
    if src.gguf_file:
        from fusion_prune.surgery import plain_copy

        model = plain_copy(model).to(dt)  # dequantised in float32, then cast
    tok = load_tokenizer(spec)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return _place(model, device, spec), tok


def no_cache_kwargs(model) -> dict:
    """``{"use_cache": False}`` for a model that would otherwise build a KV cache in a scoring pass
    (decoders; some take the flag only through ``**kwargs``), else ``{}``."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    if "use_cache" in params:
        return {"use_cache": False}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes_kwargs and getattr(getattr(model, "config", None), "use_cache", None) \
        is not None else {}


def save_model(model, tok, folder: str | os.PathLike) -> None:
    """``save_pretrained`` of ``model`` (and ``tok`` when given) into ``folder``, without transformers'
    progress bars."""
    with quiet_transformers():
        model.save_pretrained(folder)
        if tok is not None:
            tok.save_pretrained(folder)
