"""compress end to end on a tiny model: every strategy, resume, distillation, bad input."""

from __future__ import annotations

import json
from dataclasses import asdict
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers as T
from click.testing import CliRunner

import fusion_prune.loop as G
from distill import DistillConfig
from fusion_prune.checkpoint import CHECKPOINT_RECORD
from fusion_prune.cli import main
from fusion_prune.data import load_dataset
from fusion_prune.errors import BadInputError
from fusion_prune.loop import CompressConfig, compress_with_config as compress
from fusion_prune.strategies import STRATEGIES
from signals import DEFAULT_SIGNALS

from conftest import train_tiny_classifier


@pytest.fixture(scope="module")
def teacher(sentiment_csv_dir, tmp_path_factory):
    """A trained 3-layer tiny classifier."""
    return train_tiny_classifier(tmp_path_factory.mktemp("compress"), sentiment_csv_dir, layers=3)


def _cfg(strategy="top", **kw):
    base = dict(target_layers=1, strategy=strategy, finetune_steps=2, signal_samples=32, drop_one_samples=40,
                max_eval_samples=60, max_length=16, batch_size=8, lr=1e-3, distill=None, progress=False)
    base.update(kw)
    return CompressConfig.from_options(**base)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_end_to_end(strategy, teacher, sentiment_csv_dir, bundle_path, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    out = tmp_path / "out"
    cfg = _cfg(strategy, fusion_path=str(bundle_path) if strategy.startswith("fusion") else None)
    r = compress(str(teacher), data, cfg, out)
    assert r["student_layers"] == 1 and len(r["kept_layers"]) == 1
    steps = 1 if STRATEGIES[strategy].one_shot else 2
    assert len(r["history"]) == steps
    # the same recovery budget per removed layer, one-shot or not
    assert sum(e["finetune_steps"] for e in r["history"]) == cfg.finetune_steps * 2
    model = T.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.fusionprune_kept_layers == r["kept_layers"]
    assert json.loads((out / "report.json").read_text())["kept_layers"] == r["kept_layers"]
    assert (out / "report.md").is_file() and (out / "plots" / "accuracy.png").is_file()
    assert not (tmp_path / "out.partial").exists()
    for e in r["history"]:
        check_candidates(e, strategy, 3)
    md = (out / "report.md").read_text()
    assert "## Why each layer was removed" in md and f"Strategy `{strategy}`" in md
    if not STRATEGIES[strategy].one_shot:  # every layer of the first step is a row; the removed one bold
        first = r["history"][0]
        assert f"| **{first['dropped'][0]} ({first['dropped_orig'][0]})** |" in md
    if strategy == "top":
        assert r["kept_layers"] == [0]
    if strategy == "bottom":
        assert r["kept_layers"] == [2]
    if strategy == "oracle":  # the measured best layer is dropped each time
        for e in r["history"]:
            best = max(e["drop_one"]["acc_after_drop"])
            assert e["measured_acc_after_drop"] == best
    if strategy == "fusion-verify":  # the measured best of the bundle's top 3 (here: all 3 layers, then 2)
        for e in r["history"]:
            assert e["measured_acc_after_drop"] == max(e["drop_one"]["acc_after_drop"])
    if strategy == "fusion":
        assert all(e["predicted"] is not None for e in r["history"]) and r["fusion_bundle"]["model_type"] == "rf"
        # the report says what "predicted" is for this bundle's target
        target = r["fusion_bundle"]["target"]
        assert ("not an accuracy" in (out / "report.md").read_text()) == (target != "retention")


def check_candidates(entry: dict, strategy: str, full_layers: int) -> None:
    """The step's candidate table covers every current layer and its deciding (last) column chose the
    removed layer: highest removability, prediction or accuracy, lowest loss."""
    import numpy as np

    c = entry["candidates"]
    assert c["layer"] == list(range(entry["layers_before"]))
    assert [c["orig_layer"][i] for i in entry["dropped"]] == entry["dropped_orig"]
    cols = [k for k in c if k not in ("layer", "orig_layer")]
    if not cols or STRATEGIES[strategy].one_shot or strategy in ("top", "bottom", "deepest", "alternate",
                                                                 "symmetric", "random"):
        return  # chosen by position: a measurement may be shown but does not decide
    values = np.asarray(c[cols[-1]], dtype=float)
    ends = [i for i, o in enumerate(c["orig_layer"]) if o in (0, full_layers - 1)]
    if strategy == "sleb" and len(ends) < len(values):  # the first and last original layers are kept (if any other)
        values[ends] = np.nan
    lowest = "loss" in cols[-1] or "nll" in cols[-1]
    best = np.nanmin(values) if lowest else np.nanmax(values)
    assert values[entry["dropped"][0]] == best, (cols[-1], values, entry["dropped"])


def test_alternate_and_symmetric_orders():
    from fusion_prune.strategies import StrategyState

    def run(name, L, target):
        kept = list(range(L))
        while len(kept) > target:
            s = StrategyState(None, [], len(kept), target, kept, full_layers=L)
            (i,) = STRATEGIES[name].fn(s)
            kept = kept[:i] + kept[i + 1:]
        return kept

    assert run("alternate", 12, 6) == [0, 2, 4, 6, 8, 10]
    assert run("symmetric", 12, 6) == [0, 1, 2, 9, 10, 11]
    assert run("top", 6, 3) == [0, 1, 2] and run("bottom", 6, 3) == [3, 4, 5]


def _close(a, b, rel=1e-4) -> bool:
    """``a == b`` for nested dicts and lists, floats compared with relative tolerance ``rel``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


def test_resume_after_the_first_step(teacher, sentiment_csv_dir, tmp_path, monkeypatch):
    data = load_dataset(str(sentiment_csv_dir))
    cfg = _cfg("consensus", distill=DistillConfig(max_steps=3, batch_size=8, progress=False))
    full = compress(str(teacher), data, cfg, tmp_path / "a")
    real, calls = G.apply_drop, []

    def stop_in_second_step(*a, **k):  # the shared pruning step: drop + recovery
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(G, "apply_drop", stop_in_second_step)
    with pytest.raises(KeyboardInterrupt):
        compress(str(teacher), data, cfg, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    saved = json.loads((tmp_path / "b.partial" / "current" / CHECKPOINT_RECORD).read_text())
    assert len(saved["history"]) == 1
    monkeypatch.setattr(G, "apply_drop", real)
    with pytest.raises(BadInputError, match="A stopped run exists.*--resume"):
        compress(str(teacher), data, cfg, tmp_path / "b")
    # What `make demo` passes (--resume --overwrite) continues the stopped run: its checkpoint is not
    # deleted, so only the second step runs (a fresh start would stop again in its second step).
    counted = []

    def count(*a, **k):
        counted.append(1)
        return real(*a, **k)

    monkeypatch.setattr(G, "apply_drop", count)
    resumed = compress(str(teacher), data, cfg, tmp_path / "b", resume=True, overwrite=True)
    assert len(counted) == 1 and "--resume --overwrite" in (Path(__file__).parents[1] / "Makefile").read_text()

    def strip(h):
        return [{k: v for k, v in e.items() if k not in ("seconds", "selection_seconds", "throughput")} for e in h]

    assert resumed["kept_layers"] == full["kept_layers"]
    # Equal up to float rounding: on CUDA a reloaded checkpoint's kernels may sum in another order.
    assert _close(strip(resumed["history"]), strip(full["history"]))
    assert resumed["student_accuracy"] == full["student_accuracy"]


def test_overwrite_restarts_a_stopped_run_made_with_other_arguments(teacher, sentiment_csv_dir, tmp_path,
                                                                    monkeypatch):
    data = load_dataset(str(sentiment_csv_dir))
    cfg = _cfg("top", distill=None)
    real = G.apply_drop

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "apply_drop", stop)
    with pytest.raises(KeyboardInterrupt):
        compress(str(teacher), data, cfg, tmp_path / "b")
    monkeypatch.setattr(G, "apply_drop", real)
    other = _cfg("bottom", distill=None)
    with pytest.raises(BadInputError, match="used other arguments"):
        compress(str(teacher), data, other, tmp_path / "b", resume=True)
    assert (tmp_path / "b.partial" / "current" / CHECKPOINT_RECORD).is_file()  # refused: left as it was
    report = compress(str(teacher), data, other, tmp_path / "b", resume=True, overwrite=True)
    assert report["config"]["strategy"] == "bottom" and (tmp_path / "b" / "report.json").is_file()
    assert not (tmp_path / "b.partial").exists()


def test_distillation_under_accelerate_launch_two_cpu_processes(teacher, sentiment_csv_dir, tmp_path):
    from fusion_prune.surgery import drop_layers

    student = tmp_path / "student"
    t = T.AutoModelForSequenceClassification.from_pretrained(teacher)
    drop_layers(t, [0, 2]).save_pretrained(student)
    T.AutoTokenizer.from_pretrained(teacher).save_pretrained(student)
    exe = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "kd"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29519", "-m", "fusion_prune.cli", "distill",
         "--teacher", str(teacher), "--student", str(student), "--dataset", str(sentiment_csv_dir), "-o", str(out),
         "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--max-length", "16"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((out / "fusionprune_distill.json").read_text())
    assert rec["num_processes"] == 2 and rec["test"]["examples"] == 100 and rec["test"]["accuracy"] >= 0.9
    assert T.AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 1
    assert proc.stdout.count("saved ") == 1
    card = (out / "README.md").read_text()
    assert "Original layers removed: [0, 2]" in card and "fusionprune distill --teacher" in card


@pytest.mark.parametrize("extra, message", [
    (["--target-layers", "3", "--strategy", "top"], "must be below the model's depth 3. Got 3"),
    (["--target-layers", "0", "--strategy", "top"], "'--target-layers' option must be an int >= 1. Got 0"),
    (["--target-layers", "1", "--strategy", "vibes"], "'strategy' parameter must be one of {"),
    (["--target-layers", "1", "--fusion", "{junk}"], "is not a fusionprune fusion bundle"),
    (["--target-layers", "1", "--fusion", "{tmp}/missing.npz"], "does not exist"),
    (["--target-layers", "1", "--fusion", "{pickle}"], "is a pickle (joblib), and loading a pickle runs any code"),
    (["--target-layers", "1", "-o", "{exists}"], "already exists"),
])
def test_compress_bad_input_exits_2_and_touches_nothing(teacher, sentiment_csv_dir, tmp_path, extra, message):
    import joblib

    (tmp_path / "junk.npz").write_text("junk")
    joblib.dump({"not": "a bundle"}, tmp_path / "old.joblib")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "mine.txt").write_text("keep")
    args = [a.format(tmp=tmp_path, junk=tmp_path / "junk.npz", pickle=tmp_path / "old.joblib", exists=tmp_path / "exists") for a in extra]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    res = CliRunner().invoke(main, ["compress", "--model", str(teacher), "--dataset", str(sentiment_csv_dir), *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "'random'" in res.stderr if "vibes" in extra else True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "junk.npz", "old.joblib"]
    assert (tmp_path / "exists" / "mine.txt").read_text() == "keep"


def test_compress_cli_summary(teacher, sentiment_csv_dir, tmp_path):
    res = CliRunner().invoke(main, ["compress", "--model", str(teacher), "--dataset", str(sentiment_csv_dir),
                                    "--target-layers", "2", "--strategy", "top", "-o", str(tmp_path / "o"),
                                    "--finetune-steps", "2", "--signal-samples", "16", "--drop-one-samples", "16",
                                    "--max-length", "16", "--distill-epochs", "1", "--distill-samples", "64",
                                    "--distill-control", "--distill-data", "unseen", "--distill-layers", "1"])
    assert res.exit_code == 0, res.output
    assert "layers            3 -> 2" in res.output and "after distillation" in res.output
    # the control: the same pruned student, plain fine-tuning for the distillation's steps
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 0 <= report["control_accuracy"] <= 1 and "control accuracy" in res.output
    assert report["config"]["finish"]["distill_data"] == "unseen" and report["info"]["distill_rows"]["rows"] == 64
    assert report["config"]["finish"]["distill"]["train_layers"] == 1  # --distill-layers reached the distillation
    assert "hard labels only" in (tmp_path / "o" / "report.md").read_text()


def test_demo_is_minilm_on_rotten_tomatoes_to_three_layers(monkeypatch, tmp_path):
    """The README's first command: its configuration, without running it (make demo runs it)."""
    import fusion_prune.loop as greedy

    seen = {}

    def fake(model, data, cfg, output, resume=False, overwrite=False, task=None):
        seen.update(model=model, dataset=data.spec, cfg=cfg)
        raise SystemExit(0)

    monkeypatch.setattr(greedy, "compress_with_config", fake)
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo")])
    assert "cfg" in seen, result.output  # the demo's assets must resolve (fetched, or from the registry)
    cfg = seen["cfg"]
    assert (seen["model"], seen["dataset"]) == ("minilm-l6", "rotten-tomatoes")
    # the demo runs compress's default strategy: the one that measured best in the loop
    assert (cfg.target_layers, cfg.strategy, cfg.fusion_path, cfg.max_length) == (3, "oracle", None, 64)
    assert cfg.finish.distill is not None and cfg.finish.distill.max_train_samples == 3000 and cfg.teacher.lr == 2e-4


def test_default_strategy_is_the_measured_best_and_a_named_bundle_selects_fusion(bundle_path):
    from fusion_prune.loop import CompressConfig

    assert CompressConfig.from_options(target_layers=2).strategy == "oracle"
    assert CompressConfig.from_options(target_layers=2, task="causal-lm").strategy == "fusion-verify"
    assert CompressConfig.from_options(target_layers=2, fusion_path=str(bundle_path)).strategy == "fusion"
    assert CompressConfig.from_options(target_layers=2, fusion_path=str(bundle_path),
                                       strategy="fusion-verify").strategy == "fusion-verify"
    with pytest.raises(BadInputError, match="my.npz' does not exist"):
        CompressConfig.from_options(target_layers=2, fusion_path="my.npz")


def test_distill_rows_put_what_the_teacher_did_not_see_first():
    import pandas as pd

    from fusion_prune.tasks.classification import distill_rows

    from fusion_prune.data import subsample, subsample_positions

    df = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    seen = set(subsample(df, 60, 0).text)
    assert list(subsample(df, 60, 0).text) == list(df.text.iloc[subsample_positions(df, 60, 0)])
    rows, rec = distill_rows(df, {"max_train_samples": 60, "seed": 0}, 30, seed=1)
    assert len(rows) == 30 and not set(rows.text) & seen and rec["unseen_by_teacher"] == 30
    rows, rec = distill_rows(df, {"max_train_samples": 60, "seed": 0}, 50, seed=1)
    assert rec == {"rows": 50, "unseen_by_teacher": 40, "teacher_data": {"max_train_samples": 60, "seed": 0}}
    assert len(set(rows.text) - seen) == 40  # all 40 unseen rows, topped up with 10 seen ones
    rows, rec = distill_rows(df, None, None, seed=1)  # unknown teacher data: every row, shuffled
    assert sorted(rows.text) == sorted(df.text) and rec["unseen_by_teacher"] == 100


def test_unseen_distill_data_reads_the_teachers_run_record(teacher, sentiment_csv_dir, tmp_path):
    data = load_dataset(str(sentiment_csv_dir))
    cfg = _cfg("top", distill=DistillConfig(max_steps=2, batch_size=8, max_train_samples=40, progress=False),
               distill_data="unseen", distill_control=True)
    r = compress(str(teacher), data, cfg, tmp_path / "out")
    # the fixture's teacher trained on the whole train split: nothing is unseen, the 40 rows are seen ones
    assert r["info"]["teacher_data"] == {"max_train_samples": None, "seed": 0}
    assert r["info"]["distill_rows"] == {"rows": 40, "unseen_by_teacher": 0,
                                         "teacher_data": {"max_train_samples": None, "seed": 0}}
    assert r["control_accuracy"] is not None
    with pytest.raises(BadInputError, match="distill_data"):
        _cfg("top", distill_data="fresh")


def test_fusion_verify_between_fusion_and_the_oracle(teacher, sentiment_csv_dir, bundle_path, monkeypatch):
    """k = 1 is the bundle's own choice; k = L is the oracle's; only the shortlist is measured."""
    import fusion_prune.dropone as dropone_mod
    from fusion_prune.fusion import load_bundle
    from fusion_prune.tasks import ClassificationTask

    data = load_dataset(str(sentiment_csv_dir))
    task = ClassificationTask()
    task.data = data
    net, tok, _ = task.load_model(str(teacher))
    measured = []
    real = dropone_mod.drop_one_scores

    def spy(*a, **k):
        measured.append(k.get("only", a[5] if len(a) > 5 else None))
        return real(*a, **k)

    monkeypatch.setattr(dropone_mod, "drop_one_scores", spy)
    bundle = load_bundle(bundle_path)
    chosen = {}
    for k in (1, 2, 3):
        cfg = _cfg("fusion-verify", verify_k=k, fusion_path=str(bundle_path))
        measured.clear()
        m = G.measure_state(task, net, tok, cfg, 0, STRATEGIES["fusion-verify"], list(DEFAULT_SIGNALS), 1, bundle,
                            3, want_drop_one=True)
        state, sig, dropone = m.state, m.signals, m.drop_one
        measured.clear()
        chosen[k] = STRATEGIES["fusion-verify"].fn(state)[0]
        scores = bundle.predict(sig.sort_values("layer"))
        if k == 1:
            assert chosen[k] == int(np.argmax(scores)) and measured == []
        else:
            assert sorted(measured[0]) == sorted(np.argsort(-scores, kind="stable")[:k].tolist())
    assert chosen[3] == task.best_candidate(dropone.table)


def test_fusion_verify_from_the_cli(teacher, sentiment_csv_dir, bundle_path, tmp_path):
    res = CliRunner().invoke(main, ["compress", "--model", str(teacher), "--dataset", str(sentiment_csv_dir),
                                    "--target-layers", "2", "--strategy", "fusion-verify", "--verify-k", "2",
                                    "--fusion", str(bundle_path), "-o", str(tmp_path / "o"), "--finetune-steps", "1",
                                    "--signal-samples", "16", "--drop-one-samples", "16", "--max-length", "16",
                                    "--no-distill"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["verify_k"] == 2 and report["strategy"] == "fusion-verify"


def test_a_run_stopped_by_an_older_version_resumes_when_new_options_are_at_their_defaults():
    from fusion_prune.checkpoint import same_meta
    from fusion_prune.loop import config_defaults

    cfg = CompressConfig.from_options(target_layers=2, task="causal-lm", heal_steps=20)
    defaults = {"config": config_defaults(cfg)}
    now = json.loads(json.dumps({"model": "m", "config": asdict(cfg)}, default=str))
    older = json.loads(json.dumps(now))
    del older["config"]["verify_k"], older["config"]["finish"]["heal"]["lora_r"]  # options added since
    assert same_meta(older, now, defaults)
    changed = json.loads(json.dumps(now))
    changed["config"]["verify_k"] = 5  # a new option set away from its default: not the stopped run's
    assert not same_meta(older, changed, defaults)
    assert not same_meta(now, {**now, "model": "other"}, defaults)
    fewer = json.loads(json.dumps(now))
    del fewer["config"]["seed"]  # an option the stopped run had that this version lacks
    assert not same_meta(now, fewer, defaults)
    assert defaults["config"]["finish"]["heal"]["steps"] != now["config"]["finish"]["heal"]["steps"]
