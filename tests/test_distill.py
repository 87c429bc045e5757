"""Distillation losses by hand, the layer map, and the trainer on a tiny teacher/student pair."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as T

from distill import KD_LOSSES, DistillConfig, distill, hard_ce, hidden_mse, layer_map, soft_kl
from fusion_prune.data import load_dataset
from fusion_prune.errors import BadInputError
from fusion_prune.finetune import FinetuneConfig, evaluate, finetune
from fusion_prune.surgery import drop_layers


def test_registry():
    assert set(KD_LOSSES) == {"soft_kl", "hard_ce", "hidden_mse", "next_token_kl", "topk_next_token_kl"}


def test_topk_kl_is_the_full_kl_at_k_equal_v_and_sparse_kd_below():
    from distill import next_token_kl, topk_next_token_kl

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g, requires_grad=True), torch.randn(2, 5, 11, generator=g)
    top = t.topk(11, dim=-1)
    full = next_token_kl(s, t, temperature=2.0)
    torch.testing.assert_close(topk_next_token_kl(s, top.values, top.indices, 2.0), full)
    # k < V: KL(renormalised teacher top-k || student) read at those ids, by hand at one position
    top3 = t.topk(3, dim=-1)
    loss = topk_next_token_kl(s, top3.values, top3.indices, 1.0)
    p = torch.softmax(top3.values, -1)
    log_q = torch.log_softmax(s.detach(), -1).gather(-1, top3.indices)
    by_hand = (p * (p.log() - log_q)).sum(-1)[:, :-1].mean()
    torch.testing.assert_close(loss.detach(), by_hand)
    loss.backward()
    assert s.grad is not None and s.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_topk_kl_with_the_tail_is_the_kl_over_k_plus_one_bins():
    """With the teacher's mass outside its top k kept as one bin, the loss is the exact KL over the k
    ids and "the rest": by hand from the full teacher, never above the full KL, the full KL at k = V."""
    from distill import next_token_kl, teacher_topk_logits, topk_next_token_kl

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 11, generator=g, requires_grad=True), torch.randn(2, 5, 11, generator=g) * 3
    temp = 2.0
    full = next_token_kl(s, t, temperature=temp)

    class Teacher(torch.nn.Module):  # returns the fixed logits t, as a causal LM's output would
        training = False

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return type("Out", (), {"logits": t[: len(input_ids)]})()

    windows = torch.zeros(2, 5, dtype=torch.long)
    for k in (3, 11):
        values, ids, tail = teacher_topk_logits(Teacher(), windows, k, batch_size=2, temperature=temp)
        assert values.shape == ids.shape == (2, 5, k) and tail.shape == (2, 5)
        loss = topk_next_token_kl(s, values, ids, temp, teacher_log_tail=tail)
        if k == 11:
            assert torch.isinf(tail).all() and (tail < 0).all()
            torch.testing.assert_close(loss, full, atol=1e-3, rtol=1e-3)  # float16 values
            continue
        p = torch.softmax(t / temp, -1)
        q = torch.softmax(s.detach() / temp, -1)
        mask = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids.long(), True)
        p_bins = torch.cat([p.gather(-1, ids.long()), (p * ~mask).sum(-1, keepdim=True)], -1)
        q_bins = torch.cat([q.gather(-1, ids.long()), (q * ~mask).sum(-1, keepdim=True)], -1)
        by_hand = (p_bins * (p_bins.log() - q_bins.log())).sum(-1)[:, :-1].mean() * temp * temp
        torch.testing.assert_close(loss.detach(), by_hand, atol=2e-3, rtol=2e-3)
        assert 0 <= loss.item() <= full.item() + 1e-4
        renormalised = topk_next_token_kl(s, values, ids, temp)  # the sparse-KD target, without the tail
        assert renormalised.item() != pytest.approx(loss.item(), rel=1e-3)
        loss.backward()
        assert torch.isfinite(s.grad).all() and s.grad[:, -1].abs().sum() == 0


def test_soft_kl_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher probabilities (3/4, 1/4) at T = 1
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert soft_kl(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # At T = 2 the teacher is (sqrt3, 1) / (sqrt3 + 1); the loss is scaled by T^2.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    exp2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert soft_kl(s, t, temperature=2.0).item() == pytest.approx(exp2, rel=1e-6)
    assert soft_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_ce_and_hidden_mse_by_hand():
    assert hard_ce(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(math.log(2))
    s = [torch.ones(1, 3, 2)]
    t = [torch.zeros(1, 3, 2), torch.full((1, 3, 2), 3.0)]
    mask = torch.tensor([[1, 1, 0]])  # the padded token does not count
    assert hidden_mse(s, t, [(0, 0)], mask).item() == pytest.approx(1.0)
    assert hidden_mse(s, t, [(0, 1)], mask).item() == pytest.approx(4.0)
    assert hidden_mse(s, t, [(0, 0), (0, 1)], mask).item() == pytest.approx(2.5)


def test_layer_map_uses_original_indices():
    cfg = T.BertConfig(num_hidden_layers=6)
    student = drop_layers(T.BertModel(T.BertConfig(hidden_size=8, num_hidden_layers=6, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=20)), [0, 2, 3])
    assert layer_map(student.config, cfg) == [(0, 1), (1, 4), (2, 5)]
    teacher = T.BertConfig(num_hidden_layers=4)
    teacher.fusionprune_kept_layers = [1, 2, 4, 5]  # a teacher that was itself pruned
    assert layer_map(student.config, teacher) == [(0, 0), (1, 2), (2, 3)]


def test_config_checks():
    with pytest.raises(BadInputError, match=r"'temperature' parameter must be a number > 0"):
        DistillConfig(temperature=0)
    with pytest.raises(BadInputError, match="not all zero"):
        DistillConfig(soft_weight=0, hard_weight=0)
    with pytest.raises(BadInputError, match="'cache_teacher_logits' parameter must be one of"):
        DistillConfig(cache_teacher_logits="maybe")


@pytest.fixture(scope="module")
def teacher_dir(tiny_base_model, sentiment_csv_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "teacher"
    finetune(str(tiny_base_model), load_dataset(str(sentiment_csv_dir)),
             FinetuneConfig(epochs=4, batch_size=16, lr=3e-3, max_length=16, progress=False), out)
    return out


@pytest.mark.parametrize("cache, hidden", [("yes", 0.0), ("no", 0.0), ("auto", 1.0)])
def test_distillation_moves_the_student_to_the_teacher(teacher_dir, sentiment_csv_dir, cache, hidden):
    data = load_dataset(str(sentiment_csv_dir))
    teacher = T.AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tok = T.AutoTokenizer.from_pretrained(teacher_dir)
    student = drop_layers(teacher, [1])
    torch.manual_seed(0)
    with torch.no_grad():  # scramble the student's head so that it has something to learn
        student.classifier.weight.normal_(0, 1.0)
    before = evaluate(student, tok, data.validation, data.labels, max_length=16)["accuracy"]
    cfg = DistillConfig(epochs=3, batch_size=16, lr=3e-3, max_length=16, cache_teacher_logits=cache,
                        hidden_weight=hidden, progress=False)
    stats = distill(teacher, student, tok, data.train, data.labels, cfg)
    after = evaluate(student, tok, data.validation, data.labels, max_length=16)["accuracy"]
    assert stats["final_loss"] < stats["first_loss"] and after >= 0.95 and after >= before
    assert stats["teacher_logits_cached"] == (cache == "yes")  # auto: not with hidden-state matching
    assert stats["pairs"] == ([(0, 0)] if hidden else [])
    assert all(p.requires_grad for p in teacher.parameters()) and not teacher.training  # flags untouched


def test_auto_caches_when_examples_repeat(teacher_dir, sentiment_csv_dir):
    data = load_dataset(str(sentiment_csv_dir))
    teacher = T.AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    tok = T.AutoTokenizer.from_pretrained(teacher_dir)
    one = distill(teacher, drop_layers(teacher, [0]), tok, data.train, data.labels,
                  DistillConfig(max_steps=2, batch_size=8, max_length=16, progress=False))
    many = distill(teacher, drop_layers(teacher, [0]), tok, data.train, data.labels,
                   DistillConfig(epochs=2, batch_size=64, max_length=16, progress=False))
    assert one["teacher_logits_cached"] is False and many["teacher_logits_cached"] is True


def test_hard_labels_only_is_plain_fine_tuning_without_the_teacher(teacher_dir, sentiment_csv_dir):
    """soft = hidden = 0 is the control run: the teacher never runs, and the update equals the
    same loop fed the same batches with the teacher swapped for anything at all."""
    data = load_dataset(str(sentiment_csv_dir))
    teacher = T.AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    tok = T.AutoTokenizer.from_pretrained(teacher_dir)
    calls = []
    a = drop_layers(teacher, [0])  # before the hook: a deep copy would carry it along
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    try:
        cfg = DistillConfig(max_steps=3, batch_size=8, max_length=16, soft_weight=0.0, hard_weight=1.0,
                            cache_teacher_logits="yes", progress=False)
        stats = distill(teacher, a, tok, data.train, data.labels, cfg)
    finally:
        handle.remove()
    assert calls == [] and stats["steps"] == 3 and stats["teacher_logits_cached"] is False
    other = T.AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # a different "teacher": plain fine-tuning must not care
        for p in other.parameters():
            p.normal_()
    b = drop_layers(teacher, [0])
    distill(other, b, tok, data.train, data.labels, cfg)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_partial_distillation_trains_the_last_layers_and_the_head_only(teacher_dir, sentiment_csv_dir):
    data = load_dataset(str(sentiment_csv_dir))
    teacher = T.AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    tok = T.AutoTokenizer.from_pretrained(teacher_dir)
    student = copy.deepcopy(teacher)  # two layers: the embeddings and layer 0 stay frozen, layer 1 and the head train
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = distill(teacher, student, tok, data.train, data.labels,
                    DistillConfig(max_steps=3, batch_size=8, lr=1e-2, max_length=16, train_layers=1, progress=False))
    changed = {k for k, v in student.state_dict().items() if not torch.equal(before[k], v)}
    trains = ("bert.encoder.layer.1.", "bert.pooler.", "classifier.")
    assert changed and all(k.startswith(trains) for k in changed)
    assert any(k.startswith("bert.encoder.layer.1.") for k in changed) and "classifier.weight" in changed
    assert stats["trainable_parameters"] == sum(v.numel() for k, v in before.items() if k.startswith(trains))
    assert all(p.requires_grad for p in student.parameters())  # handed back as it came
    with pytest.raises(BadInputError, match="'--distill-layers' option must be between 1 and the student's depth 2"):
        distill(teacher, student, tok, data.train, data.labels,
                DistillConfig(max_steps=1, batch_size=8, max_length=16, train_layers=3, progress=False))
