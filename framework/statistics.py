"""Statistics shared by stat plugins and the pipeline: effect sizes, multiple-testing
corrections and permutation-null p-values. scipy does the work wherever it has the method."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, false_discovery_control, spearmanr


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


def mcnemar_exact(treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of paired 0/1 outcomes: scipy's exact binomial test on the discordant
    pairs, with the risk difference and the Haldane-corrected odds ratio."""
    treatment, reference = np.asarray(treatment), np.asarray(reference)
    if not np.isin(np.concatenate([treatment, reference]), (0, 1)).all():
        raise ValueError("McNemar needs binary (0/1) per-sample outcomes")
    gained = int(np.sum((treatment == 1) & (reference == 0)))
    lost = int(np.sum((treatment == 0) & (reference == 1)))
    p_value = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {
        "p_value": float(p_value),
        "effect_size": float(treatment.mean() - reference.mean()),
        "odds_ratio": (gained + 0.5) / (lost + 0.5),
        "discordant_gained": gained,
        "discordant_lost": lost,
    }


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``a[..., :]`` and ``b[..., :]`` for every leading index (e.g. per
    head across its query dims); nan where either row is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    flat_a, flat_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rho = np.full(len(flat_a), np.nan)
    for i, (x, y) in enumerate(zip(flat_a, flat_b)):
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            rho[i] = spearmanr(x, y).statistic
    return rho.reshape(a.shape[:-1])
