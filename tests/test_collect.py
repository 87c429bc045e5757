"""Collection of fusion rows: columns, greedy choice, determinism and resume."""

from __future__ import annotations

import pandas as pd
import pytest

from fusion_prune.checkpoint import CHECKPOINT_RECORD
from fusion_prune.collect import ROW_KEYS, CollectConfig, collect
from fusion_prune.data import load_dataset
from fusion_prune.errors import BadInputError
from fusion_prune.finetune import FinetuneConfig
from signals import DEFAULT_SIGNALS


@pytest.fixture(scope="module")
def three_layer_model(tmp_path_factory):
    import torch
    from transformers import BertModel

    from conftest import make_tokenizer, tiny_bert_config

    folder = tmp_path_factory.mktemp("tiny3")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(layers=3)).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


def _cfg(**kw):
    base = dict(min_layers=1, finetune_steps=3, signal_samples=32, max_eval_samples=40, max_length=16, batch_size=8,
                lr=1e-3, teacher=FinetuneConfig(epochs=2, batch_size=16, lr=3e-3, max_length=16), progress=False)
    base.update(kw)
    return CollectConfig(**base)


def test_rows_table(three_layer_model, sentiment_csv_dir, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    rows = collect(str(three_layer_model), data, _cfg(), tmp_path / "rows.parquet", dataset_name="toy")
    assert list(rows.columns) == ROW_KEYS + list(DEFAULT_SIGNALS)
    assert pd.read_parquet(tmp_path / "rows.parquet").equals(rows)
    # States at depth 3 and 2 (down to min_layers + 1), one row per layer.
    assert rows.groupby("step").n_layers.first().tolist() == [3, 2] and len(rows) == 5
    assert (rows.dataset == "toy").all() and rows[list(DEFAULT_SIGNALS)].notna().all().all()
    # The next state's layers are the previous ones minus the best-measured layer.
    s0 = rows[rows.step == 0]
    best = s0.sort_values(["acc_after_drop", "loss_after_drop"], ascending=[False, True]).iloc[0].orig_layer
    assert sorted(rows[rows.step == 1].orig_layer) == sorted(set(s0.orig_layer) - {best})
    assert not (tmp_path / "rows.parquet.state").exists()  # the state folder is gone once done


def test_a_top_first_walk_visits_other_states_and_keeps_them_apart(three_layer_model, sentiment_csv_dir, tmp_path):
    """walk="top" drops the deepest layer whatever the labels say; its rows carry walk="top", and
    read_rows keeps its step 1 apart from the oracle's step 1 of the same dataset."""
    from fusion_prune import fusion as F

    data = load_dataset(str(sentiment_csv_dir))
    top = collect(str(three_layer_model), data, _cfg(walk="top"), tmp_path / "top.parquet", dataset_name="toy")
    assert (top.walk == "top").all() and sorted(top[top.step == 1].orig_layer) == [0, 1]
    oracle = top.assign(walk="oracle", step=top.step)  # stand-in for the oracle's rows of the same dataset
    oracle.drop(columns=["walk"]).to_parquet(tmp_path / "old.parquet")  # rows from before walks existed
    rows = F.read_rows([str(tmp_path / "top.parquet"), str(tmp_path / "old.parquet")])
    assert set(rows.walk) == {"top", "oracle"}
    assert len(list(F.iter_states(rows))) == 4  # 2 states per walk, not 2 merged ones
    with pytest.raises(BadInputError, match="'walk' parameter .* Got 'sideways'"):
        _cfg(walk="sideways")


def test_resume_gives_the_same_rows(three_layer_model, sentiment_csv_dir, tmp_path, monkeypatch):
    data = load_dataset(str(sentiment_csv_dir))
    full = collect(str(three_layer_model), data, _cfg(), tmp_path / "a.parquet")
    from fusion_prune import loop as G

    real_step, calls = G.apply_drop, []

    def interrupted(*args, **kwargs):  # the shared pruning step: drop + recovery
        calls.append(1)
        if len(calls) == 2:  # step 0 completes, then stop during step 1's drop and recovery
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(G, "apply_drop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect(str(three_layer_model), data, _cfg(), tmp_path / "b.parquet")
    assert not (tmp_path / "b.parquet").exists() and (tmp_path / "b.parquet.state" / "checkpoint" / CHECKPOINT_RECORD).is_file()
    monkeypatch.setattr(G, "apply_drop", real_step)
    resumed = collect(str(three_layer_model), data, _cfg(), tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(resumed, full)
    # Other arguments cannot resume someone else's state.
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(G, "apply_drop", interrupted)
        calls.clear()
        collect(str(three_layer_model), data, _cfg(), tmp_path / "c.parquet")
    monkeypatch.setattr(G, "apply_drop", real_step)
    with pytest.raises(BadInputError, match="used other arguments"):
        collect(str(three_layer_model), data, _cfg(seed=1), tmp_path / "c.parquet")


def test_bad_min_layers(three_layer_model, sentiment_csv_dir, tmp_path):
    with pytest.raises(BadInputError, match="'min_layers' parameter must be an int >= 1. Got 0"):
        _cfg(min_layers=0)
    data = load_dataset(str(sentiment_csv_dir))
    with pytest.raises(BadInputError, match="must be below the model's depth 3"):
        collect(str(three_layer_model), data, _cfg(min_layers=3), tmp_path / "r.parquet")


def test_recovery_labels_column_and_fitting_on_it(three_layer_model, sentiment_csv_dir, tmp_path):
    """--recovery-steps adds acc_after_recovery; fit-fusion --label learns from it and says so."""
    from click.testing import CliRunner

    from fusion_prune import fusion as F
    from fusion_prune.cli import main

    data = load_dataset(str(sentiment_csv_dir))
    rows = collect(str(three_layer_model), data, _cfg(recovery_steps=2), tmp_path / "rows.parquet", dataset_name="a")
    assert list(rows.columns) == ROW_KEYS + ["acc_after_recovery"] + list(DEFAULT_SIGNALS)
    assert rows.acc_after_recovery.between(0, 1).all() and len(rows) == 3 + 2
    both = pd.concat([rows, rows.assign(dataset="b")])
    both.to_parquet(tmp_path / "both.parquet")
    relabelled = F.use_measured(both, "acc_after_recovery")
    assert (relabelled.score_after_drop == both.acc_after_recovery).all()
    assert (relabelled.acc_after_drop == both.acc_after_drop).all()  # the measured columns are left as they are
    bundle = tmp_path / "b.npz"
    res = CliRunner().invoke(main, ["fit-fusion", "--data", str(tmp_path / "both.parquet"), "-o", str(bundle),
                                    "--label", "acc_after_recovery", "--feature-norm", "zscore",
                                    "--target", "retention_z"])
    assert res.exit_code == 0, res.output
    assert F.load_bundle(bundle).describe()["measured"] == "acc_after_recovery"
    # rows without the column: one line naming what to do
    with pytest.raises(BadInputError, match="--recovery-steps"):
        F.use_measured(both.drop(columns="acc_after_recovery"), "acc_after_recovery")
    with pytest.raises(BadInputError, match="recovery_steps"):
        _cfg(recovery_steps=-1)


def test_extra_signals_from_collect_to_fit_fusion_to_compress(three_layer_model, sentiment_csv_dir, tmp_path):
    """collect --extra adds the column, fit-fusion --extra learns from it, compress computes it again."""
    from click.testing import CliRunner

    from fusion_prune import fusion as F
    from fusion_prune.cli import main
    from fusion_prune.loop import CompressConfig, compress_with_config as compress

    data = load_dataset(str(sentiment_csv_dir))
    rows = collect(str(three_layer_model), data, _cfg(extra_signals=("activation_patching",)),
                   tmp_path / "rows.parquet", dataset_name="a")
    assert list(rows.columns) == ROW_KEYS + list(DEFAULT_SIGNALS) + ["activation_patching"]
    assert rows.activation_patching.notna().all()
    pd.concat([rows, rows.assign(dataset="b")]).to_parquet(tmp_path / "both.parquet")
    bundle = tmp_path / "b.npz"
    fit = ["fit-fusion", "--data", str(tmp_path / "both.parquet"), "--feature-norm", "zscore", "--target", "retention_z"]
    res = CliRunner().invoke(main, [*fit, "-o", str(bundle), "--extra", "activation_patching"])
    assert res.exit_code == 0, res.output
    assert F.load_bundle(bundle).features == [*DEFAULT_SIGNALS, "activation_patching"]
    # the loop computes the bundle's extra at every step (else predict would refuse the table)
    report = compress(str(three_layer_model), data,
                      CompressConfig.from_options(target_layers=2, strategy="fusion", fusion_path=str(bundle), finetune_steps=1,
                                     signal_samples=16, drop_one_samples=0, max_eval_samples=20, max_length=16,
                                     batch_size=8, distill=None, progress=False,
                                     teacher=FinetuneConfig(epochs=1, batch_size=16, max_length=16),
                                     teacher_margin=0.0),  # a one-epoch teacher: not what this test is about
                      tmp_path / "out")
    assert len(report["kept_layers"]) == 2
    assert "activation_patching" in report["history"][0]["signals"]
    # bad input: one line each, nothing written
    res = CliRunner().invoke(main, [*fit, "-o", str(tmp_path / "c.npz"), "--extra", "mc_dropout"])
    assert res.exit_code == 2 and "lack ['mc_dropout']" in res.output and not (tmp_path / "c.npz").exists()
    with pytest.raises(BadInputError, match=r"'extra_signals' parameter must name opt-in signals, one of \[.*\]. "
                                            r"Got 'act_energy'"):
        _cfg(extra_signals=("act_energy",))
    odd = F.fit_bundle(rows.assign(pos=rows.layer * 1.0), "linear", [*DEFAULT_SIGNALS, "pos"]).save(tmp_path / "o.npz")
    with pytest.raises(BadInputError, match=r"expected signals fusionprune computes.*Got \['pos'\]"):
        compress(str(three_layer_model), data, CompressConfig.from_options(target_layers=2, strategy="fusion",
                                                              fusion_path=str(odd), distill=None, progress=False),
                 tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


def test_collect_many_skips_finished_and_missing_models(three_layer_model, sentiment_csv_dir, tmp_path):
    from fusion_prune.collect import collect_many

    said = []
    spec = str(sentiment_csv_dir)
    files = collect_many({spec: three_layer_model}, _cfg(min_layers=2), tmp_path, log=said.append)
    assert files == [tmp_path / "rows" / f"{sentiment_csv_dir.name}.parquet"] and files[0].is_file()
    stamp = files[0].stat().st_mtime_ns
    again = collect_many({spec: three_layer_model, "bbc-news": tmp_path / "nowhere"}, _cfg(min_layers=2), tmp_path,
                         log=said.append)
    assert again == files and files[0].stat().st_mtime_ns == stamp  # finished: not collected again
    assert any("no model for bbc-news" in m for m in said)
