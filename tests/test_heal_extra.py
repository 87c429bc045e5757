"""Partial fine-tuning (--heal partial) and the healed-teacher control (--heal-teacher)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from test_causal_lm import corpus_txt, llama_dir  # noqa: F401 - module fixtures


def test_partial_healing_trains_only_the_top_layers_the_norm_and_the_head(llama_dir):  # noqa: F811
    from fusion_prune.errors import BadInputError
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.models import load_causal_lm

    model, _ = load_causal_lm(str(llama_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(5, 20, (4, 16), generator=torch.Generator().manual_seed(3))
    healed, stats = heal(model, windows, HealConfig(method="partial", top_layers=1, steps=2, batch_size=2, lr=1e-2,
                                                   progress=False))
    after = healed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.3.", "model.norm.", "lm_head.")) for k in changed)
    assert any(k.startswith("model.layers.3.") for k in changed) and "lm_head.weight" in changed
    assert "model.norm.weight" in changed and stats["method"] == "partial"
    assert stats["trainable_parameters"] == sum(before[k].numel() for k in before
                                                if k.startswith(("model.layers.3.", "model.norm.", "lm_head.")))
    assert all(p.requires_grad for p in healed.parameters())  # handed back trainable, as every method does
    with pytest.raises(BadInputError, match="'--heal-layers' option must be between 1 and the student's depth 4"):
        heal(healed, windows, HealConfig(method="partial", top_layers=5, steps=1, batch_size=2, progress=False))


def test_the_healed_teacher_control_is_reported(llama_dir, corpus_txt, tmp_path):  # noqa: F811
    from fusion_prune.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "-m", str(llama_dir), "-d", str(corpus_txt), "--target-layers", "3",
                                    "-o", str(out), "--max-length", "16", "--heal-steps", "2", "--max-eval-tokens",
                                    "64", "--signal-samples", "2", "--batch-size", "2", "--strategy", "deepest",
                                    "--heal", "partial", "--heal-layers", "2", "--heal-teacher"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    c = r["healed_teacher"]
    assert c["heal"]["method"] == "partial" and c["heal"]["steps"] == 2
    assert c["student_over_healed_teacher"] == pytest.approx(r["student_perplexity"] / c["perplexity"])
    assert c["perplexity"] != pytest.approx(r["teacher_perplexity"])  # the teacher was trained, not re-measured
    assert "healed teacher" in res.output and "| teacher healed alike (control) |" in (out / "report.md").read_text()
