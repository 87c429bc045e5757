"""The benchmark scripts run on tiny models and count what they claim to count."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
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
    # Twelve passes cost more than the one shared pass.
    assert res["separate/plain time"] > res["fused/plain time"]
    assert json.loads(out.read_text())["fused/plain time"] == res["fused/plain time"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("signals/plain ratio: ")


def test_labels_cost_runs(tiny_base_model, sentiment_csv_dir, tmp_path, capsys):
    res = _load("labels_cost").main(["--model", str(tiny_base_model), "--dataset", str(sentiment_csv_dir),
                                     "--samples", "32", "--batch-size", "8", "--max-length", "16",
                                     "--out", str(tmp_path / "l.json")])
    assert res["identical_accuracies"] and res["ideal_ratio"] == pytest.approx(3 / 4)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("labels cached/naive ratio: ")
