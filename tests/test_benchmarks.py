"""The benchmark scripts run on tiny models and count what they claim to count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    # Settled investigations live in benchmarks/archive/ (still runnable, still tested here).
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.is_file():
        path = ROOT / "benchmarks" / "archive" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_speed_flops_match_the_hand_formula(tiny_base_model, tmp_path, capsys):
    speed = _load("speed")
    B, T, h, f = 2, 16, 32, 64  # tiny BERT: hidden 32, ffn 64
    out = tmp_path / "speed.json"
    res = speed.main(["--model", str(tiny_base_model), "--depths", "2,1", "--batch-size", str(B),
                      "--seq-len", str(T), "--repeats", "1", "--warmup", "0", "--out", str(out)])
    # Per layer: Q, K, V, O projections 4*h*h, FFN 2*h*f (multiply-adds: x2), attention scores and
    # weighted sum 2*T*h per token (x2); the pooler adds 2*h*h for the first token of each example.
    per_layer = 2 * B * T * (4 * h * h + 2 * h * f) + 2 * 2 * B * T * T * h
    pooler = 2 * B * h * h
    by_depth = {r["depth"]: r for r in res["rows"]}
    assert by_depth[2]["gflops"] * 1e9 == pytest.approx(2 * per_layer + pooler)
    assert by_depth[1]["gflops"] * 1e9 == pytest.approx(per_layer + pooler)
    assert by_depth[1]["ideal_speedup"] == pytest.approx((2 * per_layer + pooler) / (per_layer + pooler))
    assert json.loads(out.read_text())["rows"][1]["depth"] == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("speedup/ideal: ") and float(last.split()[-1]) > 0


def test_signals_cost_runs_all_modes(tiny_base_model, sentiment_csv_dir, tmp_path, capsys):
    cost = _load("signals_cost")
    out = tmp_path / "cost.json"
    res = cost.main(["--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir), "--batches", "2",
                     "--batch-size", "8", "--max-length", "16", "--out", str(out)])
    assert set(res["modes"]) == {"plain", "fused", "separate"}
    assert all(r["batches"] == 2 and r["seconds"] > 0 for r in res["modes"].values())
    assert {"fused/plain time", "separate/plain time", "fused/plain peak memory"} <= set(res)
    assert json.loads(out.read_text())["fused/plain time"] == res["fused/plain time"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("signals/plain ratio: ")


def test_signals_cost_times_one_extra_signal(tiny_base_model, sentiment_csv_dir, tmp_path):
    cost = _load("signals_cost")
    res = cost.main(["--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir), "--batches", "1",
                     "--batch-size", "4", "--max-length", "16", "--modes", "plain,activation_patching",
                     "--out", str(tmp_path / "cost.json")])
    assert set(res["modes"]) == {"plain", "activation_patching"} and res["activation_patching/plain time"] > 0
    # a feature set: names joined by "+", "12" for the defaults, from one shared capture
    assert cost.set_names("12+activation_patching")[-1] == "activation_patching"
    assert len(cost.set_names("12+activation_patching+weight_norm")) == 13
    res = cost.main(["--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir), "--batches", "1",
                     "--batch-size", "4", "--max-length", "16", "--modes", "plain,weight_norm+weight_entropy",
                     "--out", str(tmp_path / "sets.json")])
    assert res["weight_norm+weight_entropy/plain time"] > 0
    with pytest.raises(SystemExit, match="--modes: expected .*got 'bogus'"):
        cost.main(["--modes", "plain,bogus"])
    with pytest.raises(SystemExit, match="--modes: expected .*got '12\\+bogus'"):
        cost.main(["--modes", "12+bogus"])


def test_labels_cost_runs(tiny_base_model, sentiment_csv_dir, tmp_path, capsys):
    res = _load("labels_cost").main(["--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                                     "--samples", "32", "--batch-size", "8", "--max-length", "16",
                                     "--out", str(tmp_path / "l.json")])
    assert res["identical_accuracies"] and res["ideal_ratio"] == pytest.approx(3 / 4)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("labels cached/naive ratio: ")


def test_compare_runs_every_strategy_and_resumes(tiny_base_model, sentiment_csv_dir, tmp_path):
    """The gpu profile's code path on a tiny config: every strategy, LODO bundles, skip finished cells."""
    import pandas as pd

    from test_fusion import synthetic_rows

    compare = _load("compare")
    rows = tmp_path / "rows.parquet"
    synthetic_rows().to_parquet(rows)
    profile = compare.Profile(str(tiny_base_model), [1], datasets=[str(sentiment_csv_dir)],
                              seeds={"random": [0, 1]}, teacher_samples=200, teacher_epochs=1, teacher_margin=0, finetune_steps=1,
                              signal_samples=16, drop_one_samples=16, distill_samples=32, max_eval_samples=40,
                              max_length=16, batch_size=8, rows=str(rows), paired=True)
    out = tmp_path / "cmp"
    res = compare.run(profile, "tiny", out, log=lambda m: None)
    assert len(res) == len(compare.STRATEGIES) + 1  # random has two seeds
    assert set(res.strategy) == set(compare.STRATEGIES)
    assert list(pd.read_csv(out / "results.csv").columns) == compare.COLUMNS
    assert (res[res.strategy == "best-signal"].resolved_strategy.iloc[0]) in __import__("signals").DEFAULT_SIGNALS
    # fusion-verify: the rf bundle (the shipped configuration, fitted without the dataset) shortlists
    # and the drop-one label decides: its selection measures labels, fusion-rf's does not
    verify = json.loads((out / "reports" / f"{sentiment_csv_dir.name}-l1-fusion-verify-s0.json").read_text())
    assert verify["config"]["strategy"] == "fusion-verify" and verify["config"]["drop_one_samples"] == 16
    assert verify["config"]["fusion_path"].endswith("lodo-rf-without-" + sentiment_csv_dir.name + ".npz")
    # one teacher per dataset, shared by every seed; heavy files under work/, one report per cell kept
    assert len(list((out / "work" / "bundles").glob("*.npz"))) == 3
    assert len([p for p in (out / "work" / "teachers").iterdir() if p.is_dir()]) == 1
    assert len(list((out / "reports").glob("*.json"))) == len(res) and not list((out / "work" / "runs").iterdir())
    # the control (plain fine-tuning for the distillation's steps) runs for fusion-rf only
    assert res[res.strategy == "fusion-rf"].accuracy_ft.notna().all()
    assert res[res.strategy != "fusion-rf"].accuracy_ft.isna().all()
    md = (out / "results.md").read_text()
    assert "| mean rank |" in md and "| fusion-rf minus |" in md and "plain fine-tune" in md
    # paired on shared seeds: fusion-rf and fusion-verify against every single criterion and fixed rule
    for challenger in ("fusion-rf", "fusion-verify"):
        for rival in ("activation_patching", "angular-block", "best-signal", "symmetric", "deepest", "top"):
            assert f"| {challenger} | {rival} | accuracy_kd |" in md
    assert "| fusion-verify | fusion-rf | accuracy |" in md
    assert "| oracle | deepest | accuracy_kd |" in md  # the classifier default against the same rivals
    assert (out / "mean_rank.png").is_file()
    again = compare.run(profile, "tiny", out, log=lambda m: None)  # every cell done: nothing re-runs
    assert len(again) == len(res)
    assert {"cpu", "gpu"} <= set(compare.PROFILES) and compare.PROFILES["gpu"].targets == [6, 4]
    # seed 0 of every strategy on every dataset runs before any extra seed
    cells = compare._cells(compare.Profile("m", [3], datasets=["a", "b"], strategies=["top", "random"],
                                           seeds={"random": [0, 1]}))
    assert [c[3] for c in cells] == [0, 0, 0, 0, 1, 1] and {c[0] for c in cells[:4]} == {"a", "b"}


def test_fusion_lodo_grid(tmp_path):
    from test_fusion import synthetic_rows

    synthetic_rows().to_parquet(tmp_path / "rows.parquet")
    table = _load("fusion_lodo").main(["--data", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "out")])
    assert set(table.variant) == {"12 signals", "12 signals + position", "first half of each trajectory"}
    grid = table[(table.variant == "12 signals") & table.method.str.startswith("fusion")]
    from fusion_prune import fusion as F

    # held-out datasets x models x normalisations x targets
    assert len(grid) == 4 * len(F.FUSION_MODELS) * len(F.NORMALISATIONS) * len(F.TARGETS)
    assert (tmp_path / "out" / "grid.md").read_text().count("| 12 signals |") >= 36


def test_recovery_label_scores_every_choice_by_the_recovered_accuracy():
    """Synthetic recovered label under which the top layer always recovers best: `top` must score
    perfectly and the before-recovery oracle must be judged by the recovered accuracy of its pick."""
    import numpy as np

    from fusion_prune import fusion as F

    rec = _load("recovery_label")
    shipped = F.read_rows([str(F.DEFAULT_BUNDLE.parent / "rows" / "*.parquet")])
    rows = shipped[shipped.n_layers >= 4].copy()
    top = rows.layer == rows.n_layers - 1
    rows["acc_after_recovery"] = np.where(top, 1.0, rows.acc_after_drop * 0.5)
    res = rec.evaluate(rows, shipped).set_index(["held_out", "method"])
    assert set(res.index.get_level_values(0)) == set(rows.dataset)
    for held, part in rows.groupby("dataset"):
        assert res.loc[(held, "top"), "regret"] == 0 and res.loc[(held, "top"), "top1"] == 1
        regrets = []
        for _, s in part.groupby("step"):
            pick = s.sort_values(["acc_after_drop", "loss_after_drop"], ascending=[False, True]).iloc[0]
            regrets.append(1.0 - pick.acc_after_recovery)
        assert res.loc[(held, "oracle before recovery"), "regret"] == pytest.approx(np.mean(regrets))
    assert {"fusion-rf (acc_after_drop)", "fusion-rf (acc_after_recovery)", "fusion-rf (shipped rows)",
            "best-signal", "consensus"} <= set(res.index.get_level_values(1))
    assert "| top |" in F.lodo_markdown(res.reset_index())


def test_recovery_loop_table_pairs_the_arms_on_shared_seeds():
    import pandas as pd

    rec = _load("recovery_label")

    def frame(cells):
        return pd.DataFrame([dict(dataset=d, strategy=s, seed=seed, accuracy=a, accuracy_kd=a)
                             for d, s, seed, a in cells])

    res = {"cpu-recovery": frame([("bbc-news", "fusion-rf", 0, 0.9), ("bbc-news", "fusion-rf", 1, 0.8)]),
           "cpu-recovery-at-once": frame([("bbc-news", "fusion-rf", 0, 0.7)]),
           "cpu": frame([("bbc-news", "fusion-rf", 0, 0.6), ("bbc-news", "fusion-rf", 1, 0.5),
                         ("bbc-news", "top", 0, 0.4), ("bbc-news", "oracle", 0, 1.0)])}
    lines = rec.loop_table(res).splitlines()
    row = {tuple(c.strip() for c in l.split("|")[1:4]): l for l in lines[2:]}
    recovered, at_once, shipped = rec.LOOP_ARMS.values()
    # one pair: no standard error
    assert "+0.2000" in row[(recovered, at_once, "accuracy")] and row[(recovered, at_once, "accuracy")].endswith("| 1 |  |")
    assert "+0.3000" in row[(recovered, shipped, "accuracy")]  # seeds 0 and 1: (0.3 + 0.3) / 2, two pairs
    assert row[(recovered, shipped, "accuracy")].endswith("| 1/1 | 2 | 0.0000 |")  # equal differences: se 0
    assert "+0.5000" in row[(recovered, "top", "accuracy")]
    assert "+0.1000" in row[(at_once, shipped, "accuracy")] and row[(at_once, shipped, "accuracy")].endswith("| 1 |  |")
    assert not any("oracle" in l for l in lines)  # only the arms and top
    assert (at_once, recovered, "accuracy") not in row and len(lines) == 2 + 2 * 5  # no pair twice
    assert rec.loop_table({}) == ""


def test_recovery_profiles_reuse_the_cpu_teachers(tmp_path, monkeypatch):
    compare = _load("compare")
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    existing = tmp_path / "cpu" / "work" / "teachers" / "bbc-news"
    existing.mkdir(parents=True)
    for name, label in (("cpu-recovery", "acc_after_recovery"), ("cpu-recovery-at-once", "acc_after_drop")):
        p = compare.PROFILES[name]
        assert (p.label, p.teachers, p.strategies) == (label, "cpu", ["fusion-rf"])
        assert p.max_length == compare.PROFILES["cpu"].max_length  # same budget as the rows they compare with
        # an existing cpu teacher is returned as is: nothing is trained under the profile's own folder
        assert compare._teacher(p, "bbc-news", None, tmp_path / name / "work") == existing
    assert not (tmp_path / "cpu-recovery").exists()
    assert compare.PROFILES["cpu-kd-unseen"].distill_data == "unseen" and compare.PROFILES["cpu"].distill_data == "all"


def test_carry_assets_roundtrip_restores_float32_weights(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from fusion_prune.assets import asset_dir

    carry = _load("carry_assets")
    monkeypatch.setenv("FUSIONPRUNE_HOME", str(tmp_path / "here"))
    folder = asset_dir("minilm-l6")  # a registered name in a fake cache: no download
    folder.mkdir(parents=True)
    (folder / "asset.json").write_text(json.dumps({"name": "minilm-l6"}))
    (folder / "config.json").write_text('{"x": 1}')
    weights = {"w": torch.randn(256, 256), "ids": torch.arange(5)}
    save_file(weights, str(folder / "model.safetensors"))

    pieces = carry.pack(["minilm-l6"], tmp_path / "gpu", "A", piece_mb=1)
    assert [p.name for p in pieces] == ["A.000"] and pieces[0].stat().st_size < 256 * 256 * 3  # float16 on the way
    monkeypatch.setenv("FUSIONPRUNE_HOME", str(tmp_path / "there"))
    done = carry.unpack(pieces)
    assert [p.name for p in done] == [folder.name]
    back = load_file(str(done[0] / "model.safetensors"))
    assert back["w"].dtype == torch.float32 and torch.equal(back["ids"], weights["ids"])
    assert torch.allclose(back["w"], weights["w"], rtol=2**-10, atol=1e-4)
    assert json.loads((done[0] / "asset.json").read_text())["carried_as"] == "float16"
    assert (done[0] / "config.json").read_text() == '{"x": 1}'
    assert carry.unpack(pieces) == []  # already there: left as it is


def test_compare_extra_signal_strategies_beside_a_baseline(tiny_base_model, sentiment_csv_dir, tmp_path,
                                                          monkeypatch):
    """The cpu-extras path on a tiny config: an extra signal as a strategy, a fusion bundle fitted on
    the 12 signals plus that extra, and the tables showing a baseline profile's rows beside them."""
    import pandas as pd

    from fusion_prune import fusion as F
    from test_fusion import synthetic_rows

    compare = _load("compare")
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    rows = synthetic_rows()
    rows["activation_patching"] = 1.0 - rows.acc_after_drop  # an extra column, as collect --extra writes it
    rows.to_parquet(tmp_path / "rows.parquet")
    dataset = str(sentiment_csv_dir)
    (tmp_path / "base").mkdir()
    base = [dict(profile="base", dataset=dataset, target_layers=1, strategy=s,
                 resolved_strategy=s, seed=0, teacher_accuracy=0.9, accuracy=0.5, accuracy_kd=0.5, accuracy_ft=None,
                 selection_seconds=1.0, wall_seconds=2.0, kept_layers="[0]") for s in ("fusion-rf", "top", "oracle")]
    pd.DataFrame(base, columns=compare.COLUMNS).to_csv(tmp_path / "base" / "results.csv", index=False)
    strategies = ["activation_patching", "fusion-rf+activation_patching"]
    profile = compare.Profile(str(tiny_base_model), [1], datasets=[dataset], strategies=strategies,
                              teacher_samples=200, teacher_epochs=1, teacher_margin=0, finetune_steps=1, signal_samples=16,
                              distill_samples=32, max_eval_samples=40, max_length=16, batch_size=8,
                              rows=str(tmp_path / "rows.parquet"), control=[], baseline="base")
    res = compare.run(profile, "tiny-extras", tmp_path / "extras", log=lambda m: None)
    assert sorted(res.strategy) == sorted(strategies)
    assert set(res.resolved_strategy) == {"activation_patching", "fusion"}
    (bundle,) = (tmp_path / "extras" / "work" / "bundles").glob("*.npz")
    assert bundle.name.endswith("+activation_patching.npz")
    assert "activation_patching" in F.load_bundle(bundle).features
    assert sorted(pd.read_csv(tmp_path / "extras" / "results.csv").strategy) == sorted(strategies)  # only its own
    md = (tmp_path / "extras" / "results.md").read_text()
    assert "| fusion-rf+activation_patching minus |" in md and "| activation_patching minus |" in md
    assert "| oracle |" in md  # the baseline's rows are in the tables
    assert "| challenger | minus | metric |" in md  # and the paired table (shared seeds) with them
    versus = compare.tables(compare.with_baseline(profile, res), compare._challengers(profile))["versus-1"]
    assert "| fusion-rf | accuracy |" in versus and "| top | accuracy |" in versus


def test_compare_passes_hidden_state_matching_to_distillation(tiny_base_model, sentiment_csv_dir, tmp_path):
    """Profile cpu-kd-hidden's path on a tiny config: the distillation of each cell matches hidden
    states (its report records the weight and a hidden loss), beside its plain fine-tuning control."""
    import json

    compare = _load("compare")
    assert compare.PROFILES["cpu-kd-hidden"].hidden_weight == 1.0
    assert compare.PROFILES["cpu-kd-hidden"].distill_data == "unseen" and compare.PROFILES["cpu"].hidden_weight == 0
    # paired with cpu-kd-unseen cell for cell: same datasets and seeds, so the same pruned students
    assert compare._cells(compare.PROFILES["cpu-kd-hidden"]) == compare._cells(compare.PROFILES["cpu-kd-unseen"])
    profile = compare.Profile(str(tiny_base_model), [1], datasets=[str(sentiment_csv_dir)], strategies=["top"],
                              teacher_samples=200, teacher_epochs=1, teacher_margin=0, finetune_steps=1, signal_samples=16,
                              distill_samples=32, max_eval_samples=40, max_length=16, batch_size=8,
                              control=["top"], hidden_weight=1.0)
    res = compare.run(profile, "tiny-hidden", tmp_path / "hidden", log=lambda m: None)
    assert res.accuracy_kd.notna().all() and res.accuracy_ft.notna().all()
    (report,) = (tmp_path / "hidden" / "reports").glob("*.json")
    r = json.loads(report.read_text())
    assert r["config"]["finish"]["distill"]["hidden_weight"] == 1.0 and r["distill"]["config"]["hidden_weight"] == 1.0
    assert r["distill"]["pairs"]  # student layers matched to the teacher layers they came from
    assert r["distill"]["teacher_logits_cached"] is False  # hidden states need the teacher on every step


def test_paired_table_uses_only_the_seeds_both_ran():
    import pandas as pd

    compare = _load("compare")
    acc = {("a", "ap", 0): 0.80, ("a", "ap", 1): 0.90, ("a", "top", 0): 0.70,
           ("b", "ap", 0): 0.60, ("b", "top", 0): 0.65, ("b", "top", 1): 0.10}
    rows = pd.DataFrame([dict(dataset=d, strategy=s, seed=k, accuracy=v, accuracy_kd=v) for (d, s, k), v in acc.items()])
    table = compare.paired_table(rows, ["ap"], ["a", "b"], rivals=("top", "best-signal"))
    # a: seed 0 only (+0.10); b: seed 0 only (-0.05); the unpaired seeds 1 are ignored
    # se of pairs: sd(+0.10, -0.05) / sqrt(2) = 0.075
    assert "| ap | top | accuracy | +0.1000 | -0.0500 | +0.0250 | 1/2 | 2 | 0.0750 |" in table
    assert "best-signal" not in table  # never run: no row


def test_teachers_only_trains_each_teacher_once_and_runs_no_cell(tiny_base_model, sentiment_csv_dir, tmp_path,
                                                                  monkeypatch):
    """benchmarks/gpu_2.sh starts one ``--teachers-only`` job a dataset beside the workers."""
    compare = _load("compare")
    tiny = compare.Profile(str(tiny_base_model), [1], datasets=[str(sentiment_csv_dir)], strategies=["deepest"],
                           teacher_samples=64, teacher_epochs=1, teacher_margin=0, max_eval_samples=20,
                           max_length=16, batch_size=8)
    monkeypatch.setitem(compare.PROFILES, "tiny", tiny)
    out = tmp_path / "cmp"
    done = compare.main(["--profile", "tiny", "--out", str(out), "--teachers-only"])
    teacher = out / "work" / "teachers" / sentiment_csv_dir.name
    assert (teacher / "fusionprune_run.json").is_file() and (teacher / "model.safetensors").is_file()
    assert len(done) == 0 and not (out / "results.csv").exists() and not (out / "reports").exists()
    stamp = (teacher / "model.safetensors").stat().st_mtime_ns
    compare.main(["--profile", "tiny", "--out", str(out), "--teachers-only"])  # there already: kept as it is
    assert (teacher / "model.safetensors").stat().st_mtime_ns == stamp
    # the GPU profile: full data, strong teachers, the oracle first among the leading strategies, seeds 0-2
    gpu2 = compare.PROFILES["gpu-2"]
    assert (gpu2.teacher_samples, gpu2.distill_samples, gpu2.max_eval_samples) == (None, None, None)
    assert gpu2.strategies[0] == "oracle" and gpu2.paired and not gpu2.control
    assert all(gpu2.seeds[s] == [0, 1, 2] for s in gpu2.strategies)
    assert set(gpu2.datasets) == set(compare.DATASETS)


def test_only_seeds_cuts_each_strategys_seeds_and_adds_none():
    compare = _load("compare")
    p = compare.replace(compare.PROFILES["cpu"], strategies=["fusion-rf", "top", "oracle"], datasets=["a"],
                        seeds={"fusion-rf": [0, 1, 2], "top": [0, 1]})  # oracle: default_seeds [0]
    assert compare._cells(compare.only_seeds(p, [2])) == [("a", 3, "fusion-rf", 2)]
    assert sorted(c[2:] for c in compare._cells(compare.only_seeds(p, [0, 1]))) == [
        ("fusion-rf", 0), ("fusion-rf", 1), ("oracle", 0), ("top", 0), ("top", 1)]


def test_versus_table_leaves_out_rivals_that_were_not_run():
    import pandas as pd

    compare = _load("compare")
    rows = [dict(profile="p", dataset=d, target_layers=3, strategy=s, resolved_strategy=s, seed=0,
                 teacher_accuracy=0.9, accuracy=acc, accuracy_kd=acc + 0.01, accuracy_ft=None,
                 selection_seconds=1.0, wall_seconds=2.0, kept_layers="[0, 1, 2]")
            for d, s, acc in [("a", "fusion-rf", 0.8), ("a", "top", 0.7), ("b", "fusion-rf", 0.6), ("b", "top", 0.65)]]
    versus = compare.tables(pd.DataFrame(rows))["versus-3"]
    assert "nan" not in versus and "best-signal" not in versus
    assert "| top | accuracy | +0.1000 | -0.0500 | +0.0250 | 1/2 |" in versus


def test_wide_table_means_over_datasets_only_for_strategies_run_on_every_dataset():
    import pandas as pd

    compare = _load("compare")
    rows = [dict(profile="p", dataset=d, target_layers=3, strategy=s, resolved_strategy=s, seed=k,
                 teacher_accuracy=0.9, accuracy=acc, accuracy_kd=acc + 0.01, accuracy_ft=None,
                 selection_seconds=1.0, wall_seconds=2.0, kept_layers="[0, 1, 2]")
            for d, s, k, acc in [("a", "fusion-rf", 0, 0.8), ("a", "fusion-rf", 1, 0.6), ("b", "fusion-rf", 0, 0.6),
                                 ("a", "top", 0, 0.5)]]
    wide = compare.tables(pd.DataFrame(rows))["wide-3"]
    # fusion-rf: seeds averaged per dataset first (a 0.7, b 0.6), then the datasets: 0.65
    assert "| 0.6500 / 0.6600 |" in wide.splitlines()[5]
    top = next(line for line in wide.splitlines() if line.startswith("| top |"))
    assert top == "| top | 0.5000 / 0.5100 |  |  | 2.00 / 2.00 |"  # one dataset of two: no mean over datasets


def test_extra_signals_evaluation_compares_fusion_with_and_without_extras():
    """Synthetic rows where one extra signal is the label itself: fusion with it and that signal
    alone (rule prune_lowest: the lowest value is dropped) must pick the best layer everywhere."""
    import numpy as np

    from fusion_prune import fusion as F

    ex = _load("extra_signals")
    rows = F.read_rows([str(F.DEFAULT_BUNDLE.parent / "rows" / "*.parquet")])
    rng = np.random.default_rng(0)
    rows = rows.assign(activation_patching=1.0 - rows.acc_after_drop, mc_dropout=rng.random(len(rows)),
                       layer_conductance=rng.random(len(rows)))
    res = ex.evaluate(rows).set_index(["held_out", "method"])
    methods = set(res.index.get_level_values(1))
    assert {"fusion-rf (12 signals)", "fusion-rf (12 + 3 extras)", "fusion-rf (12 + mc_dropout)", "mc_dropout",
            "best-signal (of 12)", "best-signal (of 15)", "consensus (12)"} <= methods
    assert (res.xs("activation_patching", level=1).regret == 0).all()
    assert (res.xs("best-signal (of 15)", level=1).signal == "activation_patching").all()
    assert res.xs("fusion-rf (12 + activation_patching)", level=1).regret.mean() <= \
        res.xs("fusion-rf (12 signals)", level=1).regret.mean()
    # every candidate feature set is fitted and tabled with its cost (here not measured)
    assert {f"set: {n}" for n in ex.FEATURE_SETS} <= methods
    table = ex.feature_set_table(res.reset_index(), cost=Path("/nonexistent.json"))
    assert table.count("| not measured |") == len(ex.FEATURE_SETS) and "| 12 + activation_patching | 13 |" in table


def _tiny_llama_and_corpus(tmp_path: Path) -> tuple[Path, Path]:
    from conftest import make_tokenizer
    from test_causal_lm import prose, tiny_decoder

    model = tmp_path / "tiny-llama"
    tiny_decoder("llama").save_pretrained(model)
    make_tokenizer(model).save_pretrained(model)
    corpus = tmp_path / "story.txt"
    corpus.write_text("\n\n".join(prose(60)))
    return model, corpus


def test_lm_kd_cache_compares_beside_and_top_k(tmp_path, capsys):
    """The top-k cache benchmark on a tiny Llama: every mode distils the same pruned student; the
    cached modes report their cache, and each is set against the teacher-beside mode."""
    model, corpus = _tiny_llama_and_corpus(tmp_path)
    res = _load("lm_kd_cache").main(["--model", str(model), "--corpus", str(corpus), "--drop", "2", "--steps", "2",
                                     "--batch-size", "2", "--max-length", "16", "--max-eval-tokens", "64",
                                     "--top-k", "4", "--out", str(tmp_path / "kd.json")])
    beside, top = res["modes"]["beside"], res["modes"]["top-4"]
    assert beside["cache_bytes"] == 0 and top["cache_bytes"] == 2 * 2 * 16 * (4 * 6 + 4)  # 2 steps x 2 windows, k ids + the tail
    assert all(m["steps"] == 2 and m["perplexity"] > 1 and m["seconds"] > 0 for m in (beside, top))
    assert json.loads((tmp_path / "kd.json").read_text())["modes"]["top-4"]["cache_bytes"] == top["cache_bytes"]
    assert "top-4/beside: time" in capsys.readouterr().out


def test_lm_heal_compares_methods_on_one_pruned_student(tmp_path, capsys):
    """The healing benchmark on a tiny Llama: LoRA, QLoRA and full fine-tuning heal the same pruned
    student; LoRA and QLoRA train the same adapters, full training trains every weight."""
    pytest.importorskip("bitsandbytes")
    model, corpus = _tiny_llama_and_corpus(tmp_path)
    res = _load("lm_heal").main(["--model", str(model), "--corpus", str(corpus), "--drop-layers", "0,2", "--steps", "2",
                                 "--batch-size", "2", "--max-length", "16", "--max-eval-tokens", "64",
                                 "--out", str(tmp_path / "heal.json")])
    m = res["methods"]
    assert set(m) == {"lora", "qlora", "full"}
    assert m["lora"]["trainable_parameters"] == m["qlora"]["trainable_parameters"] < m["full"]["trainable_parameters"]
    assert len({r["pruned_perplexity"] for r in m.values()}) == 1  # one starting point
    assert all(r["steps"] == 2 and r["perplexity"] > 1 for r in m.values())
    saved = json.loads((tmp_path / "heal.json").read_text())
    assert saved["methods"]["qlora"]["steps"] == 2 and saved["drop_layers"] == "0,2"
    assert "qlora/lora: time" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _load("lm_heal").main(["--methods", "lora,dora"])


def test_lm_heal_choice_heals_each_removed_set_once_and_resumes(tmp_path):
    """Healing the choices of an LM profile: two strategies that removed the same layers share one
    healing run (same healed perplexity, named in ``shared_with``), two workers split the sets
    without overlap, and a second call heals nothing."""
    import pandas as pd

    model, corpus = _tiny_llama_and_corpus(tmp_path)
    choice = tmp_path / "choice.csv"
    common = {"dataset": str(corpus), "seed": 0, "target_layers": 2, "teacher_perplexity": 10.0,
              "selection_seconds": 1.0}
    pd.DataFrame([{**common, "strategy": "sleb", "kept_layers": "0 3", "pruned_perplexity": 30.0},
                  {**common, "strategy": "angular-block", "kept_layers": "0 3", "pruned_perplexity": 30.0},
                  {**common, "strategy": "deepest", "kept_layers": "0 1", "pruned_perplexity": 90.0}]).to_csv(choice)
    hc = _load("lm_heal_choice")
    assert hc.removed_layers("0 3", 4) == "1,2"
    args = ["--choice", str(choice), "--model", str(model), "--depth", "4", "--steps", "1", "--max-length", "16",
            "--max-eval-tokens", "64", "--out", str(tmp_path / "out")]
    assert hc.main(args + ["--target-layers", "3"]).empty  # no choice row at that depth: nothing to heal
    first = hc.main(args + ["--worker", "0/2"])  # sleb's set first (the ORDER), then nothing else for worker 0
    assert sorted(first.strategy) == ["angular-block", "sleb"]
    assert hc.main(args + ["--worker", "1/2"]).strategy.tolist() == ["deepest"]
    table = pd.read_csv(tmp_path / "out" / "results.csv").set_index("strategy")
    assert len(table) == 3 and table.loc["sleb", "perplexity"] == table.loc["angular-block", "perplexity"]
    assert table.loc["sleb", "shared_with"] == "angular-block" and table.loc["deepest", "heal_steps"] == 1
    assert (table.perplexity > 1).all() and (table.kept_layers.astype(str) != "").all()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| `deepest` |" in md and "geometric mean healed" in md and "->" in md
    assert hc.main(args).empty  # every row is there: nothing is healed again
    more = pd.read_csv(choice, index_col=0)
    pd.concat([more, more.iloc[[0]].assign(strategy="fusion")]).to_csv(choice)  # a later strategy, sleb's set
    added = hc.main(args)
    assert added.set_index("strategy").loc["fusion", "perplexity"] == table.loc["sleb", "perplexity"]
    assert added.set_index("strategy").loc["fusion", "heal_seconds"] == table.loc["sleb", "heal_seconds"]  # no new run
    assert len(hc.main(["--out", str(tmp_path / "out"), "--summary-only"])) == 4
    with pytest.raises(SystemExit):
        hc.main(args + ["--worker", "2/2"])


def test_lm_heal_choice_summary_of_a_depth_that_lacks_a_corpus():
    """While workers fill the table, a depth can lack a corpus that another depth has: the summary
    still names every corpus's teacher, marks the gap and the partial means, and sorts that row last
    (it raised KeyError on the first GPU run, when a 20-layer row landed before any 24-layer one)."""
    import pandas as pd

    hc = _load("lm_heal_choice")
    row = {"seed": 0, "selection_seconds": 1.0, "kept_layers": "0 1"}
    table = pd.DataFrame([
        {**row, "dataset": "a", "strategy": "sleb", "target_layers": 20, "teacher_perplexity": 10.0,
         "pruned_perplexity": 40.0, "perplexity": 20.0},
        {**row, "dataset": "a", "strategy": "fusion", "target_layers": 24, "teacher_perplexity": 10.0,
         "pruned_perplexity": 30.0, "perplexity": 15.0},
        {**row, "dataset": "b", "strategy": "fusion", "target_layers": 24, "teacher_perplexity": 5.0,
         "pruned_perplexity": 12.0, "perplexity": 6.0},
        {**row, "dataset": "b", "strategy": "sleb", "target_layers": 24, "teacher_perplexity": 5.0,
         "pruned_perplexity": 11.0, "perplexity": 5.0},
        {**row, "dataset": "a", "strategy": "sleb", "target_layers": 24, "teacher_perplexity": 10.0,
         "pruned_perplexity": 28.0, "perplexity": 14.0}])
    md = hc.summary(table)
    assert "30 -> 20 layers" in md and "b (teacher 5.0)" in md.split("30 -> 24")[0]
    depth20 = md.split("30 -> 24")[0]
    assert "| `sleb` | 40 -> **20** | — | 40 (partial) | 20 (partial) | 1 |" in depth20
    depth24 = md.split("30 -> 24")[1]
    assert depth24.index("`sleb`") < depth24.index("`fusion`")  # sorted by the healed geometric mean

def test_lm_profile_runs_fusion_loco_and_resumes(tmp_path):
    """Profile lm-cpu on a tiny Llama: fusion and fusion-verify get a bundle fitted without the
    evaluated corpus (the shipped LM configuration), best-signal resolves to a signal, every run
    adds one row with the issue's columns (and its recovery steps), and a second call re-runs
    nothing."""
    import pandas as pd

    from conftest import make_tokenizer
    from fusion_prune import fusion as F
    from test_causal_lm import prose, tiny_decoder

    model = tmp_path / "tiny-llama"
    tiny_decoder("llama").save_pretrained(model)
    make_tokenizer(model).save_pretrained(model)
    corpus = tmp_path / "grimm-tales.txt"
    corpus.write_text("\n\n".join(prose(60)))
    lm = _load("lm_compress")
    args = ["--model", str(model), "--corpora", str(corpus), "--strategies", "fusion,fusion-verify,best-signal,deepest",
            "--depths", "2", "--max-length", "16", "--finetune-steps", "1", "--heal-steps", "1", "--distill-steps", "1",
            "--max-eval-tokens", "64", "--zero-shot-samples", "0", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    res = lm.main(args)
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert {"dataset", "strategy", "seed", "target_layers", "teacher_perplexity", "pruned_perplexity", "perplexity",
            "zero_shot_accuracy", "selection_seconds", "kept_layers"} <= set(table.columns)
    assert sorted(table.strategy) == sorted(["fusion", "fusion-verify", "best-signal", "deepest"]) and len(res) == 4
    assert (table.finetune_steps == 1).all()  # recovery between removals, recorded per row
    (bundle,) = (tmp_path / "runs" / "bundles").glob("*.npz")
    from fusion_prune.tasks import CausalLMTask

    shipped, fitted = F.load_bundle(CausalLMTask.default_bundle), F.load_bundle(bundle)
    assert (fitted.model_type, fitted.feature_norm, fitted.target) == (shipped.model_type, shipped.feature_norm,
                                                                       shipped.target)
    verify = json.loads((tmp_path / "runs" / "grimm-tales.txt-l2-fusion-verify-s0" / "report.json").read_text())
    assert verify["config"]["drop_one_samples"] == 8 and verify["config"]["fusion_path"] == str(bundle)
    best = json.loads((tmp_path / "runs" / "grimm-tales.txt-l2-best-signal-s0" / "report.json").read_text())
    assert best["config"]["strategy"] in __import__("signals").DEFAULT_SIGNALS
    stamp = (tmp_path / "runs" / "grimm-tales.txt-l2-deepest-s0" / "report.json").stat().st_mtime
    lm.main(args)  # finished runs are skipped, their rows replaced, not duplicated
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 4
    assert (tmp_path / "runs" / "grimm-tales.txt-l2-deepest-s0" / "report.json").stat().st_mtime == stamp
    # fusion-verify on another window count is a row of its own, beside the default one
    lm.main([*args[:5], "fusion-verify", *args[6:], "--verify-windows", "4"])
    assert sorted(pd.read_csv(tmp_path / "out" / "results.csv").strategy) == sorted(
        ["fusion", "fusion-verify", "fusion-verify-w4", "best-signal", "deepest"])
    w4 = json.loads((tmp_path / "runs" / "grimm-tales.txt-l2-fusion-verify-w4-s0" / "report.json").read_text())
    assert w4["config"]["drop_one_samples"] == 4 and w4["config"]["strategy"] == "fusion-verify"


def test_fusion_verify_family_transfer_scores_each_family_with_a_bundle_of_the_other(tmp_path):
    from test_fusion import synthetic_rows

    from fusion_prune import fusion as F

    fv = _load("fusion_verify")
    rows = synthetic_rows()
    cls = F.use_measured(rows[rows.dataset.isin(["a", "b"])], "acc_after_drop")
    assert fv.family_transfer(cls, tmp_path / "none", "minmax", "retention_rank") is None  # no other family yet
    rows[rows.dataset.isin(["c", "d"])].assign(source_model="other").to_parquet(tmp_path / "other.parquet")
    t = fv.family_transfer(cls, tmp_path, "minmax", "retention_rank")
    rf = t[t.method == "fusion-rf"].set_index("test")
    assert dict(rf.train) == {"m": "other", "other": "m"}  # each family scored by a bundle of the other
    assert (rf.states == 12).all() and (rf.top1 > 0.5).all()  # the shared rule transfers
    assert t.method.str.startswith("best signal on the scored rows").sum() == 2
    assert t.method.str.startswith("best-signal (").sum() == 2
    rnd = t[t.method == "random layer (expected)"].set_index("test")
    assert len(rnd) == 2 and (rnd.regret > rf.regret).all()  # a random layer is the scale, and worse


def test_walks_holds_out_both_walks_of_a_dataset(tmp_path):
    from test_fusion import synthetic_rows

    walks = _load("walks")
    oracle = synthetic_rows()
    other = synthetic_rows(seed=1).assign(walk="random")
    oracle.to_parquet(tmp_path / "o.parquet")
    other[other.dataset != "d"].to_parquet(tmp_path / "r.parquet")  # d: oracle rows only, so never held out
    t = walks.main(["--oracle", str(tmp_path / "o.parquet"), "--other", str(tmp_path / "r.parquet"),
                    "--out", str(tmp_path / "out")])
    assert sorted(t.held_out.unique()) == ["a", "b", "c"] and len(t) == 3 * 3 * 2
    states = t.groupby("train").train_states.first()  # 6 states per dataset; the held-out one never trains
    assert states.to_dict() == {"oracle": 18, "oracle + other walk": 30, "other walk": 12}
    assert (t[t.train == "oracle"].top1 > 0.5).all()  # the shared rule transfers to both kinds of state
    assert "| oracle states | oracle | 18 |" in (tmp_path / "out" / "walks.md").read_text()


def test_first_hour_runs_the_readme_tour_as_written_and_tables_each_phase():
    """benchmarks/first_hour.py times the README's own tour lines (the ones test_readme runs)."""
    fh = _load("first_hour")
    title, lines = fh.tour_block((ROOT / "README.md").read_text())
    assert title.startswith("Tour on your own CSV") and lines[0] == "source .venv/bin/activate"
    from test_readme import tour_commands

    import shlex

    assert [shlex.split(ln)[1:] for ln in lines if ln.startswith("fusionprune ")] == tour_commands()
    record = {"date": "2026-12-03T00:00:00", "commit": "abcdef0", "tour_title": title,
              "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 8.0, "python": "3.11"},
              "csv": {"rows": 5000, "source": "rotten-tomatoes", "words_median": 18.0},
              "phases": {"make demo": {"command": "make demo", "seconds": 300.0, "exit": 0, "free_cpus_at_start": 2},
                         **{f"tour {n}": {"command": "source .venv/bin/activate && fusionprune " + n, "seconds": s,
                                          "exit": 0, "free_cpus_at_start": 2}
                            for n, s in (("finetune", 120.0), ("compress", 180.0))}}}
    md = fh.table(record)
    assert "**Tour (" in md and "300 s = 5.0 min" in md and "`make demo`: 5.0 min" in md
    assert "| tour finetune | `fusionprune finetune` | 120 |" in md


def test_heal_table_reads_arms_and_removed_sets_and_upserts_rows(tmp_path):
    """The healing table's arms are [replacement+]healing[/modifiers]; a bad one is refused before
    any work; the removed set is the complement of a choice row's kept layers; a row rerun replaces
    the old one."""
    import pandas as pd

    ht = _load("heal_table")
    unset = {"kd_weight": None, "mix_share": None, "lr": None, "guard_weight": None, "steps": None, "stop": None}
    assert ht.parse_arm("linear") == {"replace": "linear", "method": "none", "top_layers": None, "mods": set(), **unset}
    assert ht.parse_arm("layer+partial8/kd/mix") == {"replace": "layer", "method": "partial", "top_layers": 8,
                                                     "mods": {"kd", "mix"}, **unset}
    assert ht.parse_arm("full/kd1/mix0.5/lr5e-5") == {"replace": "none", "method": "full", "top_layers": None,
                                                      "mods": {"kd", "mix", "lr"}, "kd_weight": 1.0,
                                                      "mix_share": 0.5, "lr": 5e-5, "guard_weight": None,
                                                      "steps": None, "stop": None}
    assert ht.parse_arm("full/mix0.5/guard5")["guard_weight"] == 5.0
    assert ht.parse_arm("lora/steps800")["steps"] == 800
    assert ht.parse_arm("full/steps150/stop")["mods"] == {"steps", "stop"} and ht.parse_arm("full/stop5")["stop"] == 5
    assert ht.parse_arm("full/guard")["mods"] == {"guard"}
    for bad in ("dora", "full/fast", "linear+dora", "full/kdx", "full/lr", "full/control1", "full/guardx",
                "full/steps", "full/steps2.5", "full/steps0", "full/stop0", "full/stop1.5"):
        with pytest.raises(SystemExit):
            ht.parse_arm(bad)
    choice = tmp_path / "choice.csv"
    pd.DataFrame([{"dataset": "c", "target_layers": 4, "strategy": "sleb", "seed": 0, "kept_layers": "0 2 3 5"}]
                 ).to_csv(choice, index=False)
    assert ht.removed_set("c", 4, "sleb", 6, choice) == [1, 4]
    with pytest.raises(SystemExit):
        ht.removed_set("c", 3, "sleb", 6, choice)
    csv = tmp_path / "results.csv"
    row = {"corpus": "c", "depth": 4, "arm": "full", "seed": 0, "steps": 3, "perplexity": 9.0}
    ht.upsert(row, csv)
    ht.upsert({**row, "perplexity": 8.0}, csv)
    ht.upsert({**row, "arm": "lora"}, csv)
    d = pd.read_csv(csv)
    assert len(d) == 2 and d.set_index("arm").perplexity.to_dict() == {"full": 8.0, "lora": 9.0}
    assert ht.done(csv) == {("c", "4", "full", "0"), ("c", "4", "lora", "0")}
