"""Paired permutation test (sign flips of the per-sample differences, scipy's
``permutation_test``; exact when 2^n <= n_resamples) with Cohen's d_z as effect size."""

from __future__ import annotations

import numpy as np
from scipy.stats import permutation_test

from framework.api import StatTest, cohens_dz, hookimpl


def _mean_difference(treatment: np.ndarray, reference: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(treatment - reference, axis=axis)


class PairedPermutation(StatTest):
    def __init__(self, n_resamples: int = 100_000, seed: int = 0):
        self.n_resamples = n_resamples
        self.seed = seed

    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        treatment = np.asarray(treatment, dtype=float)
        reference = np.asarray(reference, dtype=float)
        differences = treatment - reference
        result = permutation_test(
            (treatment, reference),
            _mean_difference,
            permutation_type="samples",
            vectorized=True,
            n_resamples=self.n_resamples,
            random_state=self.seed,
        )
        out = {
            "p_value": float(min(1.0, result.pvalue)),
            "effect_size": float(differences.mean()),
            "statistic": float(result.statistic),
        }
        dz = cohens_dz(differences)
        if np.isfinite(dz):
            out["cohens_dz"] = dz
        return out


@hookimpl
def register_stats(register):
    register("permutation", PairedPermutation)
