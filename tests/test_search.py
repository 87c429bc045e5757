"""Search beyond greedy: the set search, the kept-layers score it measures by, and evo-search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fusion_prune.search import search_removal
from test_causal_lm import corpus_txt  # noqa: F401 (a fixture)


def test_the_search_finds_a_set_greedy_misses():
    # Removing 1 or 2 alone is cheapest, but together they break the model; 3 + 4 is best as a pair.
    single = {0: 5.0, 1: 0.1, 2: 0.2, 3: 0.5, 4: 0.6, 5: 5.0}

    def loss(s):
        return 10.0 if {1, 2} <= set(s) else sum(single[i] for i in s)

    greedy = sorted(sorted(single, key=single.get)[:2])
    assert loss(greedy) == 10.0
    r = search_removal(loss, allowed=[1, 2, 3, 4], k=2, prior=np.array([0, 1, 1, 0, 0, 0.0]), generations=10)
    best = min(itertools.combinations([1, 2, 3, 4], 2), key=loss)
    assert r.removed == sorted(best) and r.loss == loss(best)
    assert len({tuple(s) for s, _ in r.trace}) == r.measured == len(r.trace)  # never a set twice
    assert all(len(s) == 2 and set(s) <= {1, 2, 3, 4} for s, _ in r.trace)
    with pytest.raises(ValueError, match="k must be in 1..4"):
        search_removal(loss, [1, 2, 3, 4], 5)


def test_a_seed_better_than_the_prior_is_the_first_parent():
    r = search_removal(lambda s: float(sum(s)), allowed=list(range(8)), k=3, prior=np.arange(8.0),
                       seeds=[[0, 1, 2]], generations=0)
    assert r.removed == [0, 1, 2] and r.measured == 2  # the prior's top set (5, 6, 7) and the seed


def test_kept_scores_equal_the_pruned_copys(tmp_path):
    from test_causal_lm import prose, tiny_decoder

    from conftest import make_tokenizer
    from fusion_prune.corpus import window_batches
    from fusion_prune.dropone import kept_scores, next_token_score
    from fusion_prune.surgery import drop_layers, num_layers

    model = tiny_decoder("llama", layers=5).eval()
    tok = make_tokenizer(tmp_path)
    ids = tok(" ".join(prose(4)), return_tensors="pt")["input_ids"][0][:64].reshape(4, 16)
    batches = list(window_batches(ids, 2, torch.device("cpu")))
    got = kept_scores(model, batches, next_token_score, [0, 2, 4])
    small = drop_layers(model, [1, 3])
    with torch.no_grad():
        want = sum(np.asarray(next_token_score(small, {k: v for k, v in b.items() if k != "labels"}
                                               | {"use_cache": False}, b)) for b in batches)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert num_layers(model) == 5  # the model is put back


def test_evo_search_removes_the_set_of_lowest_calibration_loss(tmp_path, corpus_txt):  # noqa: F811
    """On a 6-layer model down to 3, keeping the first and last: every 3-set of layers 1-4 is reachable."""
    from test_causal_lm import tiny_decoder

    from conftest import make_tokenizer
    from fusion_prune.config import StepConfig
    from fusion_prune.dropone import kept_scores
    from fusion_prune.fusion import load_bundle
    from fusion_prune.strategies import STRATEGIES, StrategyState
    from fusion_prune.tasks import get_task
    from signals import DEFAULT_SIGNALS

    model = tiny_decoder("llama", layers=6)
    tok = make_tokenizer(tmp_path)
    task = get_task("causal-lm")
    task.data = task.load_data(str(corpus_txt))
    step = StepConfig(signal_samples=2, max_length=16, batch_size=2, seed=0, progress=False)
    task.resolve_step(step)
    batches = task.calibration_batches(model, tok, step, 0)
    state = StrategyState(model, batches, 6, 3, list(range(6)), task.signals(model, batches, list(DEFAULT_SIGNALS)),
                          bundle=load_bundle(task.default_bundle), task=task)
    removed = STRATEGIES["evo-search"].fn(state)

    def loss(s):
        _, total, count = kept_scores(model, batches, task.score, [i for i in range(6) if i not in s])
        return total / count

    best = min(itertools.combinations(range(1, 5), 3), key=loss)
    assert sorted(removed) == list(best)
    assert state.evidence["removed in the best set"] == [float(i in best) for i in range(6)]
