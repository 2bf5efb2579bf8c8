"""The plan's power numbers against independent computations: scipy's exact binomial test and
a brute-force enumeration of every paired outcome, and the refusal of designs that cannot
reach their verdict."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from framework.analysis import power
from framework.interfaces import ConfigError
from framework.statistics import mcnemar_exact, null_p_value


@pytest.mark.parametrize("pairs", [1, 2, 3, 5, 8])
def test_smallest_mcnemar_p_is_what_scipy_gives_when_every_pair_disagrees_one_way(pairs):
    assert power.mcnemar_min_p(pairs) == pytest.approx(binomtest(0, pairs, 0.5).pvalue)
    assert power.mcnemar_min_p(pairs, family=3) == pytest.approx(min(1.0, 3 * binomtest(0, pairs, 0.5).pvalue))


def test_claim4_long_gemma3_design_allows_at_best_p_075():
    """3 pairs, Holm over 3 doses: the issue's 0.75."""
    assert power.mcnemar_min_p(3, family=3) == pytest.approx(0.75)


def _brute_force_mcnemar_power(pairs: int, treatment: float, reference: float, family: int) -> float:
    """Every assignment of the four paired outcomes to the pairs, with its probability."""
    cells = {(t, r): (treatment if t else 1 - treatment) * (reference if r else 1 - reference)
             for t in (0, 1) for r in (0, 1)}
    total = 0.0
    for outcome in itertools.product(cells, repeat=pairs):
        t, r = np.array([o[0] for o in outcome]), np.array([o[1] for o in outcome])
        result = mcnemar_exact(t, r)
        if result["effect_size"] < 0 and family * result["p_value"] < 0.05:
            total += np.prod([cells[o] for o in outcome])
    return total


@pytest.mark.parametrize("pairs, treatment, reference, family", [(5, 0.18, 0.98, 1), (6, 0.3, 0.9, 2), (4, 0.0, 1.0, 1)])
def test_mcnemar_power_matches_brute_force_enumeration(pairs, treatment, reference, family):
    expected = _brute_force_mcnemar_power(pairs, treatment, reference, family)
    assert power.mcnemar_power(pairs, treatment, reference, family) == pytest.approx(expected, abs=1e-12)


def test_null_power_matches_a_simulation_of_the_permutation_p_value():
    rng = np.random.default_rng(0)
    samples, treatment, null, draws = 10, 0.5, 0.8, 19
    treated = rng.binomial(samples, treatment, 20000) / samples
    nulls = rng.binomial(samples, null, (20000, draws)) / samples
    simulated = np.mean([null_p_value(t, n) < 0.05 for t, n in zip(treated, nulls)])
    assert power.null_power(samples, treatment, null, draws) == pytest.approx(simulated, abs=0.01)
    assert power.null_min_p(draws) == 1 / 20
    assert power.null_power(samples, 0.0, 1.0, 19) == 0.0  # 1/20 is not below 0.05
    assert power.null_power(samples, 0.0, 1.0, 20) == pytest.approx(1.0)  # 1/21 is, and certain at this effect
    assert power.null_power(samples, 0.7, 0.7, 20) == pytest.approx(
        sum(binom.pmf(k, samples, 0.7) * binom.cdf(k, samples, 0.7) ** 0 * (1 - binom.cdf(k, samples, 0.7)) ** 20
            for k in range(samples + 1)))  # no hit among 20 draws


def test_a_claim4_design_with_three_samples_is_refused_naming_its_smallest_p_and_the_sample_size():
    config = {"claim": "lowfreq_dose", "dose": {"values": [0.03125, 0.125, 0.25]}}
    found = power.comparisons(config, samples=3)
    with pytest.raises(ConfigError, match=r"smallest reachable p is 0\.75, not below 0\.05") as refused:
        power.check(config, found)
    needed = found[0].samples_needed()
    assert f"{needed} evaluation samples would make it reachable" in str(refused.value)
    assert power.mcnemar_min_p(needed, 3) < 0.05 <= power.mcnemar_min_p(needed - 1, 3)
    assert "allow_underpowered=true" in str(refused.value)
    assert power.check({**config, "allow_underpowered": True}, found).startswith("claim 'lowfreq_dose' cannot")
    assert power.check(config, power.comparisons(config, samples=20)) is None


def test_claim1_needs_nineteen_controls_for_its_null():
    few = power.comparisons({"claim": "causal_heads", "controls": 5}, samples=20)
    assert few[0].min_p() == pytest.approx(1 / 7) and not few[0].reachable
    enough = power.comparisons({"claim": "causal_heads", "controls": 19}, samples=20)
    assert all(c.reachable for c in enough) and enough[0].power() == pytest.approx(1.0)
    assert power.comparisons({"claim": "dims_grid"}, samples=3) == []  # no p-value decides it
