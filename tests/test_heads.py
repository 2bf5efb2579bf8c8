"""Head selection and the per-layer matched random control."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from framework.interfaces import ConfigError, ModelInfo
from framework.model.heads import check_selection, layer_groups_by_type, random_heads_matched_per_layer, select_heads

INFO = ModelInfo("m", "llama", n_layers=4, n_heads=6, n_kv_heads=2, head_dim=16, rope_theta=1e4)


def test_threshold_and_top_k_selection_match_a_sort():
    scores = np.random.default_rng(0).random((4, 6))
    above = select_heads(scores, threshold=0.5)
    assert above == sorted((int(l), int(h)) for l, h in zip(*np.nonzero(scores > 0.5)))
    top = select_heads(scores, top_k=5)
    fifth_best = np.sort(scores.ravel())[-5]
    assert top == sorted((int(l), int(h)) for l, h in zip(*np.nonzero(scores >= fifth_best)))
    both = select_heads(scores, threshold=0.9, top_k=50)
    assert both == sorted((int(l), int(h)) for l, h in zip(*np.nonzero(scores > 0.9)))


def test_ties_are_broken_deterministically():
    scores = np.ones((2, 3))
    assert select_heads(scores, top_k=2) == [(0, 0), (0, 1)]


def test_impossible_selections_are_refused():
    with pytest.raises(ConfigError, match="top_k=25 is impossible.*24 heads"):
        check_selection(None, 25, INFO)
    with pytest.raises(ConfigError, match="threshold or a top_k"):
        check_selection(None, None, INFO)


@pytest.mark.parametrize("seed", range(5))
def test_random_heads_are_matched_per_layer_and_disjoint(seed):
    heads = [(0, 1), (0, 4), (2, 0), (3, 5), (3, 2), (3, 3)]
    control = random_heads_matched_per_layer(heads, 6, np.random.default_rng(seed))
    assert Counter(l for l, _ in control) == Counter(l for l, _ in heads)
    assert not set(control) & set(heads)
    assert len(set(control)) == len(control)


def test_random_control_differs_between_seeds_and_repeats_within_one():
    heads = [(layer, 0) for layer in range(4)]
    draws = {tuple(random_heads_matched_per_layer(heads, 6, np.random.default_rng(s))) for s in range(10)}
    assert len(draws) > 1
    again = random_heads_matched_per_layer(heads, 6, np.random.default_rng(3))
    assert again == random_heads_matched_per_layer(heads, 6, np.random.default_rng(3))


def test_matched_control_impossible_when_a_layer_is_mostly_selected():
    heads = [(0, h) for h in range(4)]
    with pytest.raises(ConfigError, match="layer 0 has 4 selected heads but only 2 others"):
        random_heads_matched_per_layer(heads, 6, np.random.default_rng(0))


def test_a_full_layer_draws_its_control_from_the_same_layer_type_only_when_asked():
    heads = [(0, h) for h in range(4)] + [(1, 0)]  # layer 0 (4 heads) entirely selected
    with pytest.raises(ConfigError, match="control_fallback=same_type"):
        random_heads_matched_per_layer(heads, 4, np.random.default_rng(0))
    groups = [[0, 3], [1, 2]]
    for seed in range(5):
        control = random_heads_matched_per_layer(heads, 4, np.random.default_rng(seed), groups)
        assert sorted(l for l, _ in control) == [1, 3, 3, 3, 3]  # layer 0's 4 from layer 3, its group
        assert not set(control) & set(heads) and len(set(control)) == 5
    matched = [(0, 1), (2, 3)]  # no shortfall: the groups change nothing
    assert random_heads_matched_per_layer(matched, 4, np.random.default_rng(7), groups) == \
        random_heads_matched_per_layer(matched, 4, np.random.default_rng(7))


def test_layer_groups_follow_the_config_layer_types():
    class Config:
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

    assert layer_groups_by_type(Config(), 4) == [[0, 2], [1, 3]]
    assert layer_groups_by_type(object(), 3) == [[0, 1, 2]]
