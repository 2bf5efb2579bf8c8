"""The paired tests against independent computations: exact enumeration and scipy."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
from scipy.stats import binomtest

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
