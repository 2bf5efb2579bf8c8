"""Exact McNemar test on paired binary outcomes (scipy's exact binomial test on the
discordant pairs), with the risk difference and the Haldane-corrected odds ratio."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from framework import hookimpl
from framework.interfaces import StatTest


class McNemar(StatTest):
    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
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


@hookimpl
def register_stats(register):
    register("mcnemar", McNemar)
