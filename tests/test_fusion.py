"""Fusion models: fitting, transfer across datasets, bundles and their errors, the CLI."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fusion_prune import fusion as F
from fusion_prune.cli import main
from fusion_prune.errors import BadInputError
from signals.rules import consensus_removability, signal_removability
from signals import DEFAULT_SIGNALS


def synthetic_rows(datasets=("a", "b", "c", "d"), states=6, seed=0) -> pd.DataFrame:
    """States whose measured accuracy after a drop depends on two signals jointly.

    Removing a layer hurts in proportion to grad_norm + attn_entropy (within the state); every
    dataset has its own raw scale, which only per-state normalisation can see through.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for d_i, d in enumerate(datasets):
        scale = 10.0 ** d_i
        for step in range(states):
            n = 6 - step % 4
            sig = {c: rng.normal(size=n) * scale + scale for c in DEFAULT_SIGNALS}
            z = lambda x: (x - x.mean()) / x.std()
            harm = z(sig["grad_norm"]) + z(sig["attn_entropy"])
            acc = 0.8 - 0.05 * harm + rng.normal(scale=0.005, size=n)
            for l in range(n):
                rows.append({"source_model": "m", "dataset": d, "step": step, "layer": l, "orig_layer": l,
                             "n_layers": n, "acc_before": 0.85, "acc_after_drop": acc[l], "loss_after_drop": 1 - acc[l],
                             **{c: sig[c][l] for c in DEFAULT_SIGNALS}})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows()


def test_registry_has_the_four_models():
    assert set(F.FUSION_MODELS) == {"linear", "rf", "xgb", "xgb-rank"}
    assert F.GROUPED_MODELS == {"xgb-rank"}
    with pytest.raises(ValueError, match="registered twice"):
        F.register_fusion_model("rf", codec="forest")(lambda seed: None)
    with pytest.raises(ValueError, match="unknown codec 'pickle'"):
        F.register_fusion_model("new", codec="pickle")(lambda seed: None)
    assert set(F.FUSION_CODECS) == set(F.FUSION_MODELS)


@pytest.mark.parametrize("model_type", ["linear", "rf", "xgb", "xgb-rank"])
def test_fusion_learns_a_two_signal_rule_and_transfers(rows, model_type):
    train, held = rows[rows.dataset != "d"], rows[rows.dataset == "d"]
    b = F.fit_bundle(train, model_type, feature_norm="zscore", target="retention_z")
    fusion = F.choice_metrics(held, b.predict)
    singles = F.baseline_metrics(held)["signals"]
    assert fusion["spearman"] > 0.7 and fusion["regret"] < 0.02
    assert fusion["regret"] < min(m["regret"] for m in singles.values())
    assert fusion["spearman"] > max(m["spearman"] for m in singles.values())


def test_metrics_by_hand():
    state = pd.DataFrame({"source_model": "m", "dataset": "x", "step": 0, "layer": [0, 1, 2],
                          "acc_before": 0.9, "acc_after_drop": [0.5, 0.8, 0.7]})
    perfect = F.choice_metrics(state, lambda s: s["acc_after_drop"].to_numpy())
    assert perfect == {"spearman": pytest.approx(1.0), "top1": 1.0, "regret": 0.0, "states": 1}
    worst = F.choice_metrics(state, lambda s: -s["acc_after_drop"].to_numpy())
    assert worst["top1"] == 0.0 and worst["regret"] == pytest.approx(0.3) and worst["spearman"] == pytest.approx(-1)


def test_single_signal_rules_and_consensus_by_hand():
    t = pd.DataFrame({c: [1.0, 2.0, 3.0] for c in DEFAULT_SIGNALS})
    # prune_lowest: the lowest value is the most removable; prune_highest: the highest.
    assert signal_removability(t, "act_energy").tolist() == [-1.0, -2.0, -3.0]
    assert signal_removability(t, "attn_entropy").tolist() == [1.0, 2.0, 3.0]
    # 10 signals say layer 0 is least important, 2 say layer 2 is: consensus importance
    # = (10 * [0, .5, 1] + 2 * [1, .5, 0]) / 12
    assert consensus_removability(t).tolist() == pytest.approx([-2 / 12, -0.5, -10 / 12])


def test_per_state_normalisation_sees_through_scale(rows):
    x, y = F.design_matrix(rows, DEFAULT_SIGNALS, "zscore", "retention_z")
    assert x.shape == (len(rows), 12) and abs(x.mean()) < 1e-9
    r, _ = F.design_matrix(rows, DEFAULT_SIGNALS, "rank", "retention")
    assert r.min() == 0 and r.max() == 1


@pytest.mark.parametrize("model_type", ["linear", "rf", "xgb", "xgb-rank"])
def test_bundle_round_trip_and_prediction_api(rows, tmp_path, model_type):
    """Saved as arrays and JSON and read back without pickle: the same predictions, bit for bit."""
    import zipfile

    b = F.fit_bundle(rows, model_type)
    path = b.save(tmp_path / "f.npz")
    assert zipfile.is_zipfile(path) and not list(tmp_path.glob(".f.npz.*"))  # no temp file left
    loaded = F.load_bundle(path)
    assert type(loaded.estimator) is not type(b.estimator) or model_type.startswith("xgb")  # rebuilt from arrays
    for _, state in F.iter_states(rows):
        np.testing.assert_array_equal(loaded.predict(state), b.predict(state))
        assert loaded.choose(state) == b.choose(state)
    assert loaded.features == list(DEFAULT_SIGNALS) and loaded.sources[0]["states"] == 6
    assert set(loaded.versions) == {"fusionprune", "scikit-learn", "xgboost"}
    assert F.importances(loaded) == pytest.approx(F.importances(b))
    assert loaded.describe() == json.loads(json.dumps(b.describe(), default=float))
    assert F.load_bundle(loaded.save(tmp_path / "again.npz")).describe() == loaded.describe()


def test_shipped_bundle_is_pickle_free():
    import zipfile

    with zipfile.ZipFile(F.DEFAULT_BUNDLE) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    bundle = F.load_bundle()
    assert bundle.model_type == "rf" and bundle.features == list(DEFAULT_SIGNALS)


class _Payload:
    """Unpickling this runs ``open(target, "w")``: what a crafted bundle could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_pickle_runs_nothing_unless_trusted(rows, tmp_path):
    evil, witness = tmp_path / "evil.joblib", tmp_path / "pwned"
    joblib.dump(_Payload(witness), evil)
    renamed = tmp_path / "evil.npz"  # the name does not matter: the bytes say pickle
    renamed.write_bytes(evil.read_bytes())
    for path in (evil, renamed):
        with pytest.raises(BadInputError, match="is a pickle .* --trust-pickle"):
            F.load_bundle(path)
    assert not witness.exists()
    rows.to_parquet(tmp_path / "r.parquet")
    res = CliRunner().invoke(main, ["evaluate-fusion", "--fusion", str(evil), "--data", str(tmp_path / "r.parquet")])
    assert res.exit_code == 2 and "--trust-pickle" in res.stderr and not witness.exists()
    # An .npz holding an object array is a pickle inside a zip: np.load refuses it unopened.
    np.savez(tmp_path / "obj.npz", meta=np.array([_Payload(witness)], dtype=object))
    with pytest.raises(BadInputError, match="unreadable archive"):
        F.load_bundle(tmp_path / "obj.npz")
    assert not witness.exists()


def test_an_old_pickle_bundle_loads_when_trusted(rows, tmp_path):
    old = F.fit_bundle(rows, "linear")
    old.format = F.PICKLE_FORMAT  # what fusionprune wrote before bundle format 2
    joblib.dump(old, tmp_path / "old.joblib")
    loaded = F.load_bundle(tmp_path / "old.joblib", trust_pickle=True)
    state = rows[(rows.dataset == "a") & (rows.step == 0)]
    np.testing.assert_array_equal(loaded.predict(state), old.predict(state))
    assert F.load_bundle(loaded.save(tmp_path / "new.npz")).choose(state) == old.choose(state)


def test_version_drift_warns(rows, tmp_path):
    b = F.fit_bundle(rows, "linear")
    b.versions["scikit-learn"] = "0.1"
    b.save(tmp_path / "old.npz")
    with pytest.warns(UserWarning, match=r"scikit-learn 0.1 \(now"):
        F.load_bundle(tmp_path / "old.npz")


def test_not_a_bundle_and_wrong_columns(rows, tmp_path):
    (tmp_path / "junk.npz").write_text("certainly not a bundle")
    with pytest.raises(BadInputError, match="is not a fusionprune fusion bundle"):
        F.load_bundle(tmp_path / "junk.npz")
    joblib.dump({"a": 1}, tmp_path / "dict.joblib")
    with pytest.raises(BadInputError, match="not a fusionprune fusion bundle .*the pickle holds a dict"):
        F.load_bundle(tmp_path / "dict.joblib", trust_pickle=True)
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(BadInputError, match="without bundle metadata"):
        F.load_bundle(tmp_path / "plain.npz")
    meta = np.frombuffer(json.dumps({"format": "something/9"}).encode(), dtype=np.uint8)
    np.savez(tmp_path / "other.npz", meta=meta)
    with pytest.raises(BadInputError, match="format 'something/9'"):
        F.load_bundle(tmp_path / "other.npz")
    with pytest.raises(BadInputError, match="does not exist"):
        F.load_bundle(tmp_path / "missing.npz")
    b = F.fit_bundle(rows, "linear")
    with pytest.raises(BadInputError, match=r"trained on feature columns .* lack \['repr_angular'\]"):
        b.predict(rows.drop(columns=["repr_angular"]))


def test_lodo_names_best_signal_from_training_folds(rows):
    t = F.leave_one_dataset_out(rows, ["linear"])
    assert set(t.held_out) == {"a", "b", "c", "d"}
    assert set(t.method) == {"fusion-linear", "best-signal", "consensus"}
    assert t[t.method == "best-signal"].signal.notna().all()
    with pytest.raises(BadInputError, match="at least 2 datasets"):
        F.leave_one_dataset_out(rows[rows.dataset == "a"])


def test_leave_one_family_out_in_the_function_the_report_and_evaluate_fusion(rows, tmp_path):
    """Rows of two model families: held out by family, fit-fusion --report adds per_family, and
    evaluate-fusion names the family a bundle never saw."""
    # the second family's rows come from a collect with walks: a NaN walk (older rows) is the oracle's
    two = pd.concat([rows[rows.dataset.isin(["a", "b"])],
                     rows[rows.dataset.isin(["c", "d"])].assign(source_model="other", walk="oracle")])
    assert F.count_states(two) == 24 and len(list(F.iter_states(two))) == 24
    t = F.leave_one_out(two, "family", ["linear"])
    assert set(t.held_out) == {"m", "other"} and set(t.method) == {"fusion-linear", "best-signal", "consensus"}
    # the rule is shared by both families, so a bundle from one picks well on the other
    assert (t[t.method == "fusion-linear"].top1 > 0.5).all()
    with pytest.raises(BadInputError, match="at least 2 model families"):
        F.leave_one_out(rows, "family")
    with pytest.raises(BadInputError, match="by"):
        F.leave_one_out(two, "task")
    runner = CliRunner()
    two[two.source_model == "m"].to_parquet(tmp_path / "m.parquet")
    two[two.source_model == "other"].to_parquet(tmp_path / "other.parquet")
    out, report = tmp_path / "f.npz", tmp_path / "rep.json"
    res = runner.invoke(main, ["fit-fusion", "--data", str(tmp_path / "*.parquet"), "--model-type", "linear",
                               "--feature-norm", "zscore", "--target", "retention_z", "-o", str(out),
                               "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "leave-one-family-out" in res.output
    rep = json.loads(report.read_text())
    assert {r["held_out"] for r in rep["per_family"]} == {"m", "other"}
    F.fit_bundle(two[two.source_model == "m"], "linear").save(tmp_path / "m.npz")
    res = runner.invoke(main, ["evaluate-fusion", "--fusion", str(tmp_path / "m.npz"), "--data",
                               str(tmp_path / "other.parquet")])
    assert res.exit_code == 0, res.output
    assert "families the bundle was not fitted on: other" in res.output


def test_importances(rows):
    imp = F.importances(F.fit_bundle(rows, "rf"))
    assert set(imp) == set(DEFAULT_SIGNALS)
    top2 = sorted(imp, key=imp.get)[-2:]
    assert set(top2) == {"grad_norm", "attn_entropy"}
    coef = F.importances(F.fit_bundle(rows, "linear"))
    assert coef["grad_norm"] < 0 and coef["attn_entropy"] < 0  # both hurt when removed


# --------------------------------------------------------------------------- CLI


def test_fit_and_evaluate_fusion_cli(rows, tmp_path):
    runner = CliRunner()
    for d in "abcd":
        rows[rows.dataset == d].to_parquet(tmp_path / f"rows-{d}.parquet")
    out, report = tmp_path / "f.npz", tmp_path / "lodo.json"
    res = runner.invoke(main, ["fit-fusion", "--data", str(tmp_path / "rows-*.parquet"), "--model-type", "xgb",
                               "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    bundle = F.load_bundle(out)
    assert bundle.cv["scheme"] == "leave-one-dataset-out" and len(bundle.cv["grid"]) == 4 * 3
    assert (bundle.feature_norm, bundle.target) == tuple(bundle.cv["chosen"].values())
    rep = json.loads(report.read_text())
    assert {r["method"] for r in rep["per_dataset"]} >= {"fusion-linear", "fusion-rf", "fusion-xgb", "best-signal",
                                                        "consensus"}
    assert report.with_suffix(".png").stat().st_size > 1000
    res = runner.invoke(main, ["evaluate-fusion", "--fusion", str(out), "--data", str(tmp_path / "rows-d.parquet"),
                               "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert set(m) == {"fusion", "signals", "consensus", "states", "unseen"} and m["states"] == 6
    assert m["unseen"] == {"families": [], "datasets": []}  # d was among the bundle's training rows
    assert set(m["fusion"]) >= {"spearman", "top1", "regret"} and len(m["signals"]) == 12


def test_fusion_cli_bad_input(rows, tmp_path):
    runner = CliRunner()
    rows.to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "junk.npz").write_text("x")
    res = runner.invoke(main, ["evaluate-fusion", "--fusion", str(tmp_path / "junk.npz"), "--data",
                               str(tmp_path / "rows.parquet")])
    assert res.exit_code == 2 and "not a fusionprune fusion bundle" in res.stderr
    rows.drop(columns=["mi_task"]).to_parquet(tmp_path / "fewer.parquet")
    F.fit_bundle(rows, "linear").save(tmp_path / "ok.npz")
    res = runner.invoke(main, ["evaluate-fusion", "--fusion", str(tmp_path / "ok.npz"), "--data",
                               str(tmp_path / "fewer.parquet")])
    assert res.exit_code == 2 and "lack ['mi_task']" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(main, ["fit-fusion", "--data", str(tmp_path / "fewer.parquet"), "-o", str(tmp_path / "n.npz")])
    assert res.exit_code == 2 and "lack ['mi_task']" in res.stderr and not (tmp_path / "n.npz").exists()
    res = runner.invoke(main, ["fit-fusion", "--data", str(tmp_path / "nothing-*.parquet"), "-o", str(tmp_path / "n.npz")])
    assert res.exit_code == 2 and "matches no file" in res.stderr
    res = runner.invoke(main, ["fit-fusion", "--data", str(tmp_path / "junk.npz"), "-o", str(tmp_path / "n.npz")])
    assert res.exit_code == 2 and "The rows lack columns" in res.stderr


def test_lodo_markdown_one_row_per_method_with_means():
    import pandas as pd

    res = pd.DataFrame([dict(held_out=d, method=m, regret=r, top1=t, spearman=0.5)
                        for d, m, r, t in [("a", "x", 0.01, 1.0), ("b", "x", 0.03, 0.0), ("a", "y", 0.0, 1.0),
                                           ("b", "y", 0.0, 1.0)]])
    md = F.lodo_markdown(res, spearman=True).splitlines()
    assert md[0] == "| method | a | b | mean regret / top-1 / Spearman |"
    assert md[2] == "| x | 0.0100 / 1.00 | 0.0300 / 0.00 | **0.0200** / 0.50 / 0.50 |"
    assert len(md) == 4 and F.lodo_markdown(res).splitlines()[3].endswith("| **0.0000** / 1.00 |")


def test_lm_rows_are_judged_by_negative_nll(rows, tmp_path):
    """--measured loss_after_drop: the layer of lowest NLL is the best choice; regret is in nats."""
    lm = rows.assign(loss_before=2.0, loss_after_drop=3.0 - rows.acc_after_drop, task="causal-lm")
    used = F.use_measured(lm, "loss_after_drop")
    assert (used.score_after_drop == -lm.loss_after_drop).all() and (used.score_before == -2.0).all()
    assert (used.acc_after_drop == lm.acc_after_drop).all()  # the measured columns are left as they are
    with pytest.raises(BadInputError, match="collect --task causal-lm"):
        F.use_measured(rows, "loss_after_drop")
    lm.to_parquet(tmp_path / "lm.parquet")
    F.fit_bundle(rows, "linear").save(tmp_path / "b.npz")
    res = CliRunner().invoke(main, ["evaluate-fusion", "--fusion", str(tmp_path / "b.npz"), "--data",
                                    str(tmp_path / "lm.parquet"), "--label", "loss_after_drop", "--json"])
    assert res.exit_code == 0, res.output
    by_acc = F.evaluate_bundle(F.load_bundle(tmp_path / "b.npz"), rows)
    assert json.loads(res.stdout)["fusion"] == pytest.approx(by_acc["fusion"])  # same ranking, same regret


def test_the_ranker_is_fitted_per_state(rows, monkeypatch):
    """xgb-rank gets one group id per state, in the order of the rows it learns from."""
    seen = {}
    real = F.FUSION_MODELS["xgb-rank"]

    class Spy:
        def __init__(self, seed):
            self.est = real(seed)

        def fit(self, x, y, qid=None):
            seen["qid"] = qid
            return self.est.fit(x, y, qid=qid)

    monkeypatch.setitem(F.FUSION_MODELS, "xgb-rank", Spy)
    F.fit_bundle(rows, "xgb-rank")
    states = [len(s) for _, s in F.iter_states(rows)]
    assert np.array_equal(seen["qid"], np.repeat(np.arange(len(states)), states))


def test_each_task_has_its_default_bundle(rows, tmp_path, monkeypatch):
    """Each task names its shipped bundle; load_fusion(task=...) loads it; a missing one is one clear error."""
    from fusion_prune.api import load_fusion
    from fusion_prune.tasks import CausalLMTask, ClassificationTask

    assert F.load_bundle().describe() == load_fusion(task="classification").describe()
    assert ClassificationTask.default_bundle == F.DEFAULT_BUNDLE and CausalLMTask.default_bundle.is_file()
    lm = F.fit_bundle(rows, "linear").save(tmp_path / "lm.npz")
    monkeypatch.setattr(CausalLMTask, "default_bundle", lm)
    assert load_fusion(task="causal-lm").model_type == "linear"
    monkeypatch.setattr(CausalLMTask, "default_bundle", tmp_path / "missing.npz")
    with pytest.raises(BadInputError, match="missing.npz' does not exist"):
        load_fusion(task="causal-lm")
    with pytest.raises(BadInputError, match="'task' parameter"):
        load_fusion(task="vision")
