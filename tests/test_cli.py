"""The command line through click's CliRunner, and once through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fusion_prune.assets import ASSETS
from fusion_prune.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def test_help_and_version(runner):
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "finetune" in res.output and "assets" in res.output
    assert runner.invoke(main, ["--version"]).output.startswith("fusionprune, version")


def test_assets_list_json(runner, isolated_home):
    res = runner.invoke(main, ["assets", "list", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)
    # one row per registered asset, in the table's order, none fetched in a fresh home
    assert [r["name"] for r in rows] == list(ASSETS) and not any(r["fetched"] for r in rows)
    assert {"minilm-l6", "smollm2-135m", "gemma3-270m"} <= set(ASSETS)


def test_unknown_asset_exits_2_with_one_line(runner, isolated_home):
    res = runner.invoke(main, ["assets", "fetch", "minilm-l6", "nope"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Got 'nope'" in lines[0] and "'rotten-tomatoes'" in lines[0]
    assert not (isolated_home / "assets").exists()  # nothing fetched before the names were checked


def test_asset_path_unfetched_exits_2(runner, isolated_home):
    res = runner.invoke(main, ["assets", "path", "bbc-news"])
    assert res.exit_code == 2 and "not fetched yet" in res.stderr


def test_finetune_then_evaluate(runner, tiny_base_model, sentiment_csv_dir, tmp_path):
    out = tmp_path / "teacher"
    args = ["finetune", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir), "-o", str(out),
            "--epochs", "4", "--batch-size", "16", "--lr", "3e-3", "--max-length", "16"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output and (out / "fusionprune_run.json").is_file()
    res = runner.invoke(main, ["evaluate", "--model", str(out), "--dataset", str(sentiment_csv_dir), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["accuracy"] >= 0.95 and 0 <= m["macro_f1"] <= 1 and m["max_length"] == 16 and m["split"] == "test"
    # An existing output folder is refused, in one line, and left as it was.
    before = sorted(p.name for p in out.iterdir())
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "already exists" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--dataset", "{tmp}/missing.csv"], "does not exist"),
    (["--dataset", "{data}", "--text-column", "body"], "text_column 'body' is not a column"),
    (["--dataset", "{data}", "--split", "dev"], "Invalid value for '--split'"),
])
def test_evaluate_bad_input_exits_2(runner, tiny_base_model, sentiment_csv_dir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, data=sentiment_csv_dir) for a in args]
    res = runner.invoke(main, ["evaluate", "--model", str(tiny_base_model), *args])
    assert res.exit_code == 2 and message in res.stderr
    assert "Traceback" not in res.output


def test_evaluate_model_without_head_exits_2(runner, tiny_base_model, sentiment_csv_dir):
    res = runner.invoke(main, ["evaluate", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir)])
    assert res.exit_code == 2 and "has no classification head" in res.stderr


def test_real_console_script(isolated_home):
    exe = shutil.which("fusionprune") or str((__import__("pathlib").Path(sys.executable).parent / "fusionprune"))
    ok = subprocess.run([exe, "assets", "list"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "minilm-l6" in ok.stdout and str(isolated_home) in ok.stdout
    bad = subprocess.run([exe, "assets", "path", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_finetune_under_accelerate_launch_with_two_cpu_processes(tiny_base_model, sentiment_csv_dir, tmp_path):
    """`accelerate launch --multi_gpu` on a CPU-only machine runs two gloo processes (MULTI_CPU)."""
    exe = __import__("pathlib").Path(sys.executable).parent / "accelerate"
    out = tmp_path / "ddp"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "fusion_prune.cli", "finetune",
         "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir), "-o", str(out),
         "--epochs", "4", "--patience", "0", "--min-steps", "0", "--batch-size", "16", "--lr", "3e-3",
         "--max-length", "16"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((out / "fusionprune_run.json").read_text())
    assert rec["num_processes"] == 2
    # Each rank sees half of the 360 training rows: ceil(180 / 16) = 12 steps an epoch.
    assert rec["train"]["steps"] == 48
    assert rec["metrics"]["test"]["examples"] == 100  # gather_for_metrics drops the padding duplicates
    assert rec["metrics"]["test"]["accuracy"] >= 0.9
    assert proc.stdout.count("saved ") == 1


# --------------------------------------------------------------------------- inspect / prune


def test_prune_and_inspect_a_base_encoder(runner, tiny_base_model, tmp_path):
    from transformers import AutoModel, BertModel

    out = tmp_path / "pruned"
    res = runner.invoke(main, ["prune", "--model", str(tiny_base_model), "--drop", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 -> 1 layers" in res.output and "kept original [0]" in res.output
    reloaded = AutoModel.from_pretrained(out)
    assert type(reloaded) is BertModel and reloaded.config.num_hidden_layers == 1
    assert (out / "tokenizer_config.json").is_file() and (out / "fusionprune_prune.json").is_file()
    info = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).stdout)
    assert info["layers"] == 1 and info["kept_layers"] == [0] and info["pruned"] is True
    assert info["family"] == "BERT" and info["class"] == "BertModel"
    assert json.loads(runner.invoke(main, ["inspect", "-m", str(out), "--json"]).stdout) == info  # -m as elsewhere
    res = runner.invoke(main, ["inspect", "-m", str(out), str(tiny_base_model)])
    assert res.exit_code == 2 and "name different models" in res.output


def test_prune_keeps_the_classifier_class(runner, tiny_base_model, sentiment_csv_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    teacher = tmp_path / "teacher"
    assert runner.invoke(main, ["finetune", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                                "-o", str(teacher), "--max-steps", "2", "--teacher-margin", "0"]).exit_code == 0
    out = tmp_path / "student"
    assert runner.invoke(main, ["prune", "--model", str(teacher), "--drop", "0", "-o", str(out)]).exit_code == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model) is BertForSequenceClassification and model.config.id2label == {0: "neg", 1: "pos"}
    res = runner.invoke(main, ["evaluate", "--model", str(out), "--dataset", str(sentiment_csv_dir), "--json"])
    assert res.exit_code == 0 and 0 <= json.loads(res.stdout)["accuracy"] <= 1


@pytest.mark.parametrize("drop, message", [
    ("0,1", "would remove all 2 layers"),
    ("5", "'--drop' parameter must hold indices in [0, 1]"),
    ("1,x", "comma-separated layer indices"),
    ("1,1", "must not repeat"),
])
def test_prune_bad_drop_exits_2_and_writes_nothing(runner, tiny_base_model, tmp_path, drop, message):
    out = tmp_path / "never"
    res = runner.invoke(main, ["prune", "--model", str(tiny_base_model), "--drop", drop, "-o", str(out)])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_prune_refuses_albert(runner, tmp_path):
    from transformers import AlbertConfig, AlbertModel

    AlbertModel(AlbertConfig(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path / "albert")
    res = runner.invoke(main, ["prune", "--model", str(tmp_path / "albert"), "--drop", "0", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "ALBERT shares one set of weights" in res.stderr
    res = runner.invoke(main, ["inspect", str(tmp_path / "albert")])
    assert res.exit_code == 2 and "supported: BERT" in res.stderr


# --------------------------------------------------------------------------- signals


def test_signals_command_writes_table_and_heatmap(runner, tiny_base_model, sentiment_csv_dir, tmp_path):
    import pandas as pd

    out, png = tmp_path / "sig.parquet", tmp_path / "sig.png"
    res = runner.invoke(main, ["signals", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                               "-o", str(out), "--samples", "32", "--plot", str(png), "--extra", "activation_patching"])
    assert res.exit_code == 0, res.output
    assert "untrained head" in res.stderr  # a base encoder gets a fresh head: warned, not refused
    t = pd.read_parquet(out)
    assert list(t.columns[:3]) == ["layer", "orig_layer", "act_inhibition"] and t.columns[-1] == "activation_patching"
    assert len(t) == 2 and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    csv = tmp_path / "sig.csv"
    assert runner.invoke(main, ["signals", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                                "-o", str(csv), "--samples", "16"]).exit_code == 0
    assert pd.read_csv(csv).shape == (2, 14)


@pytest.mark.parametrize("args, message", [
    (["-o", "{tmp}/s.xlsx"], "must end in .parquet or .csv"),
    (["-o", "{tmp}/s.csv", "--extra", "vibes"], "Got 'vibes'"),
    (["-o", "{tmp}/s.csv", "--samples", "0"], "'--samples' option must be an int >= 1. Got 0"),
])
def test_signals_bad_input(runner, tiny_base_model, sentiment_csv_dir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    res = runner.invoke(main, ["signals", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir), *args])
    assert res.exit_code == 2 and message in res.stderr
    assert not list(tmp_path.glob("s.*"))


def test_collect_takes_the_teacher_budget_like_compress(runner, tiny_base_model, sentiment_csv_dir, tmp_path,
                                                        monkeypatch):
    """A base-size model needs a smaller teacher learning rate than the default: collect takes the same
    --teacher-* options as compress, and they reach the teacher's FinetuneConfig."""
    import fusion_prune.collect as C

    seen = {}

    def fake_collect(model, data, cfg, output, **kw):
        seen["cfg"] = cfg
        import pandas as pd
        return pd.DataFrame({"step": [0]})

    monkeypatch.setattr(C, "collect", fake_collect)
    res = runner.invoke(main, ["collect", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                               "-o", str(tmp_path / "rows.parquet"), "--teacher-epochs", "1.5", "--teacher-lr", "1e-4",
                               "--teacher-patience", "0", "--max-train-samples", "300"])
    assert res.exit_code == 0, res.output
    t = seen["cfg"].teacher
    assert (t.epochs, t.lr, t.patience, t.max_train_samples) == (1.5, 1e-4, 0, 300)
    # the default is compress's teacher (one default per option; the shipped rows pin theirs in the Makefile)
    from fusion_prune.params import TEACHER_DEFAULTS

    runner.invoke(main, ["collect", "--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                         "-o", str(tmp_path / "rows2.parquet")])
    assert seen["cfg"].teacher.epochs == TEACHER_DEFAULTS["epochs"]
