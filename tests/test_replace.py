"""--replace linear: a least-squares map per run of removed layers, folded into the layer before it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from test_causal_lm import corpus_txt, tiny_decoder  # noqa: F401 - module fixture


def test_runs_of_removed_layers():
    from fusion_prune.replace import runs_to_replace

    assert runs_to_replace(8, [0, 1, 4, 6, 7]) == [(2, 3), (5, 5)] and runs_to_replace(4, [1, 2, 3]) == [(0, 0)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_folded_map_is_the_least_squares_optimum_and_reloads(family, tmp_path):
    """After the fold the kept layer's output error against the teacher's hidden state after the run
    is orthogonal to the branch's outputs (normal equations: the lstsq optimum), it is smaller than
    the gap it replaces, and the folder reloads with plain transformers and generates alike."""
    from transformers import AutoModelForCausalLM

    from fusion_prune.replace import _capture, _run, out_projection, replace_linear
    from fusion_prune.surgery import drop_layers, layer_list

    teacher = tiny_decoder(family, layers=6).eval()
    student = drop_layers(teacher, [2, 3])
    windows = torch.randint(5, 20, (6, 16), generator=torch.Generator().manual_seed(0))
    rec = replace_linear(teacher, student, windows, batch_size=2)
    (run,) = rec["runs"]
    assert run["run"] == [2, 3] and run["folded_into"] == 1
    assert run["relative_residual_after"] < run["relative_residual_before"]
    host = layer_list(student)[1]
    with _capture({"L": layer_list(teacher)[3]}) as t_box:
        _run(teacher, windows, 2)
    with _capture({"M": out_projection(host), "Y": host}) as s_box:
        _run(student, windows, 2)
    H = t_box["L"][0].shape[-1]
    M = torch.cat(s_box["M"]).reshape(-1, H).double()
    err = torch.cat(t_box["L"]).reshape(-1, H).double() - torch.cat(s_box["Y"]).reshape(-1, H).double()
    assert float((M.T @ err).abs().max()) <= 1e-3 * float((M.T @ M).abs().max())  # normal equations hold
    target = err + M  # L - A, A the stream before the MLP is added
    assert float(err.norm() / target.norm()) == pytest.approx(run["relative_residual_after"], rel=1e-3, abs=1e-5)
    _reloads_and_generates_alike(student, tmp_path / "m")


def test_the_cosine_objective_lowers_the_cosine_distance_from_the_least_squares_map(tmp_path):
    """linear-cosine starts from the least-squares map and never ends worse by its own objective;
    what is folded is what the record says (measured again on the folded student)."""
    from transformers import AutoModelForCausalLM

    from fusion_prune.replace import _capture, _run, replace_linear
    from fusion_prune.surgery import drop_layers, layer_list

    teacher = tiny_decoder("llama", layers=6).eval()
    windows = torch.randint(5, 20, (6, 16), generator=torch.Generator().manual_seed(0))
    ls, cos = drop_layers(teacher, [2, 3]), drop_layers(teacher, [2, 3])
    (r_ls,) = replace_linear(teacher, ls, windows, batch_size=2)["runs"]
    rec = replace_linear(teacher, cos, windows, batch_size=2, objective="linear-cosine")
    (r_cos,) = rec["runs"]
    assert rec["method"] == "linear-cosine" and r_cos["cosine_distance_before"] == r_ls["cosine_distance_before"]
    assert r_cos["cosine_distance_after"] <= r_ls["cosine_distance_after"] < r_ls["cosine_distance_before"]
    # least squares stays the better fit by its own (squared-error) objective
    assert r_ls["relative_residual_after"] <= r_cos["relative_residual_after"] + 1e-6
    with _capture({"L": layer_list(teacher)[3]}) as t_box:
        _run(teacher, windows, 2)
    with _capture({"Y": layer_list(cos)[1]}) as s_box:
        _run(cos, windows, 2)
    H = t_box["L"][0].shape[-1]
    Y, L = torch.cat(s_box["Y"]).reshape(-1, H), torch.cat(t_box["L"]).reshape(-1, H)
    measured = float((1 - torch.nn.functional.cosine_similarity(Y, L, dim=-1)).mean())
    assert measured == pytest.approx(r_cos["cosine_distance_after"], rel=1e-3, abs=1e-6)
    cos.save_pretrained(tmp_path / "m")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.num_hidden_layers == 4


def test_refused_in_one_line_where_the_fold_is_not_exact():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fusion_prune.errors import BadInputError
    from fusion_prune.replace import replace_linear
    from fusion_prune.surgery import drop_layers

    cfg = Gemma3TextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    teacher = Gemma3ForCausalLM(cfg).eval()
    with pytest.raises(BadInputError, match="'--replace' option 'linear' needs a block whose MLP output"):
        replace_linear(teacher, drop_layers(teacher, [2]), torch.randint(1, 30, (2, 8)))


def test_compress_replace_linear_reports_the_replaced_perplexity(corpus_txt, tmp_path):  # noqa: F811
    from conftest import make_tokenizer
    from fusion_prune.cli import main

    src = tmp_path / "llama"
    tiny_decoder("llama").save_pretrained(src)
    make_tokenizer(src).save_pretrained(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "-m", str(src), "-d", str(corpus_txt), "--target-layers", "2", "-o",
                                    str(out), "--max-length", "16", "--heal", "none", "--max-eval-tokens", "64",
                                    "--signal-samples", "2", "--batch-size", "2", "--strategy", "deepest",
                                    "--replace", "linear", "--replace-samples", "4"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["replacement"]["method"] == "linear" and r["replaced_perplexity"] > 0
    assert r["healed_perplexity"] == pytest.approx(r["replaced_perplexity"])  # no healing after it
    assert "linear replacement folded in" in (out / "report.md").read_text()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_replacement_trains_one_layer_per_run_and_reloads(family, tmp_path):
    """--replace layer: one layer of the model's class back in place of each run, started from the
    removed layer that best reproduces the run alone and trained toward the teacher's stream; the
    depth, per-layer numbering and kept-layer record say so, and the folder reloads and generates alike."""
    from transformers import AutoModelForCausalLM

    from fusion_prune.replace import _layer_io, _relative_error, replace_layer
    from fusion_prune.surgery import drop_layers, kept_layers, layer_list

    torch.manual_seed(0)
    teacher = tiny_decoder(family, layers=8).eval()
    student = drop_layers(teacher, [0, 1, 3, 4, 5, 7])
    windows = torch.randint(5, 20, (6, 16), generator=torch.Generator().manual_seed(0))
    rec = replace_layer(teacher, student, windows, batch_size=2, steps=60, lr=1e-3)
    assert rec["added_layers"] == 2 and [r["run"] for r in rec["runs"]] == [[0, 1], [3, 5], [7, 7]]
    first, last, single = rec["runs"]
    assert single["initialised_from"] is None  # one layer: it would get itself back
    assert first["initialised_from"] in (0, 1) and last["initialised_from"] in (3, 4, 5)
    for r in (first, last):
        assert r["relative_error_after"] < r["relative_error_initial"]
    assert kept_layers(student) == [first["initialised_from"], 2, last["initialised_from"], 6]
    assert student.config.num_hidden_layers == len(layer_list(student)) == 4
    for pos, layer in enumerate(layer_list(student)):  # the KV cache's index follows the position
        assert all(m.layer_idx == pos for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    # the record's error is measured again on the student as it is now (the last run's layer)
    targets = _layer_io(teacher, layer_list(teacher)[5], windows, 2, inputs=False)
    ins = _layer_io(student, layer_list(student)[2], windows, 2, inputs=True)
    assert _relative_error(layer_list(student)[2], ins, targets) == pytest.approx(last["relative_error_after"], rel=1e-3)
    _reloads_and_generates_alike(student, tmp_path / "m")


def test_inserting_a_layer_back_restores_the_per_layer_config():
    """insert_layer_ is the inverse of removing: Gemma 3's layer_types (sliding or full attention
    by layer) come back as the teacher's for the kept and the reinserted layers."""
    import copy

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fusion_prune.surgery import drop_layers, insert_layer_, kept_layers, layer_list

    cfg = Gemma3TextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window_pattern=3)
    teacher = Gemma3ForCausalLM(cfg).eval()
    student = drop_layers(teacher, [2, 4])
    pos = insert_layer_(student, copy.deepcopy(layer_list(teacher)[2]), 2, teacher.config)
    assert pos == 2 and kept_layers(student) == [0, 1, 2, 3, 5]
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 1, 2, 3, 5)]
    ids = torch.randint(1, 30, (1, 8))
    with torch.no_grad():
        full = drop_layers(teacher, [4])(ids).logits
        assert torch.allclose(student(ids).logits, full, atol=1e-5)


def _reloads_and_generates_alike(student, folder) -> None:
    """The saved folder loads with plain transformers and generates what ``student`` generates."""
    from transformers import AutoModelForCausalLM

    student.save_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    gen = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert student.generate(prompt, **gen).tolist() == again.generate(prompt, **gen).tolist()
