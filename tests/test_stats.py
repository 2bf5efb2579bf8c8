"""The paired tests against independent computations: exact enumeration and scipy."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap
from scipy.stats import t as t_dist

from framework.registry import get_registry
from framework.statistics import benjamini_hochberg, holm, null_p_value
from plugins.stats.mcnemar import McNemar
from plugins.stats.permutation import PairedPermutation


def exact_mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the binomial distribution, written out by hand."""
    n, k = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def exact_sign_flip_p(differences: np.ndarray) -> float:
    """Two-sided paired permutation p-value by enumerating every sign flip."""
    observed = abs(differences.mean())
    flips = [abs((differences * signs).mean()) for signs in itertools.product((1, -1), repeat=len(differences))]
    return float(np.mean(np.array(flips) >= observed - 1e-12))


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_hand_computation_and_scipy(seed):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 2, 30)
    treatment = np.where(rng.random(30) < 0.3, 1 - reference, reference)
    result = McNemar().compare(treatment, reference)
    gained = int(((treatment == 1) & (reference == 0)).sum())
    lost = int(((treatment == 0) & (reference == 1)).sum())
    assert result["p_value"] == pytest.approx(exact_mcnemar_p(gained, lost), rel=1e-9)
    if gained + lost:
        assert result["p_value"] == pytest.approx(binomtest(gained, gained + lost).pvalue)
    assert result["effect_size"] == pytest.approx(treatment.mean() - reference.mean())


def test_mcnemar_collapse_is_significant():
    result = McNemar().compare(np.zeros(20), np.ones(20))
    assert result["p_value"] == pytest.approx(2 * 0.5**20)
    assert result["effect_size"] == -1.0


def test_mcnemar_rejects_non_binary_outcomes():
    with pytest.raises(ValueError, match="binary"):
        McNemar().compare(np.array([0.5, 1.0]), np.array([1.0, 0.0]))


@pytest.mark.parametrize("seed", range(4))
def test_permutation_matches_full_enumeration(seed):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 2, 12).astype(float)
    treatment = np.where(rng.random(12) < 0.4, 1 - reference, reference)
    result = PairedPermutation().compare(treatment, reference)
    differences = treatment - reference
    assert result["p_value"] == pytest.approx(exact_sign_flip_p(differences), abs=1e-9)
    assert result["effect_size"] == pytest.approx(differences.mean())
    if differences.std(ddof=1) > 0:
        assert result["cohens_dz"] == pytest.approx(differences.mean() / differences.std(ddof=1))


def test_cohens_d_and_dz_match_their_formulas():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, 25), rng.normal(0.0, 1.0, 25)
    result = get_registry().create("stats", {"name": "cohens_d"}).compare(a, b)
    pooled = np.sqrt((24 * np.var(a, ddof=1) + 24 * np.var(b, ddof=1)) / 48)
    assert result["cohens_d"] == pytest.approx((a.mean() - b.mean()) / pooled)
    assert result["cohens_dz"] == pytest.approx((a - b).mean() / (a - b).std(ddof=1))
    assert get_registry().create("stats", {"name": "cohens_d"}).compare(np.ones(5), np.ones(5)) == {}


def test_bootstrap_interval_matches_scipy_and_covers_the_mean():
    rng = np.random.default_rng(2)
    treatment, reference = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    result = get_registry().create("stats", {"name": "bootstrap", "seed": 5}).compare(treatment, reference)
    differences = (treatment - reference).astype(float)
    expected = bootstrap((differences,), np.mean, n_resamples=9999, method="BCa", random_state=5).confidence_interval
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert result["ci_low"] <= differences.mean() <= result["ci_high"]
    constant = get_registry().create("stats", {"name": "bootstrap"}).compare(np.zeros(10), np.ones(10))
    assert constant == {"effect_size": -1.0, "ci_low": -1.0, "ci_high": -1.0}


def test_correlation_matches_numpy_and_ranks():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    result = get_registry().create("stats", {"name": "correlation"}).compare(x, y)
    assert result["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties in continuous data)
    assert result["spearman_rho"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    # the Pearson p-value from the t distribution, by hand
    r = result["pearson_r"]
    assert result["pearson_p"] == pytest.approx(2 * t_dist.sf(abs(r) * np.sqrt(28 / (1 - r * r)), 28))


def test_holm_and_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted p * 4 / rank -> 0.02, 0.02, 0.04, 0.04, then running min from the top
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert holm(np.array([0.6, 0.9])) == pytest.approx([1.0, 1.0])


def test_null_p_value_counts_the_observed_value():
    null = np.array([0.9, 0.8, 0.7, 0.2, 0.95])
    assert null_p_value(0.1, null) == pytest.approx(1 / 6)
    assert null_p_value(0.75, null) == pytest.approx(3 / 6)
    assert null_p_value(0.96, null, "greater") == pytest.approx(1 / 6)
