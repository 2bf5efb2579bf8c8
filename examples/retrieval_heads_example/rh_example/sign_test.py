"""Exact sign test on the paired per-sample differences: how many samples got better and how
many worse, against a fair coin (scipy's ``binomtest``); ties are dropped. It assumes nothing
about the size of the differences, so it fits binary and continuous scores alike."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from framework.api import SCORE_KINDS, StatTest, hookimpl


class SignTest(StatTest):
    accepts = frozenset(SCORE_KINDS)  # binary and continuous scores

    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        differences = np.asarray(treatment, dtype=float) - np.asarray(reference, dtype=float)
        better, worse = int((differences > 0).sum()), int((differences < 0).sum())
        p_value = binomtest(better, better + worse).pvalue if better + worse else 1.0
        return {"p_value": float(p_value), "effect_size": float(differences.mean()), "better": better, "worse": worse}


@hookimpl
def register_stats(register):
    register("sign_test", SignTest)
