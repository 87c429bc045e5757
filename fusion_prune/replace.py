"""Linear replacement of removed layers, folded into the layer before them (ReplaceMe's idea).

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
REPLACE_METHODS = ("none", "linear", "linear-cosine")
COSINE_STEPS = 200


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
    from fusion_prune.models import no_cache_kwargs

    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size].to(device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **no_cache_kwargs(model))


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
