"""Paired bootstrap confidence interval of the mean difference (scipy's ``bootstrap``, BCa by
default), for reporting how large an effect is, not only whether it exists."""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap

from framework.api import StatTest, hookimpl


class PairedBootstrap(StatTest):
    def __init__(self, confidence: float = 0.95, n_resamples: int = 9999, method: str = "BCa", seed: int = 0):
        self.confidence = confidence
        self.n_resamples = n_resamples
        self.method = method
        self.seed = seed

    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        differences = np.asarray(treatment, dtype=float) - np.asarray(reference, dtype=float)
        out = {"effect_size": float(differences.mean())}
        if np.ptp(differences) == 0:  # every resample is identical: the interval is the point
            out["ci_low"] = out["ci_high"] = out["effect_size"]
            return out
        result = bootstrap(
            (differences,), np.mean, confidence_level=self.confidence, n_resamples=self.n_resamples,
            method=self.method, random_state=self.seed,
        )
        out["ci_low"], out["ci_high"] = float(result.confidence_interval.low), float(result.confidence_interval.high)
        return out


@hookimpl
def register_stats(register):
    register("bootstrap", PairedBootstrap)
