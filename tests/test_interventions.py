"""Query-dimension interventions: which dims each zeroes, and their matched random controls."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_llama

from framework.interfaces import ConfigError
from framework.registry import get_registry

HEADS = [(0, 1), (1, 3), (2, 0)]
HEAD_DIM = 16  # tiny_llama: pairs j and j + 8 rotate with inv_freq[j] = theta^(-2j/16), falling with j


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def zeroed(edit) -> dict:
    return {head: np.flatnonzero(np.asarray(scale) == 0).tolist() for head, scale in edit.query_scale.items()}


@pytest.mark.parametrize(
    "name, n_dims, expected",
    [
        ("zero_lowfreq", 4, [6, 7, 14, 15]),  # the two lowest-frequency pairs, both halves
        ("zero_highfreq", 4, [0, 1, 8, 9]),  # the two highest-frequency pairs, both halves
        ("mask_first_dims", 4, [0, 1, 2, 3]),  # raw indices, the paper's [:n]
        ("mask_last_dims", 4, [12, 13, 14, 15]),  # raw indices, the paper's [-n:]
    ],
)
def test_each_intervention_zeroes_its_dims_in_every_selected_head(model, compose_config, name, n_dims, expected):
    config = compose_config(f"+intervention={name}", f"intervention.n_dims={n_dims}")
    intervention = get_registry().create("intervention", config["intervention"])
    intervention.validate(model.info)
    assert zeroed(intervention.treatment(model, HEADS)) == {head: expected for head in HEADS}

    control = zeroed(intervention.control(model, HEADS, np.random.default_rng(0)))
    assert control.keys() == set(HEADS)
    for dims in control.values():
        assert len(dims) == n_dims
        if intervention.pairs:  # whole pairs: j present iff j + 8 present
            assert {d + 8 for d in dims if d < 8} == {d for d in dims if d >= 8}
    assert any(dims != expected for dims in control.values())


def test_default_dim_count_is_a_quarter_of_the_head(model, compose_config):
    intervention = get_registry().create("intervention", compose_config("+intervention=zero_highfreq")["intervention"])
    assert all(len(d) == HEAD_DIM // 4 for d in zeroed(intervention.treatment(model, HEADS)).values())


def test_random_dims_are_reproducible_per_seed_and_differ_between_heads(model):
    create = get_registry().create
    first = zeroed(create("intervention", {"name": "zero_random_dims", "n_dims": 6, "seed": 3}).treatment(model, HEADS))
    again = zeroed(create("intervention", {"name": "zero_random_dims", "n_dims": 6, "seed": 3}).treatment(model, HEADS))
    other = zeroed(create("intervention", {"name": "zero_random_dims", "n_dims": 6, "seed": 4}).treatment(model, HEADS))
    assert first == again and first != other
    assert len({tuple(d) for d in first.values()}) > 1


@pytest.mark.parametrize("name, n_dims, message", [
    ("zero_highfreq", 3, "n_dims=3 is impossible: it must be an even number"),
    ("zero_random_dims", 18, "n_dims=18 is impossible"),
    ("mask_last_dims", 17, "n_dims=17 is impossible: it must lie between 1 and the head dimension 16"),
])
def test_impossible_dim_counts_are_refused(model, name, n_dims, message):
    with pytest.raises(ConfigError, match=message):
        get_registry().create("intervention", {"name": name, "n_dims": n_dims}).validate(model.info)


def test_zero_lowutility_zeroes_each_heads_low_utility_dims(model):
    from framework.interfaces import Sample

    rng = np.random.default_rng(0)
    samples = [Sample(id=str(i), input_ids=rng.integers(3, 256, 24).tolist(), answer="", answer_ids=[5, 6],
                      context_span=(1, 16), query_start=16, needle_span=(4, 8)) for i in range(2)]
    intervention = get_registry().create("intervention", {"name": "zero_lowutility", "steps": 20})
    with pytest.raises(RuntimeError, match="prepare"):
        intervention.treatment(model, HEADS)
    intervention.prepare(model, samples)
    assert intervention.utility.shape == (3, 4, HEAD_DIM)
    assert ((intervention.utility >= 0) & (intervention.utility <= 1)).all()

    planted = np.ones((3, 4, HEAD_DIM))
    planted[0, 1, [2, 5, 11]] = 0.2  # three low-utility dims in head (0, 1), none elsewhere
    intervention.utility = planted
    assert zeroed(intervention.treatment(model, HEADS)) == {(0, 1): [2, 5, 11]}
    control = zeroed(intervention.control(model, HEADS, np.random.default_rng(1)))
    assert control.keys() == {(0, 1)} and len(control[(0, 1)]) == 3
