"""Fusion models: learn from measured states which layer can go, and reuse that on new data.

Rows (from :mod:`fusion_prune.collect`) hold, per state x layer, the 12 raw signals and the
measured accuracy after removing that layer. Raw signal levels differ wildly between models and
datasets, so features are normalised **within each state** (across that state's layers), and so
is the target. A fitted model is saved as a :class:`FusionBundle`: one ``.npz`` archive that holds
JSON metadata (feature columns, normalisation, training sources, cross-validation scores, library
versions) and the fitted model as plain numbers -- a linear model's coefficients, each forest
tree's node arrays, XGBoost's own JSON. Loading one never unpickles anything (``np.load`` with
``allow_pickle=False``), so a bundle from anywhere cannot run code. Bundles written by older
versions are joblib pickles and load only with ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import json
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from fusion_prune.utils import atomic_file

from fusion_prune.errors import BadInputError, bad_choice
from signals import DEFAULT_SIGNALS, SIGNALS

STATE_KEYS = ["source_model", "dataset", "step"]


def state_keys(rows: pd.DataFrame) -> list[str]:
    """The columns that name a state: :data:`STATE_KEYS`, plus ``walk`` where the rows have it (a
    random walk's step 2 is another state than the oracle's step 2)."""
    return STATE_KEYS[:2] + (["walk"] if "walk" in rows.columns else []) + STATE_KEYS[2:]


def _fill_walk(rows: pd.DataFrame) -> pd.DataFrame:
    # Tables concatenated from rows with and without a walk column hold NaN there: those are the
    # oracle's (collect had no other walk before), and groupby would silently drop NaN keys.
    if "walk" in rows.columns and rows["walk"].isna().any():
        return rows.fillna({"walk": "oracle"})
    return rows


def count_states(rows: pd.DataFrame) -> int:
    """Number of distinct states in ``rows``."""
    rows = _fill_walk(rows)
    return int(rows.groupby(state_keys(rows)).ngroups)
BUNDLE_FORMAT = "fusionprune-fusion-bundle/2"  # /1 was a joblib pickle of the FusionBundle
PICKLE_FORMAT = "fusionprune-fusion-bundle/1"
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "fusion_data" / "default-fusion.npz"
#: Each task names its own shipped bundle (``Task.default_bundle``): the classification bundle does not
#: transfer to causal LMs (benchmarks/journal.md). ``make fusion-bundle`` rebuilds both.

# --------------------------------------------------------------------------- registries

FUSION_MODELS: dict[str, Callable[[int], object]] = {}
#: How each registered model is written to and read from a bundle (a key of CODECS).
FUSION_CODECS: dict[str, str] = {}
#: Models fitted with the state of each row as its group (``fit(x, y, qid=...)``): rankers.
GROUPED_MODELS: set[str] = set()


def register_fusion_model(name: str, codec: str, grouped: bool = False) -> Callable:
    """Register ``factory(seed) -> estimator`` (scikit-learn API) under ``name``.

    ``codec`` names the entry of :data:`CODECS` that turns the fitted estimator into plain arrays.
    ``grouped``: the estimator learns to order the layers within each state (a learning-to-rank
    objective); ``fit`` then gets ``qid``, one id per state.
    """

    def wrap(factory: Callable[[int], object]) -> Callable[[int], object]:
        if name in FUSION_MODELS:
            raise ValueError(f"fusion model {name!r} is registered twice")
        if codec not in CODECS:
            raise ValueError(f"fusion model {name!r}: unknown codec {codec!r}; expected one of {sorted(CODECS)}")
        FUSION_MODELS[name] = factory
        FUSION_CODECS[name] = codec
        if grouped:
            GROUPED_MODELS.add(name)
        return factory

    return wrap


# --------------------------------------------------------------------------- codecs: estimators as plain arrays
# A codec is (export, load): export(fitted estimator) -> {name: ndarray} with numeric dtypes only;
# load({name: ndarray}) -> an object with .predict(X (n, f)) -> (n,). Nothing here unpickles.


class LinearModel:
    """``y = X @ coef + intercept``, from a fitted linear model's coefficients."""

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef_, self.intercept_ = np.asarray(coef, dtype=np.float64), float(intercept)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef_ + self.intercept_


class ForestModel:
    """A regression forest from its trees' node arrays, evaluated with numpy.

    All trees' nodes are concatenated; ``offsets[t]:offsets[t+1]`` are tree t's nodes, child indices
    are local to the tree and -1 marks a leaf. As in scikit-learn, inputs are compared as float32
    (``x <= threshold`` goes left) and the forest predicts the mean of its trees.
    """

    def __init__(self, offsets, left, right, feature, threshold, value, importances) -> None:
        self.offsets, self.left, self.right = (np.asarray(a, dtype=np.int64) for a in (offsets, left, right))
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold, self.value = np.asarray(threshold, dtype=np.float64), np.asarray(value, dtype=np.float64)
        self.feature_importances_ = np.asarray(importances, dtype=np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).astype(np.float64)
        rows = np.arange(len(x))
        total = np.zeros(len(x))
        for a, b in zip(self.offsets[:-1], self.offsets[1:]):
            left, right, feat, thr = self.left[a:b], self.right[a:b], self.feature[a:b], self.threshold[a:b]
            node = np.zeros(len(x), dtype=np.int64)
            inner = left[node] != -1
            while inner.any():
                go_left = x[rows, np.where(inner, feat[node], 0)] <= thr[node]
                node = np.where(inner, np.where(go_left, left[node], right[node]), node)
                inner = left[node] != -1
            total += self.value[a:b][node]
        return total / (len(self.offsets) - 1)


def _export_linear(est) -> dict[str, np.ndarray]:
    return {"coef": np.ravel(est.coef_).astype(np.float64), "intercept": np.atleast_1d(est.intercept_).astype(np.float64)}


def _load_linear(a: dict[str, np.ndarray]) -> LinearModel:
    return LinearModel(a["coef"], float(a["intercept"][0]))


def _export_forest(est) -> dict[str, np.ndarray]:
    if isinstance(est, ForestModel):
        return {k: getattr(est, k) for k in ("offsets", "left", "right", "feature", "threshold", "value")} | {
            "importances": est.feature_importances_}
    trees = [t.tree_ for t in est.estimators_]
    if any(t.value.shape[1:] != (1, 1) for t in trees):
        raise ValueError("only single-output regression forests can be saved in a bundle")
    return {
        "offsets": np.cumsum([0] + [t.node_count for t in trees]).astype(np.int64),
        "left": np.concatenate([t.children_left for t in trees]).astype(np.int64),
        "right": np.concatenate([t.children_right for t in trees]).astype(np.int64),
        "feature": np.concatenate([t.feature for t in trees]).astype(np.int64),
        "threshold": np.concatenate([t.threshold for t in trees]).astype(np.float64),
        "value": np.concatenate([t.value[:, 0, 0] for t in trees]).astype(np.float64),
        "importances": np.asarray(est.feature_importances_, dtype=np.float64),
    }


def _load_forest(a: dict[str, np.ndarray]) -> ForestModel:
    return ForestModel(a["offsets"], a["left"], a["right"], a["feature"], a["threshold"], a["value"], a["importances"])


def _export_xgboost(est) -> dict[str, np.ndarray]:
    # XGBoost's own JSON model format: data, not code.
    return {"model_json": np.frombuffer(bytes(est.get_booster().save_raw("json")), dtype=np.uint8)}


def _load_xgboost(a: dict[str, np.ndarray]):
    from xgboost import XGBRegressor

    est = XGBRegressor()
    est.load_model(bytearray(a["model_json"].tobytes()))
    return est


def _load_xgboost_ranker(a: dict[str, np.ndarray]):
    from xgboost import XGBRanker

    est = XGBRanker()
    est.load_model(bytearray(a["model_json"].tobytes()))
    return est


CODECS: dict[str, tuple[Callable[[object], dict[str, np.ndarray]], Callable[[dict[str, np.ndarray]], object]]] = {
    "linear": (_export_linear, _load_linear),
    "forest": (_export_forest, _load_forest),
    "xgboost": (_export_xgboost, _load_xgboost),
    "xgboost-rank": (_export_xgboost, _load_xgboost_ranker),
}


@register_fusion_model("linear", codec="linear")
def _linear(seed: int):
    # Ridge rather than plain least squares: the three gradient signals are strongly collinear.
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0)


@register_fusion_model("rf", codec="forest")
def _rf(seed: int):
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, max_features=0.5, random_state=seed, n_jobs=1)


@register_fusion_model("xgb", codec="xgboost")
def _xgb(seed: int):
    from xgboost import XGBRegressor

    return XGBRegressor(n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8, colsample_bytree=0.8,
                        random_state=seed, n_jobs=1, verbosity=0)


@register_fusion_model("xgb-rank", codec="xgboost-rank", grouped=True)
def _xgb_rank(seed: int):
    # The decision is an argmax per state, so learn the order within each state (pairwise
    # objective grouped by state) instead of a value comparable across states.
    from xgboost import XGBRanker

    return XGBRanker(objective="rank:pairwise", n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8,
                     colsample_bytree=0.8, random_state=seed, n_jobs=1, verbosity=0)


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
    "retention": lambda s: (s["score_after_drop"] / max(float(s["score_before"].iloc[0]), 1e-9)).to_numpy(),
    "retention_z": lambda s: _z(s["score_after_drop"].to_numpy(dtype=np.float64)),
    "retention_rank": lambda s: _rank(s["score_after_drop"].to_numpy(dtype=np.float64)),
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
    """(state key, that state's rows sorted by layer) for every state; rows that were not given a
    measured column (:func:`use_measured`) are scored by ``acc_after_drop``."""
    rows = _fill_walk(rows)
    if "score_after_drop" not in rows.columns:
        rows = use_measured(rows, "acc_after_drop")
    for key, state in rows.groupby(state_keys(rows), sort=True):
        yield key, state.sort_values("layer")


def design_matrix(rows: pd.DataFrame, features: Sequence[str], norm: str, target: str, groups: bool = False):
    """(x (N, n_features), y (N,)) over all states' rows; with ``groups`` also each row's state id (N,)."""
    xs, ys, gs = [], [], []
    for i, (_, state) in enumerate(iter_states(rows)):
        xs.append(state_features(state, features, norm))
        ys.append(TARGETS[target](state))
        gs.append(np.full(len(state), i, dtype=np.int64))
    out = (np.vstack(xs), np.concatenate(ys))
    return (*out, np.concatenate(gs)) if groups else out


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
    measured: str = "acc_after_drop"  # the measured column the target was computed from (see use_measured)

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Predicted target per layer of ONE state's signals table (higher = more removable)."""
        check_columns(table, self.features, "signals table")
        return np.asarray(self.estimator.predict(state_features(table.sort_values("layer"), self.features,
                                                                self.feature_norm)), dtype=np.float64)

    def choose(self, table: pd.DataFrame) -> int:
        """The current index of the layer to drop."""
        t = table.sort_values("layer")
        return int(t["layer"].iloc[int(np.argmax(self.predict(t)))])

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the bundle as one ``.npz`` archive (JSON metadata + the model as arrays), atomically."""
        path = Path(path)
        export, _ = CODECS[FUSION_CODECS[self.model_type]]
        arrays = {f"model.{k}": v for k, v in export(self.estimator).items()}
        meta = self.describe() | {"format": BUNDLE_FORMAT, "codec": FUSION_CODECS[self.model_type]}
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=_jsonable, sort_keys=True).encode(), dtype=np.uint8)
        with atomic_file(path, overwrite) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)  # a file object: np.savez would append ".npz" to a name
        return path

    def describe(self) -> dict:
        return {"model_type": self.model_type, "features": self.features, "feature_norm": self.feature_norm,
                "target": self.target, "sources": self.sources, "cv": self.cv, "versions": self.versions,
                "created": self.created, "measured": self.measured}


def _fusion_versions() -> dict:
    from fusion_prune.utils import versions

    v = versions()
    return {k: v.get(k) for k in ("fusionprune", "scikit-learn", "xgboost")}


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# First bytes of a raw pickle (protocol 2+) and of the compressors joblib wraps pickles in.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"\x78\x01", b"\x78\x5e", b"\x78\x9c",
                 b"\x78\xda", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00", b"ZF")


def _not_a_bundle(path: Path, why: str) -> BadInputError:
    return BadInputError(f"The file {str(path)!r} is not a fusionprune fusion bundle ({why}); expected a .npz "
                         "bundle written by `fusionprune fit-fusion`.")


def _load_npz_bundle(path: Path) -> FusionBundle:
    try:
        with np.load(path, allow_pickle=False) as z:  # refuses object arrays: no code can run
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except KeyError:
        raise _not_a_bundle(path, "an archive without bundle metadata") from None
    except (ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as e:
        raise _not_a_bundle(path, f"unreadable archive: {type(e).__name__}") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _not_a_bundle(path, f"format {got!r}, expected {BUNDLE_FORMAT!r}")
    codec = meta.get("codec")
    if codec not in CODECS:
        raise _not_a_bundle(path, f"model codec {codec!r}, expected one of {sorted(CODECS)}")
    model = {k.removeprefix("model."): v for k, v in arrays.items() if k.startswith("model.")}
    try:
        estimator = CODECS[codec][1](model)
    except (KeyError, ValueError, TypeError) as e:
        raise _not_a_bundle(path, f"incomplete {codec} model: {type(e).__name__} {e}") from None
    if "label" in meta and "measured" not in meta:  # bundles written before the rename (the shipped ones)
        meta["measured"] = meta.pop("label")
    fields = ("model_type", "features", "feature_norm", "target", "sources", "cv", "versions", "created", "measured")
    missing = [f for f in fields if f not in meta]
    if missing:
        raise _not_a_bundle(path, f"metadata lacks {missing}")
    return FusionBundle(estimator=estimator, **{f: meta[f] for f in fields})


def _load_pickle_bundle(path: Path) -> FusionBundle:
    import joblib

    try:
        obj = joblib.load(path)
    except Exception as e:  # truncated, or from an unknown class
        raise _not_a_bundle(path, f"could not unpickle it: {type(e).__name__}") from None
    if not isinstance(obj, FusionBundle) or getattr(obj, "format", None) != PICKLE_FORMAT:
        raise _not_a_bundle(path, f"the pickle holds a {type(obj).__name__}")
    obj.format = BUNDLE_FORMAT  # in memory it is the same object as a /2 bundle; save() writes /2
    return obj


def load_bundle(path: str | Path | None = None, features: Sequence[str] | None = None,
                trust_pickle: bool = False) -> FusionBundle:
    """Load a bundle (default: the classifier bundle; each task names its own, ``Task.default_bundle``);
    check it and, if given, its feature columns.

    ``.npz`` bundles are read without unpickling. A joblib pickle (bundle format /1, written before 2026-11-23)
    is refused unless ``trust_pickle``: unpickling runs whatever code the file holds.
    """
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    if not path.is_file():
        raise BadInputError(f"The fusion bundle {str(path)!r} does not exist; expected a file written by fit-fusion.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        obj = _load_npz_bundle(path)
    elif head.startswith(_PICKLE_MAGIC) or path.suffix in (".joblib", ".pkl", ".pickle"):
        if not trust_pickle:
            raise BadInputError(f"The fusion bundle {str(path)!r} is a pickle (joblib), and loading a pickle runs any "
                                "code it holds; expected a .npz bundle. Pass --trust-pickle (trust_pickle=True) "
                                "only if you made the file or trust its source, then re-save it with fit-fusion.")
        obj = _load_pickle_bundle(path)
    else:
        raise _not_a_bundle(path, "neither a .npz archive nor a pickle")
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
    if "walk" in rows.columns:  # rows from before collect had walks are the oracle's
        rows["walk"] = rows["walk"].fillna("oracle")
    need = STATE_KEYS + ["layer", "acc_before", "acc_after_drop"]
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise BadInputError(f"The rows lack columns {missing}; expected a table written by 'collect' with {need}.")
    return rows


#: measured columns a fusion model can learn from: (column, the intact model's column, higher is better)
MEASURED = {"acc_after_drop": ("acc_before", True), "acc_after_recovery": ("acc_before", True),
            "loss_after_drop": ("loss_before", False)}
HOW_MEASURED = {"acc_after_recovery": "collect --recovery-steps N", "loss_after_drop": "collect --task causal-lm"}


def use_measured(rows: pd.DataFrame, measured: str) -> pd.DataFrame:
    """``rows`` with ``score_after_drop`` / ``score_before``: the measured column ``measured`` (and the
    intact model's) oriented so that higher is better (an NLL is negated). Targets, fitting and every
    choice metric (regret, top-1, Spearman) read these; the input is not changed."""
    if measured not in MEASURED:
        raise bad_choice("measured", measured, MEASURED)
    before, higher = MEASURED[measured]
    need = [measured, before]
    if not set(need) <= set(rows.columns):
        raise BadInputError(f"The 'measured' parameter {measured!r} needs columns {need}, which these rows lack; "
                            f"expected rows from `{HOW_MEASURED.get(measured, 'collect')}`.")
    sign = 1.0 if higher else -1.0
    return rows.assign(score_after_drop=sign * rows[measured], score_before=sign * rows[before])


def fit_bundle(rows: pd.DataFrame, model_type: str = "rf", features: Sequence[str] = DEFAULT_SIGNALS,
               feature_norm: str = "zscore", target: str = "retention_z", seed: int = 0,
               cv: dict | None = None, measured: str = "acc_after_drop") -> FusionBundle:
    """Fit one fusion model on all ``rows`` (target computed from the measured column ``measured``)."""
    if model_type not in FUSION_MODELS:
        raise bad_choice("model_type", model_type, FUSION_MODELS)
    if feature_norm not in NORMALISATIONS:
        raise bad_choice("feature_norm", feature_norm, NORMALISATIONS)
    if target not in TARGETS:
        raise bad_choice("target", target, TARGETS)
    features = list(features)
    check_columns(rows, features)
    rows = use_measured(rows, measured)
    est = FUSION_MODELS[model_type](seed)
    if model_type in GROUPED_MODELS:
        x, y, qid = design_matrix(rows, features, feature_norm, target, groups=True)
        est.fit(x, y, qid=qid)
    else:
        x, y = design_matrix(rows, features, feature_norm, target)
        est.fit(x, y)
    sources = (_fill_walk(rows)[state_keys(rows)].drop_duplicates().groupby(["source_model", "dataset"]).size()
               .reset_index(name="states").to_dict("records"))
    return FusionBundle(est, model_type, features, feature_norm, target, sources, cv or {}, _fusion_versions(),
                        time.strftime("%Y-%m-%dT%H:%M:%S"), measured=measured)


def fit_selected(rows: pd.DataFrame, model_type: str = "rf", features: Sequence[str] = DEFAULT_SIGNALS,
                 feature_norm: str = "auto", target: str = "auto", measured: str = "acc_after_drop",
                 seed: int = 0, record_cv: bool = False) -> FusionBundle:
    """What ``fit-fusion`` does: pick the feature normalisation and target by leave-one-dataset-out
    regret ("auto"; ties: higher Spearman), then fit on all ``rows``; the grid is recorded in the
    bundle's ``cv``. Rows from one dataset cannot be cross-validated: "auto" is then zscore /
    retention_z. ``record_cv`` cross-validates (and records) a fixed setting too."""
    features = list(features)
    check_columns(rows, features)
    labelled = use_measured(rows, measured)  # every metric below (regret, LODO) is then in this measure
    norms = list(NORMALISATIONS) if feature_norm == "auto" else [feature_norm]
    targets = list(TARGETS) if target == "auto" else [target]
    cv: dict = {}
    if rows["dataset"].nunique() >= 2 and (len(norms) > 1 or len(targets) > 1 or record_cv):
        grid = leave_one_dataset_out(labelled, [model_type], norms, targets, features, seed=seed)
        fus = grid[grid.method == f"fusion-{model_type}"]
        means = fus.groupby(["feature_norm", "target"])[["regret", "spearman", "top1"]].mean().reset_index()
        best = means.sort_values(["regret", "spearman"], ascending=[True, False]).iloc[0]
        feature_norm, target = str(best.feature_norm), str(best.target)
        cv = {"scheme": "leave-one-dataset-out", "selection": "lowest mean regret, then highest Spearman",
              "grid": means.to_dict("records"), "chosen": {"feature_norm": feature_norm, "target": target}}
    elif len(norms) > 1 or len(targets) > 1:
        feature_norm, target = "zscore", "retention_z"
        cv = {"scheme": "none: rows from one dataset", "chosen": {"feature_norm": feature_norm, "target": target}}
    return fit_bundle(rows, model_type, features, feature_norm, target, seed, cv, measured=measured)


def fit_fusion(data: Sequence[str | Path], output: str | Path, model_type: str = "rf",
               extras: Sequence[str] = (), feature_norm: str = "auto", target: str = "auto",
               measured: str = "acc_after_drop", seed: int = 0, report: str | Path | None = None,
               overwrite: bool = False) -> tuple[FusionBundle, pd.DataFrame, dict | None]:
    """``fusionprune fit-fusion``: fit a bundle on the rows tables ``data`` (globs allowed), save it to
    ``output`` and, with ``report``, the leave-one-dataset-out report (JSON, a plot beside it).
    Returns (bundle, rows, report or None)."""
    if model_type not in FUSION_MODELS:  # the registry: a new model needs no CLI edit
        raise bad_choice("model_type", model_type, FUSION_MODELS)
    rows = read_rows(data)
    bundle = fit_selected(rows, model_type, [*DEFAULT_SIGNALS, *extras], feature_norm, target, measured, seed,
                          record_cv=report is not None)
    bundle.save(output, overwrite)
    rep = None
    if report is not None:
        from fusion_prune.report import plot_lodo
        from fusion_prune.utils import write_json_atomic

        rep = lodo_report(rows, bundle, seed)
        write_json_atomic(report, rep)
        plot_lodo(pd.DataFrame(rep["per_dataset"]), Path(report).with_suffix(".png"))
    return bundle, rows, rep


def lodo_report(rows: pd.DataFrame, bundle: FusionBundle, seed: int = 0) -> dict:
    """Leave-one-dataset-out of every registered model type in ``bundle``'s configuration, beside the
    best single signal and consensus, with each model's importances: ``fit-fusion --report``."""
    n = rows["dataset"].nunique()
    if n < 2:
        raise BadInputError(f"The '--report' option needs rows from at least 2 datasets. Got {n}.")
    f, norm, tgt, measured = bundle.features, bundle.feature_norm, bundle.target, bundle.measured
    table = leave_one_dataset_out(use_measured(rows, measured), list(FUSION_MODELS), [norm], [tgt], f, seed=seed)
    imp = {mt: importances(fit_bundle(rows, mt, f, norm, tgt, seed, measured=measured)) for mt in FUSION_MODELS}
    summary = table.groupby("method")[["spearman", "top1", "regret"]].mean()
    out = {"feature_norm": norm, "target": tgt, "measured": measured, "selection": bundle.cv,
           "per_dataset": table.to_dict("records"), "mean": summary.reset_index().to_dict("records"),
           "importances": imp}
    if rows["source_model"].nunique() >= 2:  # rows of several model families: can one teach the other?
        fam = leave_one_out(use_measured(rows, measured), "family", list(FUSION_MODELS), [norm], [tgt], f, seed=seed)
        out["per_family"] = fam.to_dict("records")
    return out


def choice_metrics(rows: pd.DataFrame, scorer: Callable[[pd.DataFrame], np.ndarray]) -> dict:
    """Mean over states of Spearman(score, measured), top-1 hit and regret of the top-scored layer.

    ``scorer(state) -> (n_layers,)`` removability; higher means "drop this one".
    """
    from scipy.stats import spearmanr

    rho, top1, regret = [], [], []
    for _, state in iter_states(rows):
        score = np.asarray(scorer(state), dtype=np.float64)
        acc = state["score_after_drop"].to_numpy(dtype=np.float64)
        chosen = acc[int(np.argmax(score))]
        top1.append(float(chosen == acc.max()))
        regret.append(float(acc.max() - chosen))
        if np.ptp(acc) > 0 and np.ptp(score) > 0:
            rho.append(float(spearmanr(score, acc).statistic))
    return {"spearman": float(np.mean(rho)) if rho else float("nan"), "top1": float(np.mean(top1)),
            "regret": float(np.mean(regret)), "states": len(top1)}


def baseline_metrics(rows: pd.DataFrame, features: Sequence[str] = DEFAULT_SIGNALS) -> dict:
    """The three metrics for every single signal (with its rule) and for consensus."""
    from signals.rules import consensus_removability, signal_removability

    features = [f for f in features if f in SIGNALS]  # extra feature columns have no rule of their own
    out = {"signals": {n: choice_metrics(rows, lambda s, n=n: signal_removability(s, n)) for n in features}}
    out["consensus"] = choice_metrics(rows, lambda s: consensus_removability(s, features))
    return out


def best_signal(rows: pd.DataFrame, features: Sequence[str] = DEFAULT_SIGNALS) -> str:
    """The single signal (by its rule) with the lowest mean regret on ``rows``; ties: higher Spearman."""
    m = baseline_metrics(rows, features)["signals"]
    return min(m, key=lambda n: (m[n]["regret"], -np.nan_to_num(m[n]["spearman"])))


def evaluate_bundle(bundle: FusionBundle, rows: pd.DataFrame) -> dict:
    """The bundle's choice metrics on ``rows`` beside every single signal and consensus; ``unseen``
    names the model families and datasets of ``rows`` the bundle was not fitted on (rows of an unseen
    family make this a leave-one-family-out score)."""
    check_columns(rows, bundle.features)
    fams = {s["source_model"] for s in bundle.sources}
    sets = {s["dataset"] for s in bundle.sources}
    unseen = {"families": sorted(set(rows["source_model"]) - fams), "datasets": sorted(set(rows["dataset"]) - sets)}
    return {"fusion": choice_metrics(rows, bundle.predict), **baseline_metrics(rows, bundle.features),
            "states": count_states(rows), "unseen": unseen}


#: What a leave-one-out fold holds out: a dataset (the new-data question) or a model family
#: (``source_model``: a bundle learned on minilm rows, scored on mpnet rows and back).
HOLD_OUT = {"dataset": "dataset", "family": "source_model"}
_HOLD_OUT_NOUN = {"dataset": "datasets", "family": "model families (column 'source_model')"}


def leave_one_out(rows: pd.DataFrame, by: str = "dataset", model_types: Sequence[str] = ("linear", "rf", "xgb"),
                  feature_norms: Sequence[str] = ("zscore",), targets: Sequence[str] = ("retention_z",),
                  features: Sequence[str] = DEFAULT_SIGNALS, seed: int = 0) -> pd.DataFrame:
    """For each held-out group (``by``: "dataset" or "family"), fusion variants fitted on the other
    groups against the baselines; one row per (group, method) with Spearman, top-1 and regret.

    ``best-signal`` is the single signal with the lowest mean regret on the *training* groups of
    the fold (ties: higher Spearman), evaluated on the held-out one.
    """
    if by not in HOLD_OUT:
        raise bad_choice("by", by, HOLD_OUT)
    col = HOLD_OUT[by]
    groups = sorted(rows[col].unique())
    if len(groups) < 2:
        raise BadInputError(f"Leave-one-{by}-out needs rows from at least 2 {_HOLD_OUT_NOUN[by]}. Got {groups}.")
    out = []
    for held in groups:
        train, test = rows[rows[col] != held], rows[rows[col] == held]
        for mt in model_types:
            for norm in feature_norms:
                for tgt in targets:
                    b = fit_bundle(train, mt, features, norm, tgt, seed)
                    out.append({"held_out": held, "method": f"fusion-{mt}", "feature_norm": norm, "target": tgt,
                                **choice_metrics(test, b.predict)})
        best = best_signal(train, features)
        base_test = baseline_metrics(test, features)
        out.append({"held_out": held, "method": "best-signal", "signal": best, **base_test["signals"][best]})
        out.append({"held_out": held, "method": "consensus", **base_test["consensus"]})
    return pd.DataFrame(out)


def leave_one_dataset_out(rows: pd.DataFrame, model_types: Sequence[str] = ("linear", "rf", "xgb"),
                          feature_norms: Sequence[str] = ("zscore",), targets: Sequence[str] = ("retention_z",),
                          features: Sequence[str] = DEFAULT_SIGNALS, seed: int = 0) -> pd.DataFrame:
    """:func:`leave_one_out` by dataset: how a bundle does on data it has never seen."""
    return leave_one_out(rows, "dataset", model_types, feature_norms, targets, features, seed)


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
