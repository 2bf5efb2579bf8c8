"""Dose series over any numeric intervention parameter: fractional values for float parameters,
whole numbers enforced for int ones, labels and plot axes named after the parameter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_llama

from framework import plots
from framework.interfaces import ConfigError, HeadScores
from framework.registry import get_registry
from framework.runner.conditions import Plan

DETECTED = HeadScores("hand", np.zeros((3, 4)), [(0, 0), (1, 2)])


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def plan(compose_config, model, *overrides: str) -> Plan:
    return Plan.from_config(compose_config("+detector=attn_mass", *overrides), get_registry(), model.info)


def test_a_float_parameter_takes_fractional_doses(compose_config, model):
    planned = plan(compose_config, model, "+intervention=zero_lowutility", "dose.param=threshold",
                   "dose.values=[0.5,0.25,1]")
    assert planned.doses == [0.25, 0.5, 1.0] and planned.dose_label == "zero_lowutility: threshold"
    utility = np.random.default_rng(0).uniform(size=(3, 4, 16))
    planned.intervention.utility = utility  # what prepare() fits, made by hand
    conditions = planned.conditions(model, DETECTED, 0)
    assert [c.label for c in conditions][:4] == ["treatment.threshold_0.25", "control.threshold_0.25",
                                                 "treatment.threshold_0.5", "control.threshold_0.5"]
    for condition in conditions:
        if condition.role == "treatment":
            zeroed = {h: np.flatnonzero(np.asarray(s) == 0).tolist() for h, s in condition.edit.query_scale.items()}
            assert zeroed == {h: np.flatnonzero(utility[h] < condition.dose).tolist() for h in DETECTED.selected
                              if (utility[h] < condition.dose).any()}


@pytest.mark.parametrize("overrides, message", [
    (["+intervention=zero_lowfreq", "dose.param=n_dims", "dose.values=[2,2.5]"],
     "must be whole numbers: zero_lowfreq parameter 'n_dims' is an int"),
    (["+intervention=head_mask", "dose.param=heads", "dose.values=[1.5]"], "dose.param=heads counts heads"),
    (["+intervention=zero_lowfreq", "dose.param=n_dims", "dose.values=[two]"], "must be numbers"),
])
def test_whole_number_parameters_refuse_fractions(compose_config, model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(compose_config, model, *overrides)


def test_whole_number_doses_keep_their_labels(compose_config, model):
    planned = plan(compose_config, model, "+intervention=zero_lowfreq", "dose.param=n_dims", "dose.values=[4.0,2]")
    assert planned.doses == [2, 4] and all(isinstance(d, int) for d in planned.doses)
    assert planned.conditions(model, DETECTED, 0)[0].label == "treatment.n_dims_2"


def test_the_dose_figure_names_its_axis_after_the_parameter():
    table = pd.DataFrame({"condition": ["baseline", "treatment.factor_0.5", "control.factor_0.5"] * 2,
                          "role": ["baseline", "treatment", "control"] * 2, "dose": [None, 0.5, 0.5] * 2,
                          "correct": [1.0, 0.2, 0.9, 1.0, 0.4, 0.7]})
    figure = plots.recall_by_dose(table, "output_scale: factor")
    assert figure.axes[0].get_xlabel() == "output_scale: factor"
