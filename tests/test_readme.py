"""The README's tour on your own CSV, command by command, on a tiny model and a CSV of its own.

The commands are taken from the README as written; the only changes are the model (a tiny BERT
instead of minilm-l6) and options appended to keep each command to seconds.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusion_prune.cli import main

from conftest import sentiment_frame

README = Path(__file__).resolve().parents[1] / "README.md"

#: appended to each tour command: sizes for a tiny model, not different behaviour
FAST = {
    "finetune": ["--max-length", "16", "--batch-size", "16", "--lr", "3e-3", "--min-steps", "40"],
    "analyze": ["--samples", "32", "--max-length", "16", "--drop-one-samples", "30", "--extras", "activation_patching"],
    "compress": ["--max-length", "16", "--finetune-steps", "2", "--signal-samples", "16", "--drop-one-samples", "0",
                 "--distill-samples", "64", "--batch-size", "16"],
    "evaluate": ["--max-length", "16"],
    "inspect": [],
}


def tour_commands() -> list[list[str]]:
    block = re.search(r"## Tour on your own CSV[^\n]*\n.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.strip().startswith("fusionprune ")]


def test_the_tour_is_what_the_readme_says():
    cmds = tour_commands()
    assert [c[0] for c in cmds] == ["finetune", "analyze", "compress", "evaluate", "inspect"]
    assert "--max-accuracy-drop" in cmds[2]


def test_the_tour_runs_on_a_csv_of_your_own(tiny_base_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = sentiment_frame(500, seed=5).rename(columns={"text": "review", "label": "stars"})
    df["stars"] = df["stars"].map({"pos": 5, "neg": 1})
    df.to_csv("reviews.csv", index=False)
    outputs = []
    for cmd in tour_commands():
        args = [str(tiny_base_model) if a == "minilm-l6" else a for a in cmd] + FAST[cmd[0]]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, f"{shlex.join(cmd)}\n{res.output}"
        outputs.append(res)
    assert (tmp_path / "runs" / "teacher" / "fusionprune_run.json").is_file()
    assert (tmp_path / "runs" / "analysis" / "analysis.md").is_file()
    report = json.loads((tmp_path / "runs" / "small" / "report.json").read_text())
    assert report["budget"]["parameter"] == "max_accuracy_drop" and report["budget"]["value"] == 0.02
    assert (tmp_path / "runs" / "small" / "plots" / "size_speed.png").is_file()
    ev = json.loads(outputs[3].stdout)
    assert ev["accuracy"] == pytest.approx(report["student_accuracy"])
    assert "kept" in outputs[4].output.lower()
