"""The one place that registers hooks: a shared pass that serves every signal.

:func:`capture` runs one forward and one backward of the task loss per calibration batch and
accumulates streaming, per-layer statistics into a :class:`SignalContext`:

* ``outputs``: sums over real tokens of the layer output's activations, token L2 norms and
  per-example energies (token-level statistics use the attention mask);
* ``inputs``: the angular distance between each layer's input and output token vectors;
* ``pooled``: mean-pooled layer outputs (a capped buffer, for mutual information), gold labels
  and the model's own predictions. For a causal LM (``token_stride``) an "example" is one predicting
  position instead: every ``token_stride``-th token's hidden state, its gold next token and the
  model's predicted next token;
* ``attentions``: entropy of the attention rows (eager attention for this pass only);
* ``grads``: the gradient of the mean calibration loss per layer parameter, and the per-batch
  squared gradient norm (for the empirical Fisher).

Nothing grows with the number of batches except the pooled buffer, capped at ``mi_cap`` rows.
Every hook is removed in ``finally``; the model's train/eval mode, attention implementation,
``requires_grad`` flags and ``.grad`` tensors are restored, also when a signal or the pass raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from fusion_prune.logits import forward_hidden, is_causal_lm, next_token_sums
from fusion_prune.models import attention_implementation, no_cache_kwargs
from fusion_prune.surgery import checkpointed_layers, kept_layers, layer_list

NEEDS = frozenset({"outputs", "inputs", "pooled", "attentions", "grads", "weights", "passes"})


@dataclass
class SignalContext:
    """Per-layer statistics of one pass over the calibration batches; arrays are (n_layers,)."""

    model: nn.Module
    layers: nn.ModuleList
    batches: list[dict[str, torch.Tensor]]
    n_layers: int
    orig_layers: list[int]
    examples: int = 0
    # outputs
    act_sum: np.ndarray = None
    act_elems: np.ndarray = None
    norm_sum: np.ndarray = None
    tokens: np.ndarray = None
    energy_sum: np.ndarray = None
    # inputs
    angular_sum: np.ndarray = None
    influence_sum: np.ndarray = None  # sum over real tokens of 1 - cos(h_in, h_out) (ShortGPT)
    # attentions
    attn_entropy_sum: np.ndarray = None
    attn_rows: np.ndarray = None
    # pooled
    pooled: list[list[np.ndarray]] = field(default_factory=list)
    gold: list[np.ndarray] = field(default_factory=list)  # each example's target: its class or next token
    predictions: list[np.ndarray] = field(default_factory=list)
    # grads
    grad_sq_sum: np.ndarray = None
    mean_grad_sq: np.ndarray = None  # ||gradient of the mean loss||^2 over the layer's parameters
    taylor_sum: np.ndarray = None  # sum over the layer's parameters of |theta * gradient of the mean loss|
    #: False: one pooled example per sequence, labelled by its class; True: one per predicting token
    #: position, labelled by the next token (set by ``token_stride``)
    token_examples: bool = False

    def __post_init__(self) -> None:
        for name in ("act_sum", "act_elems", "norm_sum", "tokens", "energy_sum", "angular_sum", "influence_sum",
                     "attn_entropy_sum", "attn_rows", "grad_sq_sum", "mean_grad_sq", "taylor_sum"):
            setattr(self, name, np.zeros(self.n_layers, dtype=np.float64))
        self.pooled = [[] for _ in range(self.n_layers)]

    def layer_weights(self, layer: int) -> list[torch.Tensor]:
        """The weight matrices (ndim >= 2) of one layer; biases and norm gains are left out."""
        return [p.detach() for p in self.layers[layer].parameters() if p.ndim >= 2]

    def pooled_array(self, layer: int) -> np.ndarray:
        """Mean-pooled outputs of ``layer``, (N, hidden), N <= mi_cap."""
        return np.concatenate(self.pooled[layer]) if self.pooled[layer] else np.zeros((0, 0))

    def target_array(self, which: str) -> np.ndarray:
        """The pooled examples' gold targets (``which="gold"``) or the full model's predictions."""
        arr = self.gold if which == "gold" else self.predictions
        return np.concatenate(arr) if arr else np.zeros(0, dtype=np.int64)


def _hidden(x) -> torch.Tensor:
    """The hidden states of a layer's input/output, which may be a tensor or a tuple."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return _hidden(args[0])
    for key in ("hidden_states", "hidden_state", "x"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError("could not find the layer's input hidden states")


@contextlib.contextmanager
def restored_state(model: nn.Module) -> Iterator[None]:
    """Restore mode, requires_grad and .grad of every parameter, whatever happens inside."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, flag, g in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = g
        model.train(was_training)


def attention_modules(model: nn.Module, layers: nn.ModuleList) -> list[tuple[nn.Module, int]] | None:
    """Per layer, the self-attention module whose output[index] is the attention probabilities.

    transformers 5 declares it in ``_can_record_outputs``; asking the model for
    ``output_attentions`` instead would install transformers' own capturing hooks on the model for
    good. Families without the declaration (MPNet, DeBERTa-v2) return ``None``: for them
    ``output_attentions=True`` is used, which installs nothing.
    """
    spec = (getattr(getattr(model, "base_model", model), "_can_record_outputs", None) or {}).get("attentions")
    if spec is None:
        return None
    target = getattr(spec, "target_class", spec)
    index = getattr(spec, "index", 1)
    suffix = getattr(spec, "layer_name", None)
    found = []
    for layer in layers:
        mods = [m for name, m in layer.named_modules() if isinstance(m, target)
                and (suffix is None or ("." + name).endswith(suffix))]
        if len(mods) != 1:
            return None
        found.append((mods[0], index))
    return found


def lm_positions(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Predicting positions of a causal-LM batch for the pooled statistics: (P,) indices
    ``stride - 1, 2 stride - 1, ...`` below the shortest real length minus one, so that every
    chosen position has a real next token in every row."""
    shortest = int(mask.sum(1).min())
    return torch.arange(stride - 1, max(shortest - 1, 0), stride, device=mask.device)


@dataclass
class BatchLoss:
    """The task loss of one batch: ``loss_sum`` (a scalar, differentiable) over ``count``
    examples (classifier) or predicted tokens (causal LM); ``pred`` (B,): each sequence's predicted
    class, or for a causal LM the next token after its last real token; ``position_pred`` (B * P,):
    the causal LM's predicted next tokens at the pooled ``positions`` (else None); ``out``: the
    model's output (for a causal LM its ``logits`` hold the last position only)."""

    loss_sum: torch.Tensor
    count: int
    pred: torch.Tensor
    position_pred: torch.Tensor | None
    out: object


def task_loss(model: nn.Module, inputs: dict, batch: dict[str, torch.Tensor], positions: torch.Tensor | None = None,
              **kwargs) -> BatchLoss:
    """Run ``model`` on ``inputs`` and return its summed task loss (:class:`BatchLoss`).

    A classifier's loss is cross-entropy with ``batch["labels"]`` over its (B, C) logits. A causal
    LM's is the next-token NLL over real tokens, computed a chunk of positions at a time
    (:mod:`fusion_prune.logits`), so no (B, T, V) logits are held.
    """
    if not is_causal_lm(model):
        out = model(**inputs, **no_cache_kwargs(model), **kwargs)
        logits = out.logits  # (B, C)
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return BatchLoss(loss, len(logits), logits.argmax(-1), None, out)
    states, head, out = forward_hidden(model, inputs, **kwargs)
    loss, _, count = next_token_sums(states, head, batch)
    with torch.no_grad():
        mask = batch["attention_mask"]
        rows = torch.arange(len(mask), device=mask.device)
        pred = head(states[rows, mask.sum(1) - 1].detach()).argmax(-1)
        position_pred = None if positions is None else head(states[:, positions].detach()).argmax(-1).reshape(-1)
    return BatchLoss(loss, count, pred, position_pred, out)


def capture(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], needs: Iterable[str],
            mi_cap: int = 2048, progress: Callable | None = None, token_stride: int | None = None,
            checkpoint_layers: bool = False) -> SignalContext:
    """Run the shared pass over ``batches`` and return the accumulated :class:`SignalContext`.

    Each batch holds ``input_ids`` and ``attention_mask`` (B, T) and ``labels`` (B,), already on
    the model's device. ``needs`` selects what is recorded; "weights" and "passes" need no pass.
    ``token_stride``: the examples are token positions, not sequences (a causal LM): the pooled
    examples are the hidden states at every ``token_stride``-th position (:func:`lm_positions`),
    labelled by the next token there. ``checkpoint_layers``: recompute each layer's inside in the
    backward pass instead of keeping it (:func:`fusion_prune.surgery.checkpointed_layers`): more
    compute, one layer's activations held.
    """
    needs = set(needs)
    unknown = needs - NEEDS
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; expected a subset of {sorted(NEEDS)}")
    batches = list(batches)
    layers = layer_list(model)
    n = len(layers)
    ctx = SignalContext(model, layers, batches, n, kept_layers(model.config),
                        token_examples=bool(token_stride))
    data_needs = needs & {"outputs", "inputs", "pooled", "attentions", "grads"}
    if not data_needs:
        return ctx
    mask_now: dict[str, torch.Tensor] = {}
    pooled_count = [0] * n

    def layer_hook(idx: int):
        def hook(module, args, kwargs, output):
            if mask_now.get("replay"):
                return
            with torch.no_grad():
                h_out = _hidden(output).detach().float()
                m = mask_now["mask"].to(h_out.dtype)  # (B, T)
                m3 = m.unsqueeze(-1)
                ntok = m.sum(1).clamp_min(1)  # (B,)
                if "outputs" in needs:
                    ctx.act_sum[idx] += float((h_out * m3).sum())
                    ctx.act_elems[idx] += float(m.sum()) * h_out.shape[-1]
                    sq = (h_out * h_out).sum(-1)  # (B, T) squared token norms
                    ctx.norm_sum[idx] += float((sq.sqrt() * m).sum())
                    ctx.tokens[idx] += float(m.sum())
                    ctx.energy_sum[idx] += float(((sq * m).sum(1) / ntok).sum())
                if "inputs" in needs:
                    h_in = _layer_input(args, kwargs).detach().float()
                    cos = nn.functional.cosine_similarity(h_in, h_out, dim=-1, eps=1e-8).clamp(-1.0, 1.0)
                    ctx.angular_sum[idx] += float((torch.arccos(cos) / torch.pi * m).sum())
                    ctx.influence_sum[idx] += float(((1.0 - cos) * m).sum())
                if "pooled" in needs and pooled_count[idx] < mi_cap:
                    if token_stride:  # one example per predicting position: (B * P, hidden)
                        pooled = h_out[:, mask_now["positions"]].reshape(-1, h_out.shape[-1])
                    else:
                        pooled = (h_out * m3).sum(1) / ntok.unsqueeze(-1)
                    pooled = pooled[: mi_cap - pooled_count[idx]]
                    ctx.pooled[idx].append(pooled.cpu().numpy())
                    pooled_count[idx] += len(pooled)

        return hook

    handles: list = []
    params_by_layer = [[p for p in layer.parameters()] for layer in layers]
    # Each parameter's gradient is reduced to the per-layer statistics as soon as it is accumulated
    # and then freed; with several batches the running sum of gradients is kept (the mean gradient
    # needs them all), with one batch nothing is (see _grad_hook).
    grad_sums: dict[nn.Parameter, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(restored_state(model))
        if "attentions" in needs:
            stack.enter_context(attention_implementation(model, "eager"))
        if checkpoint_layers and "grads" in needs:
            stack.enter_context(checkpointed_layers(layers))
        try:
            model.eval()  # no dropout; gradients still flow
            for p in model.parameters():
                p.requires_grad_(False)
            if "grads" in needs:
                for idx, ps in enumerate(params_by_layer):
                    for p in ps:
                        p.requires_grad_(True)
                        handles.append(p.register_post_accumulate_grad_hook(
                            _grad_hook(ctx, idx, mask_now, grad_sums, single=len(batches) == 1)))
            if needs & {"outputs", "inputs", "pooled"}:
                for idx, layer in enumerate(layers):
                    handles.append(layer.register_forward_hook(layer_hook(idx), with_kwargs=True))
            attn_mods = attention_modules(model, layers) if "attentions" in needs else None
            if attn_mods is not None:
                for idx, (mod, index) in enumerate(attn_mods):
                    handles.append(mod.register_forward_hook(_attention_hook(ctx, idx, index, mask_now)))
            ask = {"output_attentions": True} if "attentions" in needs and attn_mods is None else {}
            total = 0
            for batch in batches:
                size = mask_now["size"] = len(batch["input_ids"])
                positions = lm_positions(batch["attention_mask"], token_stride) if token_stride else None
                mask_now["mask"] = batch["attention_mask"]
                mask_now["positions"] = positions
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with torch.set_grad_enabled("grads" in needs):
                    res = task_loss(model, inputs, batch, positions, **ask)
                if "grads" in needs:
                    # Weight each batch by its size: the accumulated gradient is then that of the sum
                    # of example losses, divided by the example count at the end.
                    mask_now["replay"] = True  # checkpointed layers recompute: count nothing twice
                    try:
                        (res.loss_sum * (size / max(res.count, 1))).backward()
                    finally:
                        mask_now["replay"] = False
                if ask:
                    atts = res.out.attentions
                    if atts is None or any(a is None for a in atts):
                        raise RuntimeError("the model returned no attention probabilities under eager attention")
                    for idx, a in enumerate(atts):
                        _add_attention_entropy(ctx, idx, a, batch["attention_mask"])
                if "pooled" in needs and token_stride:
                    ctx.gold.append(batch["input_ids"][:, positions + 1].reshape(-1).cpu().numpy())
                    ctx.predictions.append(res.position_pred.cpu().numpy())
                elif "pooled" in needs:
                    ctx.gold.append(batch["labels"].cpu().numpy())
                    ctx.predictions.append(res.pred.detach().cpu().numpy())
                del res
                total += size
                if progress is not None:
                    progress(1)
            ctx.examples = total
            if "grads" in needs and grad_sums:
                for idx, ps in enumerate(params_by_layer):
                    for p in ps:
                        if p in grad_sums:  # a parameter no batch reached has a zero gradient
                            _add_mean_gradient(ctx, idx, p, grad_sums.pop(p) / max(total, 1))
        finally:
            for h in handles:
                h.remove()
    return ctx


def _grad_hook(ctx: SignalContext, idx: int, state: dict, sums: dict, single: bool):
    """After a backward accumulates ``p.grad`` (``size`` x the gradient of this batch's mean loss):
    record ``size`` x ||g_batch||^2 for the empirical Fisher (summed over batches and divided by the
    example count, it is the example-weighted mean), then free ``p.grad``. With one batch its
    gradient is the mean gradient and is reduced at once; otherwise it joins the running sum."""
    def hook(p: nn.Parameter) -> None:
        g = p.grad.detach()
        p.grad = None
        size = state["size"]
        ctx.grad_sq_sum[idx] += float((g.float() ** 2).sum()) / size
        if single:
            _add_mean_gradient(ctx, idx, p, g / size)
        elif p in sums:
            sums[p].add_(g)
        else:
            sums[p] = g
    return hook


def _add_mean_gradient(ctx: SignalContext, idx: int, p: nn.Parameter, mean: torch.Tensor) -> None:
    """Add one parameter's share of the layer's ||mean gradient||^2 and Taylor sum |theta * g|."""
    g = mean.double()
    ctx.mean_grad_sq[idx] += float((g ** 2).sum())
    ctx.taylor_sum[idx] += float((p.detach().double() * g).abs().sum())


def _add_attention_entropy(ctx: SignalContext, idx: int, probs: torch.Tensor, mask: torch.Tensor) -> None:
    """Add the entropies of the real query rows (all heads) of one layer's attention (B, H, T, T)."""
    with torch.no_grad():
        p = probs.detach().float()
        m = mask.float()
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)  # (B, H, T)
        ctx.attn_entropy_sum[idx] += float((ent * m[:, None, :]).sum())
        ctx.attn_rows[idx] += float(m.sum()) * p.shape[1]


def _attention_hook(ctx: SignalContext, idx: int, index: int, state: dict):
    def hook(module, args, output):
        if state.get("replay"):
            return
        probs = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
        if probs is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention probabilities under eager attention")
        _add_attention_entropy(ctx, idx, probs, state["mask"])
    return hook


# --------------------------------------------------------------------------- hooks for extra passes


@contextlib.contextmanager
def skip_layer(layer: nn.Module) -> Iterator[None]:
    """Within the block, ``layer`` returns its input unchanged (activation patching)."""

    def hook(module, args, kwargs, output):
        h_in = _layer_input(args, kwargs)
        if isinstance(output, tuple):
            return (h_in,) + tuple(output[1:])
        return h_in

    with _forward_hook(layer, hook):
        yield


@contextlib.contextmanager
def scale_output(layer: nn.Module, alpha: float, keep: list | None = None) -> Iterator[None]:
    """Within the block, ``layer``'s output hidden states are multiplied by ``alpha``.

    If ``keep`` is a list, the scaled output tensor (which requires grad) is appended to it.
    """

    def hook(module, args, kwargs, output):
        h = _hidden(output) * alpha
        if keep is not None:
            h.retain_grad()
            keep.append(h)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    with _forward_hook(layer, hook):
        yield


@contextlib.contextmanager
def _forward_hook(module: nn.Module, hook) -> Iterator[None]:
    """``hook(module, args, kwargs, output)`` on ``module`` for the duration of the block."""
    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def record_layer_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward appends every layer's output hidden states (with grad) to
    the yielded list, in layer order; clear it between forwards. Used by hidden-state KD."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(_hidden(o)))
               for layer in layer_list(model)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_layer_io(model: nn.Module) -> Iterator[list[tuple[int, torch.Tensor, object]]]:
    """Within the block, each forward appends ``(index, input hidden states, raw output)`` of every
    layer to the yielded list, in call order; clear it between forwards. The input is cloned, so
    later in-place operations cannot change what was recorded. Used by the cached-prefix labels
    and the block distances."""
    seen: list = []
    handles = [layer.register_forward_hook(
        lambda m, a, k, o, i=i: seen.append((i, _layer_input(a, k).detach().clone(), o)), with_kwargs=True)
        for i, layer in enumerate(layer_list(model))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_angular_distance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], n: int,
                           last_token: bool = False) -> np.ndarray:
    """For each start l, the mean of arccos(cos(h_l, h_{l+n})) / pi: (L - n + 1,).

    ``h_l`` is the input of layer l (``h_L`` the last layer's output): the angular distance
    across the block of ``n`` layers starting at l (Gromov et al., 2024). Averaged over real
    tokens, or, with ``last_token``, taken at each sequence's last real token only (Gromov et
    al.'s definition for decoders, where the last position has seen the whole sequence).
    """
    layers = layer_list(model)
    L = len(layers)
    if not 1 <= n <= L:
        raise ValueError(f"block size must be in [1, {L}], got {n}")
    sums, count = np.zeros(L - n + 1), 0.0
    was_training = model.training
    model.eval()
    try:
        with record_layer_io(model) as states:
            for batch in batches:
                states.clear()
                model(**{k: v for k, v in batch.items() if k != "labels"}, **no_cache_kwargs(model))
                h = [None] * (L + 1)
                for i, h_in, out in states:
                    h[i] = h_in.float()
                    if i == L - 1:
                        h[L] = _hidden(out).float()
                m = batch["attention_mask"].float()
                if last_token:
                    last = batch["attention_mask"].sum(1) - 1
                    rows = torch.arange(len(last), device=last.device)
                    h = [x[rows, last].unsqueeze(1) for x in h]
                    m = torch.ones(len(last), 1, device=m.device)
                for l in range(L - n + 1):
                    cos = nn.functional.cosine_similarity(h[l], h[l + n], dim=-1, eps=1e-8).clamp(-1, 1)
                    sums[l] += float((torch.arccos(cos) / torch.pi * m).sum())
                count += float(m.sum())
    finally:
        model.train(was_training)
    return sums / max(count, 1.0)
