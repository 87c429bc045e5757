"""The 12 signals against straightforward reference implementations, and the registry contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as T

import signals as S
from fusion_prune.errors import BadInputError
from fusion_prune.data import make_loader
from signals import DEFAULT_SIGNALS, SIGNALS, compute_signals
from signals.capture import capture
from signals.information import pooled_mi

from conftest import make_tokenizer, sentiment_frame, tiny_bert_config

DESIGN_ORDER = ["act_inhibition", "act_intensity", "act_energy", "mi_task", "mi_prediction", "grad_norm",
                "grad_fisher", "grad_taylor", "weight_norm", "weight_entropy", "attn_entropy", "repr_angular"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = T.BertForSequenceClassification(tiny_bert_config(num_labels=2, layers=3))
    return m.eval()


@pytest.fixture(scope="module")
def frame():
    df = sentiment_frame(24, seed=3)
    # Different lengths, so that every batch of 8 carries padding that must be masked out.
    df["text"] = [t + " the" * (i % 4) for i, t in enumerate(df["text"])]
    df["label"] = (df["label"] == "pos").astype(int)
    return df


@pytest.fixture(scope="module")
def table(model, tok, frame):
    return compute_signals(model, tok, frame, batch_size=8, max_length=16, max_samples=None, progress=False)


def _batches(tok, frame):
    return list(make_loader(frame, tok, batch_size=8, max_length=16))


def _reference_pass(model, tok, frame):
    """Hidden states, attentions and masks of every batch, from transformers' own outputs."""
    out = []
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            for b in _batches(tok, frame):
                o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                          output_attentions=True)
                out.append((o.hidden_states, o.attentions, b["attention_mask"].bool(), b["labels"], o.logits))
        finally:
            model.set_attn_implementation("sdpa")
    return out


def test_registry_defaults_are_the_design_twelve_in_order():
    assert list(DEFAULT_SIGNALS) == DESIGN_ORDER
    assert [n for n, s in SIGNALS.items() if s.default] == DESIGN_ORDER
    rules = {n: SIGNALS[n].rule for n in DESIGN_ORDER}
    assert {n for n, r in rules.items() if r == "prune_highest"} == {"weight_entropy", "attn_entropy"}
    assert {"activation_patching", "mc_dropout", "layer_conductance"} <= {n for n, s in SIGNALS.items() if not s.default}


def test_duplicate_and_bad_registrations_are_rejected():
    with pytest.raises(ValueError, match="registered twice"):
        S.register_signal("act_energy", "activation", ("outputs",), "prune_lowest")(lambda ctx: None)
    with pytest.raises(ValueError, match="unknown needs"):
        S.register_signal("x", "activation", ("telepathy",), "prune_lowest")
    with pytest.raises(ValueError, match="rule must be"):
        S.register_signal("x", "activation", ("outputs",), "prune_middle")


def test_table_shape_and_columns(table):
    assert list(table.columns) == ["layer", "orig_layer", *DESIGN_ORDER]
    assert len(table) == 3 and table["layer"].tolist() == [0, 1, 2] and table["orig_layer"].tolist() == [0, 1, 2]
    assert np.isfinite(table[DESIGN_ORDER].to_numpy()).all()


def test_activation_and_representation_signals_match_reference(model, tok, frame, table):
    ref = _reference_pass(model, tok, frame)
    for l in range(3):
        vals, norms, energies, angles = [], [], [], []
        for hs, _, mask, _, _ in ref:
            h_in, h_out = hs[l], hs[l + 1]
            for b in range(len(mask)):
                real = h_out[b][mask[b]]  # (n_tokens, hidden)
                vals.append(real.flatten())
                norms.append(real.norm(dim=-1))
                energies.append((real ** 2).sum() / mask[b].sum())
                cos = torch.nn.functional.cosine_similarity(h_in[b][mask[b]], real, dim=-1).clamp(-1, 1)
                angles.append(torch.arccos(cos) / math.pi)
        assert table.act_inhibition[l] == pytest.approx(torch.cat(vals).mean().item(), rel=1e-4, abs=1e-6)
        assert table.act_intensity[l] == pytest.approx(torch.cat(norms).mean().item(), rel=1e-5)
        assert table.act_energy[l] == pytest.approx(torch.stack(energies).mean().item(), rel=1e-5)
        assert table.repr_angular[l] == pytest.approx(torch.cat(angles).mean().item(), rel=1e-4)


def test_attention_entropy_matches_reference(model, tok, frame, table):
    ref = _reference_pass(model, tok, frame)
    for l in range(3):
        ents = []
        for _, att, mask, _, _ in ref:
            p = att[l]  # (B, H, T, T)
            for b in range(len(mask)):
                rows = p[b][:, mask[b]]  # (H, real queries, T)
                ents.append((-(rows * rows.clamp_min(1e-12).log()).sum(-1)).flatten())
        assert table.attn_entropy[l] == pytest.approx(torch.cat(ents).mean().item(), rel=1e-5)
    # Masked keys get no weight, so the entropy is at most log(longest real length).
    assert (table.attn_entropy <= math.log(16)).all()


def test_gradient_signals_match_autograd(model, tok, frame, table):
    batches = _batches(tok, frame)
    layer_params = [list(layer.parameters()) for layer in model.bert.encoder.layer]
    flat = [p for ps in layer_params for p in ps]
    n = len(frame)
    total = [torch.zeros_like(p) for p in flat]
    fisher = np.zeros(3)
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        grads = torch.autograd.grad(loss, flat)
        k = 0
        for l, ps in enumerate(layer_params):
            g = grads[k:k + len(ps)]
            fisher[l] += len(b["labels"]) * sum(float((x ** 2).sum()) for x in g)
            k += len(ps)
        total = [t + len(b["labels"]) * g for t, g in zip(total, grads)]
    mean = [t / n for t in total]
    k = 0
    for l, ps in enumerate(layer_params):
        g = mean[k:k + len(ps)]
        k += len(ps)
        assert table.grad_norm[l] == pytest.approx(math.sqrt(sum(float((x ** 2).sum()) for x in g)), rel=1e-4)
        assert table.grad_taylor[l] == pytest.approx(sum(float((p.detach() * x).abs().sum()) for p, x in zip(ps, g)),
                                                  rel=1e-4)
        assert table.grad_fisher[l] == pytest.approx(fisher[l] / n, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the pass left no .grad behind


def test_weight_signals_match_numpy(model, table):
    for l, layer in enumerate(model.bert.encoder.layer):
        w = np.concatenate([p.detach().numpy().ravel() for p in layer.parameters() if p.ndim >= 2])
        assert table.weight_norm[l] == pytest.approx(np.linalg.norm(w) / math.sqrt(w.size), rel=1e-6)
        counts, _ = np.histogram(np.abs(w), bins=256, range=(0, np.abs(w).max()))
        p = counts[counts > 0] / counts.sum()
        assert table.weight_entropy[l] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-3)


def test_weight_signals_by_hand():
    """Hand-set weights: layer 0 all 0.5 (RMS 0.5, one histogram bin: entropy 0); layer 1 half 1, half -3."""
    torch.manual_seed(0)
    m = T.BertForSequenceClassification(tiny_bert_config(num_labels=2, layers=2)).eval()
    with torch.no_grad():
        for p in m.bert.encoder.layer[0].parameters():
            if p.ndim >= 2:
                p.fill_(0.5)
        for p in m.bert.encoder.layer[1].parameters():
            if p.ndim >= 2:
                flat = p.view(-1)
                flat[: flat.numel() // 2] = 1.0
                flat[flat.numel() // 2:] = -3.0
    ctx = capture(m, [], {"weights"})
    t = S.signals_frame(ctx, [SIGNALS["weight_norm"], SIGNALS["weight_entropy"]])
    assert t.weight_norm.tolist() == pytest.approx([0.5, math.sqrt((1 + 9) / 2)])
    # |w| takes two values in equal numbers: entropy log 2.
    assert t.weight_entropy.tolist() == pytest.approx([0.0, math.log(2)])


def test_mutual_information_matches_sklearn(model, tok, frame, table):
    from sklearn.decomposition import PCA
    from sklearn.feature_selection import mutual_info_classif

    ref = _reference_pass(model, tok, frame)
    for l in range(3):
        pooled = torch.cat([(hs[l + 1] * m[..., None]).sum(1) / m.sum(1, keepdim=True) for hs, _, m, _, _ in ref])
        x = pooled.numpy().astype(np.float64)
        std = x.std(0)
        x = (x - x.mean(0)) / np.where(std > 0, std, 1)
        z = PCA(n_components=8, random_state=0).fit_transform(x)
        y = torch.cat([lab for *_, lab, _ in ref]).numpy()
        pred = torch.cat([lg.argmax(-1) for *_, lg in ref]).numpy()
        assert table.mi_task[l] == pytest.approx(mutual_info_classif(z, y, n_neighbors=3, random_state=0).mean(),
                                                 rel=1e-3, abs=1e-4)
        if len(np.unique(pred)) > 1:
            assert table.mi_prediction[l] == pytest.approx(
                mutual_info_classif(z, pred, n_neighbors=3, random_state=0).mean(), rel=1e-3, abs=1e-4)


def test_mi_is_high_for_a_separating_feature():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    informative = np.c_[y * 5.0 + rng.normal(size=200), rng.normal(size=(200, 3))]
    noise = rng.normal(size=(200, 4))
    assert pooled_mi(informative, y) > 5 * pooled_mi(noise, y)
    assert pooled_mi(noise, np.zeros(200, dtype=int)) == 0.0


# --------------------------------------------------------------------------- contract


def _hooks(model):
    n = 0
    for mod in model.modules():
        n += len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
        n += len(getattr(mod, "_forward_hooks_with_kwargs", {}))
    for p in model.parameters():
        n += len(p._backward_hooks or {})
    return n


def _state(model):
    return (model.training, model.config._attn_implementation, [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _same_state(a, b):
    return a[:3] == b[:3] and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                                  for x, y in zip(a[3], b[3]))


def _odd_model():
    """A model in train mode, with a frozen embedding and a stale .grad: all must survive."""
    torch.manual_seed(1)
    m = T.BertForSequenceClassification(tiny_bert_config(num_labels=2, layers=2))
    m.train()
    m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    m.classifier.weight.grad = torch.full_like(m.classifier.weight, 7.0)
    return m


def test_model_is_handed_back_as_it_came(tok, frame):
    m = _odd_model()
    before = _state(m)
    compute_signals(m, tok, frame, signals=[*DESIGN_ORDER, "activation_patching"], batch_size=8, max_length=16,
                    progress=False)
    assert _hooks(m) == 0 and _same_state(before, _state(m))


def test_hooks_removed_and_state_restored_when_the_pass_raises(tok, frame, monkeypatch):
    import signals.capture as cap

    m = _odd_model()
    before = _state(m)
    calls = []

    def boom(model, inputs, batch, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second batch")
        return real(model, inputs, batch, *args, **kwargs)

    real = cap.task_loss
    monkeypatch.setattr(cap, "task_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        compute_signals(m, tok, frame, batch_size=8, max_length=16, progress=False)
    assert _hooks(m) == 0 and _same_state(before, _state(m))


def test_hooks_removed_when_a_signal_raises(tok, frame, monkeypatch):
    m = _odd_model()
    before = _state(m)

    def broken(ctx):
        with S.capture.skip_layer(ctx.layers[0]):
            raise ValueError("signal failed mid-pass")

    monkeypatch.setitem(SIGNALS, "broken", S.Signal("broken", "extra", "prune_lowest", frozenset({"passes"}),
                                                      broken, False, ""))
    with pytest.raises(ValueError, match="signal failed"):
        compute_signals(m, tok, frame, signals=["act_energy", "broken"], batch_size=8, max_length=16, progress=False)
    assert _hooks(m) == 0 and _same_state(before, _state(m))


def test_pooled_buffer_is_capped(model, tok, frame):
    batches = [{k: v for k, v in b.items()} for b in _batches(tok, frame)]
    ctx = capture(model, batches, {"pooled"}, mi_cap=5)
    assert all(ctx.pooled_array(i).shape == (5, 32) for i in range(3))
    assert ctx.examples == len(frame)


def test_bad_inputs(tok, frame, model):
    with pytest.raises(BadInputError, match=r"'signals' parameter must be one of .* Got 'vibes'"):
        compute_signals(model, tok, frame, signals=["vibes"], progress=False)
    with pytest.raises(BadInputError, match="must have a classification or language-model head"):
        compute_signals(model.bert, tok, frame, progress=False)
    with pytest.raises(BadInputError, match="no rows"):
        compute_signals(model, tok, frame.iloc[:0], progress=False)


def test_untrained_head_warns(model, tok, frame):
    with pytest.warns(UserWarning, match="never trained"):
        compute_signals(model, tok, frame, signals=["act_energy"], head_trained=False, progress=False)


def test_extra_signals(tok, frame):
    from fusion_prune.surgery import drop_layers

    torch.manual_seed(0)
    cfg = tiny_bert_config(num_labels=2, layers=3)
    cfg.initializer_range, cfg.hidden_dropout_prob = 0.5, 0.2  # outputs that depend on every layer
    m = T.BertForSequenceClassification(cfg).eval()
    t = compute_signals(m, tok, frame, signals=["activation_patching", "mc_dropout", "layer_conductance"],
                        batch_size=8, max_length=16, progress=False)
    # Activation patching: skipping layer l by a hook is removing it; compare with surgery.
    batches = _batches(tok, frame)
    with torch.no_grad():
        def probs(model):
            return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.softmax(-1)
                              for b in batches])
        p = probs(m)
        for l in range(3):
            q = probs(drop_layers(m, [l]).eval())
            kl = (p * (p.log() - q.log())).sum(-1).mean().item()
            assert t.activation_patching[l] == pytest.approx(kl, rel=1e-4)
    assert (t.activation_patching > 0).all() and (t.mc_dropout > 0).all() and (t.layer_conductance > 0).all()
    assert np.isfinite(t.iloc[:, 2:].to_numpy()).all()


# --------------------------------------------------------------------------- every family

from test_surgery import ARCHITECTURES as _ARCH, CONFIGS as _CONFIGS  # noqa: E402

FAMILY_CASES = [(mt, auto) for mt in _CONFIGS for auto in
                ((T.AutoModelForSequenceClassification, T.AutoModelForCausalLM) if _ARCH[mt].kind == "decoder"
                 else (T.AutoModelForSequenceClassification,))]


@pytest.mark.parametrize("mt, auto", FAMILY_CASES, ids=[f"{m}-{a.__name__[12:]}" for m, a in FAMILY_CASES])
def test_all_twelve_signals_for_every_family(mt, auto):
    from signals.capture import capture

    torch.manual_seed(0)
    cfg = _CONFIGS[mt]()
    cfg.num_labels = 3
    m = auto.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 64, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        ids[0, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])})
    impl = m.config._attn_implementation
    needs = frozenset().union(*(SIGNALS[n].needs for n in DESIGN_ORDER))
    ctx = capture(m, batches, needs)
    t = S.signals_frame(ctx, [SIGNALS[n] for n in DESIGN_ORDER])
    assert t.shape == (4, 14) and np.isfinite(t[DESIGN_ORDER].to_numpy()).all()
    assert (t.grad_norm > 0).all() and (t.attn_entropy > 0).all() and (t.act_intensity > 0).all()
    assert _hooks(m) == 0 and m.config._attn_implementation == impl and not m.training
    assert all(p.grad is None for p in m.parameters())
