"""lm-evaluation-harness as an evaluator, offline: local tasks from labelled assets, the exact
cross-check against fusionprune's own zero-shot accuracy, compress --lm-eval, bad input."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from fusion_prune.cli import main

from test_causal_lm import corpus_txt, llama_dir  # noqa: F401 - module fixtures

pytest.importorskip("lm_eval", reason="fusionprune[lm-eval] is part of `make install`")


@pytest.mark.parametrize("dataset, n", [("rotten-tomatoes", 40), ("election-tweets", 30)])
def test_local_task_acc_equals_fusionprunes_zero_shot_accuracy(llama_dir, dataset, n):  # noqa: F811
    """Same examples, prompt and verbalisers: the harness's acc is fusionprune's --zero-shot accuracy exactly."""
    runner = CliRunner()
    task = "fp_" + dataset.replace("-", "_")
    res = runner.invoke(main, ["evaluate", "-m", str(llama_dir), "--lm-eval", task, "--limit", str(n), "--json"])
    assert res.exit_code == 0, res.output
    harness = json.loads(res.stdout)["lm_eval"][task]
    res = runner.invoke(main, ["evaluate", "-m", str(llama_dir), "-d", dataset, "--zero-shot", "--max-samples", str(n),
                               "--json"])
    assert res.exit_code == 0, res.output
    own = json.loads(res.stdout)
    assert own["examples"] == n and harness["acc"] == own["accuracy"]


def test_an_include_folder_of_your_own_tasks(llama_dir, tmp_path):  # noqa: F811
    from fusion_prune.harness import write_local_task

    name = write_local_task("rotten-tomatoes", tmp_path / "mine", prompt="Review: {text}\nSentiment:",
                            verbalisers=[" bad", " good"], max_samples=12, name="my_reviews")
    res = CliRunner().invoke(main, ["evaluate", "-m", str(llama_dir), "--lm-eval", name, "--lm-eval-include",
                                    str(tmp_path / "mine")])
    assert res.exit_code == 0, res.output
    assert "lm-eval my_reviews: acc " in res.output


def test_unknown_tasks_and_missing_folders_fail_at_once_in_one_line(llama_dir, tmp_path):  # noqa: F811
    runner = CliRunner()
    t0 = time.perf_counter()
    res = runner.invoke(main, ["evaluate", "-m", str(llama_dir), "--lm-eval", "fp_no_such_set"])
    assert res.exit_code == 2 and "unknown task(s) ['fp_no_such_set']" in res.output and "fp_rotten_tomatoes" in res.output
    res = runner.invoke(main, ["evaluate", "-m", str(llama_dir), "--lm-eval", "fp_rotten_tomatoes",
                               "--lm-eval-include", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "must be a folder of task YAMLs" in res.output
    res = runner.invoke(main, ["evaluate", "-m", str(llama_dir)])
    assert res.exit_code == 2 and "'--dataset' option is needed" in res.output
    # compress checks its names before the run, not after it
    res = runner.invoke(main, ["compress", "-m", str(llama_dir), "-d", "grimm-tales", "--target-layers", "2",
                               "-o", str(tmp_path / "o"), "--lm-eval", "nope_task"])
    assert res.exit_code == 2 and "unknown task(s) ['nope_task']" in res.output and not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 120


def test_compress_records_the_harness_for_teacher_pruned_and_final(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3",
                                    "-o", str(out), "--max-length", "16", "--heal-steps", "1", "--max-eval-tokens",
                                    "64", "--signal-samples", "2", "--batch-size", "2", "--strategy", "deepest",
                                    "--lm-eval", "fp_rotten_tomatoes", "--lm-eval-limit", "10"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())["lm_eval"]["fp_rotten_tomatoes"]
    assert set(r) == {"teacher", "pruned", "student"} and all(0 <= v["acc"] <= 1 for v in r.values())
    assert "lm-eval fp_rotten_tomatoes acc: teacher" in res.output
    assert "| fp_rotten_tomatoes | acc |" in (out / "report.md").read_text()


def test_a_missing_harness_or_onnx_is_one_line(monkeypatch, llama_dir, tmp_path):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("lm_eval", "onnxruntime")
                        else real(name, *a))
    res = CliRunner().invoke(main, ["evaluate", "-m", str(llama_dir), "--lm-eval", "fp_rotten_tomatoes"])
    assert res.exit_code == 2 and "pip install 'fusionprune[lm-eval]'" in res.output
    from fusion_prune.errors import BadInputError
    from fusion_prune.export import to_onnx

    with pytest.raises(BadInputError, match=r"needs onnxruntime, which is not installed: pip install 'fusionprune\[onnx\]'"):
        to_onnx(str(llama_dir), tmp_path / "o")
