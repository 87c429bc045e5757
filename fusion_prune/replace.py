"""Replacement of removed layers: a linear map folded into the layer before them (ReplaceMe's idea),
or one trained layer of the model's own class in place of each run (LLM-Streamline's).

For each maximal run of consecutive removed layers (original indices ``i .. j``) whose preceding
layer ``i - 1`` was kept, a (H, H) matrix ``T`` is fitted by least squares on calibration tokens
so that the kept layer's residual branch, multiplied by ``T``, carries the stream to where the
teacher's was after layer ``j``:

    A + M T  ~  L_j      with  M: that layer's last residual-branch output (its MLP's output projection),
                               A = Y - M: the rest of its output Y (the stream before the MLP is added),
                               L_j: the teacher's hidden state after layer j,

so ``T = argmin ||M T - (L_j - A)||`` (``torch.linalg.lstsq`` in float64, over every real token).
Since ``M = a W^T + b``, ``M T = a (T^T W)^T + b T``: T is folded into the output projection's
weight and bias, and the folder stays a plain model of its family with no new module. Runs are
fitted in order, each on the student with the earlier ones already folded in, against the
teacher's own hidden states.

Families whose residual branch ends in something other than a linear projection (Gemma 2/3 put
an RMSNorm after the MLP; mixture-of-experts blocks sum several projections) are refused in one
line; a run that starts at layer 0 has no layer before it and is left as it is (reported).

**Layer replacement** (:func:`replace_layer`, ``--replace layer``): for each run ``i .. j`` of two or more
removed layers (a one-layer run would get itself back) one
block of the model's class goes back in its place, initialised from the removed layer of the run
whose output on the run's input is closest to the run's output (the candidates share the layer
type of ``i``), then trained alone (Adam, mean squared error) to map the student's stream before
the run to the teacher's hidden state after layer ``j``, on the calibration windows. The student
gains one layer per run; its folder stays a plain model of its family (``kept_layers`` names the
initialising layer).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from fusion_prune.errors import BadInputError

#: names of the MLP's output projection, whose output is what the block adds to the stream
OUT_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out")
#: modules after the MLP in the block that make the fold inexact (a norm on the branch's output)
_AFTER_MLP = ("post_feedforward_layernorm", "post_mlp_layernorm")
#: none; linear: least squares; linear-cosine: from the least-squares map, minimise the mean cosine
#: distance between the stream and the teacher's (ReplaceMe's second objective, by Adam)
REPLACE_METHODS = ("none", "linear", "linear-cosine", "layer")
COSINE_STEPS = 200
#: --replace layer: Adam steps (one calibration batch each) and learning rate of each new layer
LAYER_STEPS = 200
LAYER_LR = 1e-4


def runs_to_replace(teacher_layers: int, kept: list[int]) -> list[tuple[int, int]]:
    """Maximal runs ``(i, j)`` (inclusive, original indices) of removed layers of a ``teacher_layers``-deep
    model of which ``kept`` remain."""
    from fusion_prune.export import runs

    return [(a, b - 1) for a, b in runs(sorted(set(range(teacher_layers)) - set(kept)))]


def out_projection(layer: nn.Module) -> nn.Module:
    """The output projection of ``layer``'s MLP (a Linear or GPT-2's Conv1D), refused where folding
    into it would not be exact."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or any(hasattr(layer, n) for n in _AFTER_MLP) or hasattr(mlp, "experts"):
        raise BadInputError(f"The '--replace' option 'linear' needs a block whose MLP output is added to the stream "
                            f"as it is; {type(layer).__name__} has none (or a norm or experts after it). Expected "
                            f"a Llama-, Qwen-, Mistral-, Phi-3- or GPT-2-like block.")
    for name in OUT_PROJECTIONS:
        proj = getattr(mlp, name, None)
        if proj is not None and hasattr(proj, "weight"):
            return proj
    raise BadInputError(f"The '--replace' option 'linear' found no output projection ({', '.join(OUT_PROJECTIONS)}) "
                        f"in {type(mlp).__name__}; expected one of them.")


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Outputs (first element of tuples) of ``modules`` on every forward, kept on the CPU in float32."""
    box: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = []
    for key, module in modules.items():
        def hook(_m, _args, out, key=key):
            out = out[0] if isinstance(out, (tuple, list)) else out
            box[key].append(out.detach().float().cpu())
        handles.append(module.register_forward_hook(hook))
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
    """Forward ``windows`` (N, T) through ``model`` in batches; a hook's :class:`_Stop` ends a batch early."""
    from fusion_prune.models import no_cache_kwargs

    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), **no_cache_kwargs(model))
            except _Stop:
                pass


def fold(proj: nn.Module, T: torch.Tensor) -> None:
    """Replace ``proj``'s output ``M`` by ``M T`` (T: (H, H)) in its own weight and bias."""
    with torch.no_grad():
        T = T.to(proj.weight.device, torch.float64)
        w = proj.weight.double()
        conv1d = type(proj).__name__ == "Conv1D"  # GPT-2: y = x W + b, W (in, out)
        proj.weight.copy_((w @ T if conv1d else T.T @ w).to(proj.weight.dtype))
        if getattr(proj, "bias", None) is not None:
            proj.bias.copy_((proj.bias.double() @ T).to(proj.bias.dtype))


def mean_cosine_distance(A: torch.Tensor, M: torch.Tensor, T: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(A + M T, L); A, M, L: (N, H), T: (H, H)."""
    return (1 - torch.nn.functional.cosine_similarity(A + M @ T, L, dim=-1)).mean()


def fit_cosine(A: torch.Tensor, M: torch.Tensor, L: torch.Tensor, T0: torch.Tensor, steps: int = COSINE_STEPS,
               lr: float = 1e-3) -> torch.Tensor:
    """``T`` minimising :func:`mean_cosine_distance` by Adam from ``T0`` (the least-squares map); the
    best iterate is returned, so the result is never worse than ``T0``. Float32 (the float64
    solve gives the start)."""
    A, M, L = A.float(), M.float(), L.float()
    T = T0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)
    best, best_T = float("inf"), T0.clone()
    for _ in range(steps + 1):
        loss = mean_cosine_distance(A, M, T, L)
        if loss.item() < best:
            best, best_T = loss.item(), T.detach().double().clone()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best_T


def replace_linear(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                   objective: str = "linear") -> dict:
    """Fit and fold one linear map per run of removed layers (module docstring) into ``student``, in
    place; ``windows``: (N, T) calibration token ids. ``objective``: ``linear`` (least squares) or
    ``linear-cosine`` (then :func:`fit_cosine` from it). Returns a record per run: the layer folded
    into, tokens fitted, the residual norm before and after relative to the target's, and the mean
    cosine distance to the teacher's stream before and after."""
    from fusion_prune.surgery import kept_layers, layer_list

    t_layers, s_layers = layer_list(teacher), layer_list(student)
    kept = kept_layers(student)
    position = {orig: k for k, orig in enumerate(kept)}
    record = []
    for i, j in runs_to_replace(len(t_layers), kept):
        if i == 0 or (i - 1) not in position:
            record.append({"run": [i, j], "folded_into": None, "why": "no kept layer before it"})
            continue
        host = s_layers[position[i - 1]]
        proj = out_projection(host)
        with _capture({"L": t_layers[j]}) as t_box:
            _run(teacher, windows, batch_size)
        with _capture({"M": proj, "Y": host}) as s_box:
            _run(student, windows, batch_size)
        H = t_box["L"][0].shape[-1]
        L = torch.cat(t_box["L"]).reshape(-1, H).double()
        M = torch.cat(s_box["M"]).reshape(-1, H).double()
        A = torch.cat(s_box["Y"]).reshape(-1, H).double() - M  # the stream before the MLP is added
        target = L - A
        T = torch.linalg.lstsq(M, target).solution  # (H, H)
        eye = torch.eye(H, dtype=T.dtype)
        cos_before = float(mean_cosine_distance(A, M, eye, L))
        if objective == "linear-cosine":
            T = fit_cosine(A, M, L, T)
        before = float((M - target).norm() / target.norm())
        after = float((M @ T - target).norm() / target.norm())
        fold(proj, T)
        record.append({"run": [i, j], "folded_into": i - 1, "tokens": int(M.shape[0]),
                       "relative_residual_before": round(before, 5), "relative_residual_after": round(after, 5),
                       "cosine_distance_before": round(cos_before, 6),
                       "cosine_distance_after": round(float(mean_cosine_distance(A, M, T, L)), 6)})
    return {"method": objective, "runs": record}


class _Stop(Exception):
    """Raised by a capture hook: nothing after the captured module needs computing."""


def _layer_io(model: nn.Module, module: nn.Module, windows: torch.Tensor, batch_size: int, *, inputs: bool) -> list:
    """Per batch of ``windows`` (N, T): ``module``'s (hidden states, other keyword arguments) when
    ``inputs``, else its output hidden states; the forward stops there. Hooks are removed after."""
    box: list = []

    def pre(_m, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        rest = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()
                if k not in ("hidden_states", "past_key_value", "past_key_values", "use_cache")}
        box.append((hs.detach(), rest))
        raise _Stop

    def post(_m, _args, out):
        box.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
        raise _Stop

    handle = module.register_forward_pre_hook(pre, with_kwargs=True) if inputs else module.register_forward_hook(post)
    try:
        _run(model, windows, batch_size)
    finally:
        handle.remove()
    return box


def _apply(layer: nn.Module, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hs, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _relative_error(layer: nn.Module, ins: list, targets: list) -> float:
    """||layer(x) - y|| / ||y - x|| over every batch: 1.0 is the gap with the run simply removed."""
    num = den = 0.0
    with torch.no_grad():
        for (hs, kw), y in zip(ins, targets):
            num += float((_apply(layer, hs, kw).float() - y.float()).pow(2).sum())
            den += float((y.float() - hs.float()).pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def replace_layer(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  steps: int = LAYER_STEPS, lr: float = LAYER_LR) -> dict:
    """Put one trained layer back in place of each run of removed layers (module docstring), in
    ``student`` **in place**; ``windows``: (N, T) calibration token ids. Runs are replaced in order,
    each fitted on the student with the earlier ones in place, against the teacher's own hidden
    states. Returns a record per run: the initialising layer, its position, the relative error
    (1.0 = the run removed) with the best removed layer as it was and after training, seconds."""
    import copy
    import time

    from fusion_prune.surgery import KEPT_ATTR, insert_layer_, kept_layers, layer_list

    t_layers = layer_list(teacher)
    types = getattr(teacher.config, "layer_types", None)
    record = []
    for i, j in runs_to_replace(len(t_layers), kept_layers(student)):
        if i == j:  # its replacement would be the removed layer itself, put back
            record.append({"run": [i, j], "initialised_from": None, "why": "a one-layer run: nothing to replace it by"})
            continue
        t0 = time.perf_counter()
        targets = _layer_io(teacher, t_layers[j], windows, batch_size, inputs=False)
        new = copy.deepcopy(t_layers[i])
        pos = insert_layer_(student, new, i, teacher.config)
        ins = _layer_io(student, new, windows, batch_size, inputs=True)
        # the start: the removed layer (of i's type: its mask and positions are the ones captured)
        # that best reproduces the whole run by itself
        same = [k for k in range(i, j + 1) if types is None or types[k] == types[i]]
        errors = {k: _relative_error(t_layers[k], ins, targets) for k in same}
        init = min(errors, key=errors.get)
        if init != i:
            new.load_state_dict(t_layers[init].state_dict())
            kept = kept_layers(student)
            kept[pos] = init
            setattr(student.config, KEPT_ATTR, kept)
        was_training = new.training
        new.train()
        for p in new.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(new.parameters(), lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                (hs, kw), y = ins[step % len(ins)], targets[step % len(ins)]
                loss = torch.nn.functional.mse_loss(_apply(new, hs, kw).float(), y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(new.parameters(), 1.0)
                opt.step()
        new.train(was_training)
        record.append({"run": [i, j], "initialised_from": init, "position": pos, "tokens": int(windows.numel()),
                       "relative_error_initial": round(errors[init], 5),
                       "relative_error_after": round(_relative_error(new, ins, targets), 5),
                       "steps": steps, "seconds": round(time.perf_counter() - t0, 2)})
    return {"method": "layer", "runs": record, "added_layers": sum(r["initialised_from"] is not None for r in record)}


def replace_layers(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                   method: str = "linear") -> tuple[nn.Module, dict]:
    """(student, record) after the ``method`` replacement (:data:`REPLACE_METHODS`) of its removed
    runs, made **in place** on ``student``: the one entry point ``compress`` and the benchmarks call."""
    if method == "none":
        return student, {"method": "none", "runs": []}
    if method == "layer":
        return student, replace_layer(teacher, student, windows, batch_size)
    return student, replace_linear(teacher, student, windows, batch_size, objective=method)
