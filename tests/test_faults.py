"""Resume under faults: compress and collect are SIGKILLed at points spread over a run (inside
checkpoint writes too), resumed, and must end exactly where an uninterrupted run ends; a truncated
or corrupt checkpoint is refused with one line and never loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fusion_prune.errors import BadInputError

HERE = Path(__file__).parent
CLASSIFIER = dict(target_layers=1, finetune_steps=2, signal_samples=16, drop_one_samples=16, max_eval_samples=40,
                  max_length=16, batch_size=8, distill_samples=40, progress=False)
COLLECT = dict(min_layers=1, finetune_steps=2, signal_samples=16, max_eval_samples=16, max_length=16, batch_size=8,
               progress=False)
LM = dict(target_layers=2, task="causal-lm", strategy="sleb", max_length=16, batch_size=2, signal_samples=2,
          max_eval_tokens=64, step_eval_samples=2, finetune_steps=1, heal_steps=2, progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest import make_tokenizer, sentiment_frame, train_tiny_classifier
    from test_causal_lm import prose, tiny_decoder

    root = tmp_path_factory.mktemp("faults")
    data = root / "sentiment"
    data.mkdir()
    sentiment_frame(200, seed=1).to_csv(data / "train.csv", index=False)
    sentiment_frame(60, seed=2).to_csv(data / "test.csv", index=False)
    tiny_decoder("llama").save_pretrained(root / "llama")
    make_tokenizer(root / "llama").save_pretrained(root / "llama")
    (root / "story.txt").write_text("\n\n".join(prose(40)))
    return {"teacher": str(train_tiny_classifier(root, data, layers=3)), "data": str(data),
            "llama": str(root / "llama"), "corpus": str(root / "story.txt")}


def _killed(spec: dict, tmp_path: Path) -> None:
    """Run the driver with a fault; it must die of SIGKILL."""
    path = tmp_path / f"spec-{spec['fault'].replace(':', '-')}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "fault_driver.py"), str(path)], capture_output=True, text=True,
                          cwd=HERE.parent, timeout=600)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])


def _compress(model: str, data: str, out: Path, options: dict):
    from fusion_prune.loop import run_compress

    return run_compress(model, data, out, resume=True, **options)[0]


def _same_run(a, b, out_a: Path, out_b: Path) -> None:
    assert a.kept_layers == b.kept_layers
    assert [h.dropped_orig for h in a.history] == [h.dropped_orig for h in b.history]
    assert [h.metric for h in a.history] == [h.metric for h in b.history]
    assert {k: v for k, v in a.results.items() if k.endswith(("accuracy", "perplexity"))} == \
        {k: v for k, v in b.results.items() if k.endswith(("accuracy", "perplexity"))}
    wa, wb = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    return _compress(inputs["teacher"], inputs["data"], out, CLASSIFIER), out


# Checkpoints of this run: 1 the teacher, 2 the student before any step, 3 after step 0, 4 after step 1.
@pytest.mark.parametrize("fault", ["record:2", "manifest:3", "swap:4", "drop:2", "finish", "output"])
def test_compress_killed_anywhere_resumes_to_the_same_model(inputs, reference, tmp_path, fault):
    out = tmp_path / "out"
    _killed({"kind": "compress", "model": inputs["teacher"], "data": inputs["data"], "out": str(out),
             "options": CLASSIFIER, "fault": fault}, tmp_path)
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    resumed = _compress(inputs["teacher"], inputs["data"], out, CLASSIFIER)
    _same_run(resumed, reference[0], out, reference[1])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]  # nothing left over


def test_a_causal_lm_killed_mid_run_resumes_to_the_same_model(inputs, tmp_path):
    ref = _compress(inputs["llama"], inputs["corpus"], tmp_path / "ref", LM)
    _killed({"kind": "compress", "model": inputs["llama"], "data": inputs["corpus"], "out": str(tmp_path / "out"),
             "options": LM, "fault": "manifest:3"}, tmp_path)
    resumed = _compress(inputs["llama"], inputs["corpus"], tmp_path / "out", LM)
    _same_run(resumed, ref, tmp_path / "out", tmp_path / "ref")


@pytest.fixture(scope="module")
def reference_rows(inputs, tmp_path_factory):
    from fusion_prune.collect import run_collect

    return run_collect(inputs["teacher"], inputs["data"], tmp_path_factory.mktemp("rows") / "rows.parquet", **COLLECT)


# Checkpoints of a collect walk: 1 after state 0, 2 after state 1.
@pytest.mark.parametrize("fault", ["record:1", "manifest:2", "swap:2", "drop:2"])
def test_collect_killed_anywhere_resumes_to_the_same_rows(inputs, reference_rows, tmp_path, fault):
    from fusion_prune.collect import run_collect

    out = tmp_path / "rows.parquet"
    _killed({"kind": "collect", "model": inputs["teacher"], "data": inputs["data"], "out": str(out),
             "options": COLLECT, "fault": fault}, tmp_path)
    assert not out.exists()
    rows = run_collect(inputs["teacher"], inputs["data"], out, **COLLECT)
    pd.testing.assert_frame_equal(rows, reference_rows)
    assert not (tmp_path / "rows.parquet.state").exists()


@pytest.fixture
def stopped(inputs, tmp_path):
    """A compress run killed at the start of step 1: its checkpoint holds step 0."""
    _killed({"kind": "compress", "model": inputs["teacher"], "data": inputs["data"], "out": str(tmp_path / "out"),
             "options": CLASSIFIER, "fault": "drop:2"}, tmp_path)
    return tmp_path / "out.partial" / "current"


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
     "truncated or corrupt"),
    (lambda c: (c / "model.safetensors").write_bytes(bytes([b ^ 1 for b in (c / "model.safetensors").read_bytes()])),
     "SHA-256 differs"),
    (lambda c: (c / "fusionprune_checkpoint.json").write_text('{"meta": '), "truncated or corrupt"),
    (lambda c: (c / "fusionprune_manifest.json").write_text("{not json"), "corrupt manifest"),
    (lambda c: (c / "fusionprune_manifest.json").unlink(), "has no manifest"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_never_loaded(inputs, stopped, tmp_path, monkeypatch,
                                                                      damage, message):
    import fusion_prune.models as M
    from fusion_prune.cli import main

    damage(stopped)
    loads = []
    real = M.load_classifier
    monkeypatch.setattr(M, "load_classifier", lambda spec, *a, **k: loads.append(str(spec)) or real(spec, *a, **k))
    with pytest.raises(BadInputError, match=message):
        _compress(inputs["teacher"], inputs["data"], tmp_path / "out", CLASSIFIER)
    assert not any(".partial" in s for s in loads)  # refused before any load
    res = CliRunner().invoke(main, ["compress", "-m", inputs["teacher"], "-d", inputs["data"], "--target-layers", "1",
                                    "-o", str(tmp_path / "out"), "--resume", "--max-length", "16"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
