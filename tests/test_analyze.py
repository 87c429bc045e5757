"""fusionprune analyze: every method's layer ranking, equal to what `signals` and the labels give."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fusion_prune.analyze import analyze
from fusion_prune.cli import main
from fusion_prune.data import load_dataset
from fusion_prune.data import subsample
from fusion_prune.dropone import drop_one_accuracy
from fusion_prune.models import load_classifier
from signals import DEFAULT_SIGNALS

from conftest import train_tiny_classifier


@pytest.fixture(scope="module")
def teacher(sentiment_csv_dir, tmp_path_factory):
    """A trained 4-layer tiny classifier."""
    return train_tiny_classifier(tmp_path_factory.mktemp("analyze"), sentiment_csv_dir, layers=4)


def test_numbers_equal_signals_and_labels_for_the_same_inputs(teacher, sentiment_csv_dir, bundle_path, tmp_path):
    a = analyze(str(teacher), str(sentiment_csv_dir), samples=32, measure=True, drop_one_samples=30,
                fusion=bundle_path, max_length=16, extras=["activation_patching"], progress=False)
    # the signals: what `fusionprune signals` writes for the same model, sample and settings
    res = CliRunner().invoke(main, ["signals", "-m", str(teacher), "-d", str(sentiment_csv_dir), "--samples", "32",
                                    "--max-length", "16", "--extra", "activation_patching",
                                    "-o", str(tmp_path / "s.parquet")])
    assert res.exit_code == 0, res.output
    ref = pd.read_parquet(tmp_path / "s.parquet")
    cols = [*DEFAULT_SIGNALS, "activation_patching"]
    np.testing.assert_allclose(a.table[cols].to_numpy(), ref[cols].to_numpy(), rtol=1e-6, atol=1e-9)
    # what the report says of the rankings: flagged where the measurement disagrees, or unmeasured
    assert "Unmeasured rankings" not in a.markdown()
    for meth in a.ranks.columns:
        first = int(a.ranks[meth].to_numpy().argmin())
        assert (f"`{meth}` (layer {int(a.table['orig_layer'].iloc[first])}: measured rank"
                in a.markdown()) == (meth != "measured" and a.ranks["measured"].iloc[first] > 2)
    unmeasured = analyze(str(teacher), str(sentiment_csv_dir), samples=32, fusion=None, max_length=16, progress=False)
    assert "Unmeasured rankings" in unmeasured.markdown()
    # the measured reference: the drop-one labels collect and compress compute
    data = load_dataset(str(sentiment_csv_dir))
    net, tok, _ = load_classifier(str(teacher), data.labels)
    lab = drop_one_accuracy(net, tok, subsample(data.validation, 30, 0), data.labels, batch_size=32,
                          max_length=16).table
    np.testing.assert_allclose(a.table["acc_after_drop"], lab.sort_values("layer")["acc_after_drop"])
    # ranks follow the scores; the measured method removes the layer of best drop-one accuracy first
    assert set(a.ranks.columns) >= {*cols, "consensus", "fusion", "measured"}
    for m in a.ranks.columns:
        assert a.ranks[m].iloc[int(a.removability[m].to_numpy().argmax())] == 1
        assert sorted(a.ranks[m]) == [1, 2, 3, 4]
    best = lab.sort_values(["acc_after_drop", "loss_after_drop"], ascending=[False, True])["layer"].iloc[0]
    assert a.ranks["measured"].iloc[int(best)] == 1
    from fusion_prune.fusion import load_bundle

    np.testing.assert_allclose(a.removability["fusion"], load_bundle(bundle_path).predict(ref))
    # agreement: symmetric, ones on the diagonal (for methods that rank at all)
    m = a.agreement.to_numpy()
    finite = np.isfinite(np.diag(m))
    np.testing.assert_allclose(np.diag(m)[finite], 1.0)
    np.testing.assert_allclose(np.nan_to_num(m), np.nan_to_num(m.T))


def test_cli_writes_the_report(teacher, sentiment_csv_dir, bundle_path, tmp_path):
    out = tmp_path / "a"
    res = CliRunner().invoke(main, ["analyze", "-m", str(teacher), "-d", str(sentiment_csv_dir), "--samples", "32",
                                    "--max-length", "16", "--extras", "none", "--measure", "--drop-one-samples", "30",
                                    "--fusion", str(bundle_path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "first layer to remove" in res.output
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"analysis.md", "analysis.parquet", "agreement.csv", "plots/signals.png", "plots/ranks.png",
            "plots/agreement.png"} <= set(names)
    md = (out / "analysis.md").read_text()
    assert "## Consensus and fusion side by side" in md and "Spearman with measured" in md
    assert "Every method's first layer is among the two best" in md or "Disagrees with the measurement" in md
    wide = pd.read_parquet(out / "analysis.parquet")
    assert len(wide) == 4 and "rank_consensus" in wide and "rank_measured" in wide
    # again without --overwrite: refused, untouched
    again = CliRunner().invoke(main, ["analyze", "-m", str(teacher), "-d", str(sentiment_csv_dir), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_an_untrained_head_is_refused_in_one_line(tiny_base_model, sentiment_csv_dir, tmp_path):
    res = CliRunner().invoke(main, ["analyze", "-m", str(tiny_base_model), "-d", str(sentiment_csv_dir),
                                    "-o", str(tmp_path / "a"), "--max-length", "16"])
    assert res.exit_code == 2 and "no classification head trained" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


def test_analyze_computes_the_extras_worth_their_cost_unless_told(monkeypatch, tmp_path):
    """mc_dropout and layer_conductance (14x and 22x the pass, the worst rankers) only on request."""
    import fusion_prune.analyze as an
    from fusion_prune.cli import main
    from click.testing import CliRunner
    from signals import SIGNALS, DEFAULT_SIGNALS, analysis_extras

    assert analysis_extras() == ["block_influence", "activation_patching"]
    seen = []

    class Stop(Exception):
        pass

    def fake(model, dataset, *, extras=None, **kw):
        seen.append(extras)
        raise Stop

    monkeypatch.setattr(an, "analyze", fake)
    for flag, expected in ((None, None), ("all", [n for n in SIGNALS if n not in DEFAULT_SIGNALS]), ("none", []),
                           ("mc_dropout", ["mc_dropout"])):
        args = ["analyze", "-m", "x", "-d", "y", "-o", str(tmp_path / "a")] + (["--extras", flag] if flag else [])
        res = CliRunner().invoke(main, args)
        assert isinstance(res.exception, Stop), res.output
        assert seen[-1] == expected
