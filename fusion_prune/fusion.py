"""Fusion models: learn from measured states which layer can go, and reuse that on new data.

Rows (from :mod:`fusion_prune.collect`) hold, per state x layer, the 12 raw signals and the
measured accuracy after removing that layer. Raw signal levels differ wildly between models and
datasets, so features are normalised **within each state** (across that state's layers), and so
is the target. A fitted model is saved as a :class:`FusionBundle` (joblib) with its feature
columns, normalisations, training sources, cross-validation scores and library versions.

joblib files are pickles: load only bundles you trust.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from fusion_prune.utils import publish

from fusion_prune.errors import BadInputError, bad_choice
from signals import DEFAULT_SIGNALS, SIGNALS

STATE_KEYS = ["source_model", "dataset", "step"]
BUNDLE_FORMAT = "fusionprune-fusion-bundle/1"
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "fusion_data" / "default-fusion.joblib"

# --------------------------------------------------------------------------- registries

FUSION_MODELS: dict[str, Callable[[int], object]] = {}


def register_fusion_model(name: str) -> Callable:
    """Register ``factory(seed) -> estimator`` (scikit-learn API) under ``name``."""

    def wrap(factory: Callable[[int], object]) -> Callable[[int], object]:
        if name in FUSION_MODELS:
            raise ValueError(f"fusion model {name!r} is registered twice")
        FUSION_MODELS[name] = factory
        return factory

    return wrap


@register_fusion_model("linear")
def _linear(seed: int):
    # Ridge rather than plain least squares: the three gradient signals are strongly collinear.
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0)


@register_fusion_model("rf")
def _rf(seed: int):
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, max_features=0.5, random_state=seed, n_jobs=1)


@register_fusion_model("xgb")
def _xgb(seed: int):
    from xgboost import XGBRegressor

    return XGBRegressor(n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8, colsample_bytree=0.8,
                        random_state=seed, n_jobs=1, verbosity=0)


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return np.zeros_like(x) if sd == 0 else (x - x.mean()) / sd


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties averaged); one layer gives 0.5."""
    r = pd.Series(x).rank(method="average").to_numpy()
    return np.full_like(r, 0.5) if len(r) < 2 else (r - 1) / (len(r) - 1)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return np.full_like(x, 0.5) if span == 0 else (x - x.min()) / span


#: Per-state transforms of a column (n_layers,) -> (n_layers,).
NORMALISATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "zscore": _z, "rank": _rank, "minmax": _minmax, "raw": lambda x: x,
}

#: Targets computed from one state's rows.
TARGETS: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {
    "retention": lambda s: (s["acc_after_drop"] / max(float(s["acc_before"].iloc[0]), 1e-9)).to_numpy(),
    "retention_z": lambda s: _z(s["acc_after_drop"].to_numpy(dtype=np.float64)),
    "retention_rank": lambda s: _rank(s["acc_after_drop"].to_numpy(dtype=np.float64)),
}


# --------------------------------------------------------------------------- features

def check_columns(table: pd.DataFrame, features: Sequence[str], what: str = "rows") -> None:
    missing = [f for f in features if f not in table.columns]
    if missing:
        present = [c for c in table.columns if c in SIGNALS]
        raise BadInputError(f"The fusion model was trained on feature columns {list(features)}, but the {what} lack "
                            f"{missing}; they have {present}.")


def state_features(state: pd.DataFrame, features: Sequence[str], norm: str) -> np.ndarray:
    """(n_layers, n_features): each feature normalised across the state's layers."""
    f = NORMALISATIONS[norm]
    return np.column_stack([f(state[c].to_numpy(dtype=np.float64)) for c in features])


def iter_states(rows: pd.DataFrame):
    for key, state in rows.groupby(STATE_KEYS, sort=True):
        yield key, state.sort_values("layer")


def design_matrix(rows: pd.DataFrame, features: Sequence[str], norm: str, target: str):
    xs, ys = [], []
    for _, state in iter_states(rows):
        xs.append(state_features(state, features, norm))
        ys.append(TARGETS[target](state))
    return np.vstack(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- the bundle

@dataclass
class FusionBundle:
    """A fitted fusion model and everything needed to use it on a new state."""

    estimator: object
    model_type: str
    features: list[str]
    feature_norm: str
    target: str
    sources: list[dict] = field(default_factory=list)
    cv: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    format: str = BUNDLE_FORMAT
    label: str = "acc_after_drop"  # the measured column the target was computed from (see use_label)

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Predicted target per layer of ONE state's signals table (higher = more removable)."""
        check_columns(table, self.features, "signals table")
        return np.asarray(self.estimator.predict(state_features(table.sort_values("layer"), self.features,
                                                                self.feature_norm)), dtype=np.float64)

    def choose(self, table: pd.DataFrame) -> int:
        """The current index of the layer to drop."""
        t = table.sort_values("layer")
        return int(t["layer"].iloc[int(np.argmax(self.predict(t)))])

    def save(self, path: str | Path) -> Path:
        import os
        import tempfile

        import joblib

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            joblib.dump(self, tmp, compress=3)
            publish(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def describe(self) -> dict:
        return {"model_type": self.model_type, "features": self.features, "feature_norm": self.feature_norm,
                "target": self.target, "sources": self.sources, "cv": self.cv, "versions": self.versions,
                "created": self.created, "label": self.label}


def _fusion_versions() -> dict:
    from fusion_prune.utils import versions

    v = versions()
    return {k: v.get(k) for k in ("fusionprune", "scikit-learn", "xgboost")}


def load_bundle(path: str | Path | None = None, features: Sequence[str] | None = None) -> FusionBundle:
    """Load a bundle (default: the shipped one); check it and, if given, its feature columns.

    joblib files are pickles: load only files you trust.
    """
    import joblib

    path = Path(path) if path is not None else DEFAULT_BUNDLE
    if not path.is_file():
        raise BadInputError(f"The fusion bundle {str(path)!r} does not exist; expected a file written by fit-fusion.")
    try:
        obj = joblib.load(path)
    except Exception as e:  # not a pickle at all, truncated, or from an unknown class
        raise BadInputError(f"The file {str(path)!r} is not a fusionprune fusion bundle "
                            f"(could not unpickle it: {type(e).__name__}).") from e
    if not isinstance(obj, FusionBundle) or getattr(obj, "format", None) != BUNDLE_FORMAT:
        raise BadInputError(f"The file {str(path)!r} is not a fusionprune fusion bundle; it holds a "
                            f"{type(obj).__name__}.")
    now = _fusion_versions()
    drift = {k: (obj.versions.get(k), v) for k, v in now.items() if obj.versions.get(k) != v}
    if drift:
        warnings.warn("fusion bundle " + str(path) + " was saved with other versions: " +
                      ", ".join(f"{k} {a} (now {b})" for k, (a, b) in drift.items()), stacklevel=2)
    if features is not None and list(features) != list(obj.features):
        raise BadInputError(f"The fusion bundle {str(path)!r} was trained on feature columns {obj.features}; "
                            f"expected the same as the data's {list(features)}.")
    return obj


# --------------------------------------------------------------------------- fitting and scoring

def read_rows(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate rows tables (parquet or CSV; glob patterns allowed) and check their columns."""
    import glob

    files: list[str] = []
    for p in paths:
        matched = sorted(glob.glob(str(p))) if any(ch in str(p) for ch in "*?[") else [str(p)]
        if not matched:
            raise BadInputError(f"The rows pattern {str(p)!r} matches no file; expected rows from 'collect'.")
        files += matched
    frames = []
    for f in files:
        if not Path(f).is_file():
            raise BadInputError(f"The rows file {f!r} does not exist; expected a table written by 'collect'.")
        try:
            frames.append(pd.read_parquet(f) if f.endswith(".parquet") else pd.read_csv(f))
        except Exception as e:
            raise BadInputError(f"The rows file {f!r} could not be read as a table: {type(e).__name__}.") from e
    rows = pd.concat(frames, ignore_index=True)
    need = STATE_KEYS + ["layer", "acc_before", "acc_after_drop"]
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise BadInputError(f"The rows lack columns {missing}; expected a table written by 'collect' with {need}.")
    return rows


LABELS = ("acc_after_drop", "acc_after_recovery")


def use_label(rows: pd.DataFrame, label: str) -> pd.DataFrame:
    """``rows`` with ``acc_after_drop`` replaced by the measured column ``label``, so that targets,
    fitting and every choice metric (regret, top-1, Spearman) use it; the input is not changed."""
    if label not in LABELS:
        raise bad_choice("label", label, LABELS)
    if label not in rows.columns:
        raise BadInputError(f"The 'label' parameter names column {label!r}, which these rows lack; collect them "
                            "with --recovery-steps N for acc_after_recovery.")
    if label == "acc_after_drop":
        return rows
    return rows.assign(acc_after_drop=rows[label])


def fit_bundle(rows: pd.DataFrame, model_type: str = "rf", features: Sequence[str] = DEFAULT_SIGNALS,
               feature_norm: str = "zscore", target: str = "retention_z", seed: int = 0,
               cv: dict | None = None, label: str = "acc_after_drop") -> FusionBundle:
    """Fit one fusion model on all ``rows`` (target computed from the measured column ``label``)."""
    if model_type not in FUSION_MODELS:
        raise bad_choice("model_type", model_type, FUSION_MODELS)
    if feature_norm not in NORMALISATIONS:
        raise bad_choice("feature_norm", feature_norm, NORMALISATIONS)
    if target not in TARGETS:
        raise bad_choice("target", target, TARGETS)
    features = list(features)
    check_columns(rows, features)
    rows = use_label(rows, label)
    x, y = design_matrix(rows, features, feature_norm, target)
    est = FUSION_MODELS[model_type](seed)
    est.fit(x, y)
    sources = (rows.groupby(["source_model", "dataset"]).step.nunique().reset_index()
               .rename(columns={"step": "states"}).to_dict("records"))
    return FusionBundle(est, model_type, features, feature_norm, target, sources, cv or {}, _fusion_versions(),
                        time.strftime("%Y-%m-%dT%H:%M:%S"), label=label)


def choice_metrics(rows: pd.DataFrame, scorer: Callable[[pd.DataFrame], np.ndarray]) -> dict:
    """Mean over states of Spearman(score, measured), top-1 hit and regret of the top-scored layer.

    ``scorer(state) -> (n_layers,)`` removability; higher means "drop this one".
    """
    from scipy.stats import spearmanr

    rho, top1, regret = [], [], []
    for _, state in iter_states(rows):
        score = np.asarray(scorer(state), dtype=np.float64)
        acc = state["acc_after_drop"].to_numpy(dtype=np.float64)
        chosen = acc[int(np.argmax(score))]
        top1.append(float(chosen == acc.max()))
        regret.append(float(acc.max() - chosen))
        if np.ptp(acc) > 0 and np.ptp(score) > 0:
            rho.append(float(spearmanr(score, acc).statistic))
    return {"spearman": float(np.mean(rho)) if rho else float("nan"), "top1": float(np.mean(top1)),
            "regret": float(np.mean(regret)), "states": len(top1)}


def baseline_metrics(rows: pd.DataFrame, features: Sequence[str] = DEFAULT_SIGNALS) -> dict:
    """The three metrics for every single signal (with its rule) and for consensus."""
    from fusion_prune.strategies import consensus_removability, signal_removability

    features = [f for f in features if f in SIGNALS]  # extra feature columns have no rule of their own
    out = {"signals": {n: choice_metrics(rows, lambda s, n=n: signal_removability(s, n)) for n in features}}
    out["consensus"] = choice_metrics(rows, lambda s: consensus_removability(s, features))
    return out


def evaluate_bundle(bundle: FusionBundle, rows: pd.DataFrame) -> dict:
    check_columns(rows, bundle.features)
    return {"fusion": choice_metrics(rows, bundle.predict), **baseline_metrics(rows, bundle.features),
            "states": int(rows.groupby(STATE_KEYS).ngroups)}


def leave_one_dataset_out(rows: pd.DataFrame, model_types: Sequence[str] = ("linear", "rf", "xgb"),
                          feature_norms: Sequence[str] = ("zscore",), targets: Sequence[str] = ("retention_z",),
                          features: Sequence[str] = DEFAULT_SIGNALS, seed: int = 0) -> pd.DataFrame:
    """For each held-out dataset, fusion variants fitted on the others against the baselines.

    ``best-signal`` is the single signal with the lowest mean regret on the *training* datasets of
    the fold (ties: higher Spearman), evaluated on the held-out one.
    """
    out = []
    datasets = sorted(rows["dataset"].unique())
    if len(datasets) < 2:
        raise BadInputError(f"Leave-one-dataset-out needs rows from at least 2 datasets. Got {datasets}.")
    for held in datasets:
        train, test = rows[rows.dataset != held], rows[rows.dataset == held]
        for mt in model_types:
            for norm in feature_norms:
                for tgt in targets:
                    b = fit_bundle(train, mt, features, norm, tgt, seed)
                    out.append({"held_out": held, "method": f"fusion-{mt}", "feature_norm": norm, "target": tgt,
                                **choice_metrics(test, b.predict)})
        base_train = baseline_metrics(train, features)["signals"]
        best = min(base_train, key=lambda n: (base_train[n]["regret"], -np.nan_to_num(base_train[n]["spearman"])))
        base_test = baseline_metrics(test, features)
        out.append({"held_out": held, "method": "best-signal", "signal": best, **base_test["signals"][best]})
        out.append({"held_out": held, "method": "consensus", **base_test["consensus"]})
    return pd.DataFrame(out)


def lodo_markdown(res: pd.DataFrame, spearman: bool = False) -> str:
    """Markdown table of a leave-one-dataset-out result: method x held-out dataset, each cell
    "regret / top-1", and the means (with Spearman when asked)."""
    datasets = sorted(res.held_out.unique())
    last = "mean regret / top-1 / Spearman" if spearman else "mean"
    lines = ["| method | " + " | ".join(datasets) + f" | {last} |", "|" + "---|" * (len(datasets) + 2)]
    for m in dict.fromkeys(res.method):
        part = res[res.method == m].set_index("held_out")
        cells = [f"{part.regret[d]:.4f} / {part.top1[d]:.2f}" for d in datasets]
        mean = f"**{part.regret.mean():.4f}** / {part.top1.mean():.2f}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean}" + (f" / {part.spearman.mean():.2f} |" if spearman
                                                                        else " |"))
    return "\n".join(lines)


def importances(bundle: FusionBundle) -> dict[str, float]:
    """Feature importances (trees) or coefficients (linear) by feature name."""
    est = bundle.estimator
    values = getattr(est, "feature_importances_", None)
    if values is None:
        values = getattr(est, "coef_", None)
    return {f: float(v) for f, v in zip(bundle.features, np.ravel(values))} if values is not None else {}
