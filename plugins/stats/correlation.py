"""Pearson and Spearman correlation with their p-values (scipy), for paired per-item values such
as two detectors' scores of the same heads, or a head's query norm against its utility."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from framework.api import StatTest, hookimpl


class Correlation(StatTest):
    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        x, y = np.asarray(treatment, dtype=float).ravel(), np.asarray(reference, dtype=float).ravel()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            return {}  # a constant has no correlation
        pearson, spearman = pearsonr(x, y), spearmanr(x, y)
        return {
            "pearson_r": float(pearson.statistic),
            "pearson_p": float(pearson.pvalue),
            "spearman_rho": float(spearman.statistic),
            "p_value": float(spearman.pvalue),
            "effect_size": float(spearman.statistic),
        }


@hookimpl
def register_stats(register):
    register("correlation", Correlation)
