"""Planning a run's conditions (dose, extra random controls, named extra conditions) and the
comparisons between them, on a tiny Llama with hand-made head scores."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import tiny_llama

from framework.interfaces import ConfigError, HeadScores
from framework.registry import get_registry
from framework.runner.conditions import Plan, comparisons

# tiny_llama: 3 layers x 4 heads, head_dim 16
SCORES = np.array([[0.9, 0.1, 0.2, 0.8], [0.3, 0.7, 0.05, 0.0], [0.6, 0.4, 0.5, 0.15]])
DETECTED = HeadScores("hand", SCORES, [(0, 0), (0, 3), (1, 1)])


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def plan(compose_config, model, *overrides: str) -> Plan:
    return Plan.from_config(compose_config("+detector=attn_mass", *overrides), get_registry(), model.info)


def zeroed(edit) -> dict:
    return {head: np.flatnonzero(np.asarray(scale) == 0).tolist() for head, scale in edit.query_scale.items()}


def test_plain_run_has_treatment_and_control_compared_three_ways(compose_config, model):
    conditions = plan(compose_config, model, "+intervention=zero_lowfreq").conditions(model, DETECTED, 0)
    assert [(c.label, c.role) for c in conditions] == [("treatment", "treatment"), ("control", "control")]
    assert comparisons(conditions) == [("treatment", "baseline"), ("control", "baseline"), ("treatment", "control")]


def test_dose_over_n_dims_zeroes_that_many_lowest_frequency_dims(compose_config, model):
    planned = plan(compose_config, model, "+intervention=zero_lowfreq", "dose.param=n_dims", "dose.values=[4,2]")
    conditions = planned.conditions(model, DETECTED, 0)
    assert [c.label for c in conditions] == ["treatment.n_dims_2", "control.n_dims_2", "treatment.n_dims_4", "control.n_dims_4"]
    assert zeroed(conditions[0].edit) == {h: [7, 15] for h in DETECTED.selected}  # the lowest pair, both halves
    assert zeroed(conditions[2].edit) == {h: [6, 7, 14, 15] for h in DETECTED.selected}
    for control, dose in ((conditions[1], 2), (conditions[3], 4)):
        assert {len(d) for d in zeroed(control.edit).values()} == {dose} and control.dose == dose
    assert planned.intervention.n_dims is None  # the dose works on copies
    assert ("treatment.n_dims_4", "control.n_dims_4") in comparisons(conditions)


def test_dose_as_fraction_of_head_dim(compose_config, model):
    planned = plan(compose_config, model, "+intervention=zero_lowfreq", "dose.param=n_dims",
                   "dose.values=[0.125,0.25,0.5]", "dose.of_head_dim=true")
    assert planned.doses == [2, 4, 8]


def test_dose_over_heads_masks_the_top_scoring_heads(compose_config, model):
    planned = plan(compose_config, model, "+intervention=head_mask", "dose.param=heads", "dose.values=[1,4]")
    conditions = planned.conditions(model, DETECTED, 0)
    by_label = {c.label: c for c in conditions}
    ranked = np.argsort(-SCORES.ravel())
    top4 = sorted((int(i) // 4, int(i) % 4) for i in ranked[:4])
    assert by_label["treatment.heads_1"].edit.heads == [(0, 0)]
    assert by_label["treatment.heads_4"].edit.heads == top4
    control = by_label["control.heads_4"].edit.heads
    assert Counter(layer for layer, _ in control) == Counter(layer for layer, _ in top4)
    assert not set(control) & set(top4)


def test_extra_controls_are_distinct_random_head_sets_matched_per_layer(compose_config, model):
    conditions = plan(compose_config, model, "+intervention=head_mask", "controls=5").conditions(model, DETECTED, 0)
    nulls = [c for c in conditions if c.role == "null"]
    assert [c.label for c in nulls] == [f"null.{i}" for i in range(1, 6)]
    draws = {tuple(c.edit.heads) for c in nulls + [conditions[1]]}
    assert len(draws) > 1  # different seeds, different draws
    for heads in draws:
        assert Counter(layer for layer, _ in heads) == Counter(layer for layer, _ in DETECTED.selected)
        assert not set(heads) & set(DETECTED.selected)
    assert not any(label.startswith("null") for pair in comparisons(conditions) for label in pair)


def test_named_extra_conditions_act_on_the_detected_heads(compose_config, model):
    planned = plan(compose_config, model, "+intervention=mask_last_dims", "+intervention@conditions.first4=mask_first_dims",
                   "conditions.first4.n_dims=4")
    conditions = planned.conditions(model, DETECTED, 0)
    extra = conditions[-1]
    assert (extra.label, extra.role, extra.intervention) == ("first4", "extra", "mask_first_dims")
    assert zeroed(extra.edit) == {h: [0, 1, 2, 3] for h in DETECTED.selected}
    assert ("first4", "baseline") in comparisons(conditions)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dose.param=mode", "dose.values=[2]"], "dose param 'mode' is not a parameter of intervention 'zero_lowfreq'"),
        (["dose.param=n_dims", "dose.values=[3]"], "n_dims=3 is impossible"),
        (["dose.param=n_dims", "dose.values=[2]", "dose.of_head_dim=true"], "must be fractions in (0, 1]"),
        (["dose.param=heads", "dose.values=[13]"], "dose heads=13 is impossible: tiny_llama has 12 heads"),
        (["dose.param=n_dims"], "dose needs a param"),
        (["controls=-1"], "controls=-1 is impossible"),
        (["+intervention@conditions.control=mask_first_dims"], "condition label 'control' is reserved"),
    ],
)
def test_impossible_plans_say_what_and_why(compose_config, model, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        plan(compose_config, model, "+intervention=zero_lowfreq", *overrides)
