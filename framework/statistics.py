"""Statistics shared by stat plugins and the pipeline: effect sizes, multiple-testing
corrections and permutation-null p-values. scipy does the work wherever it has the method."""

from __future__ import annotations

import numpy as np
from scipy.stats import false_discovery_control


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's d of two independent groups: mean difference over the pooled SD (nan if no spread)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / np.sqrt(pooled)) if pooled > 0 else float("nan")


def cohens_dz(differences: np.ndarray) -> float:
    """Cohen's d_z of paired differences: their mean over their SD (nan if no spread)."""
    differences = np.asarray(differences, dtype=float)
    spread = differences.std(ddof=1) if len(differences) > 1 else 0.0
    return float(differences.mean() / spread) if spread > 0 else float("nan")


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p_values = np.asarray(p_values, dtype=float)
    order = np.argsort(p_values)
    m = len(p_values)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p_values[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    return false_discovery_control(np.asarray(p_values, dtype=float), method="bh")


def null_p_value(observed: float, null: np.ndarray, alternative: str = "less") -> float:
    """Permutation p-value of ``observed`` against a null sample, counting the observed value
    itself ((1 + hits) / (1 + n)), so it is never 0. ``less``: is observed unusually low?"""
    null = np.asarray(null, dtype=float)
    if alternative == "less":
        hits = np.sum(null <= observed)
    elif alternative == "greater":
        hits = np.sum(null >= observed)
    else:
        centre = null.mean()
        hits = np.sum(np.abs(null - centre) >= abs(observed - centre))
    return float((1 + hits) / (1 + len(null)))
