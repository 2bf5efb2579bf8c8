"""Wilcoxon signed-rank test on the paired per-sample differences (scipy's ``wilcoxon``, exact
for small samples without ties), for scores between 0 and 1 where a sign flip of the mean
difference alone wastes the ranks; effect size: the mean difference and the matched-pairs rank
biserial correlation."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, wilcoxon

from framework.api import ConfigError, StatTest, hookimpl

ZERO_METHODS = ("wilcox", "pratt", "zsplit")


class Wilcoxon(StatTest):
    def __init__(self, zero_method: str = "wilcox"):
        if zero_method not in ZERO_METHODS:
            raise ConfigError(f"wilcoxon zero_method={zero_method!r} is unknown; choose one of {', '.join(ZERO_METHODS)}")
        self.zero_method = zero_method

    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        differences = np.asarray(treatment, dtype=float) - np.asarray(reference, dtype=float)
        out = {"effect_size": float(differences.mean())}
        nonzero = differences[differences != 0]
        if len(nonzero) == 0:  # no sample differs: nothing to rank
            out["p_value"] = 1.0
            return out
        ranks = rankdata(np.abs(nonzero))
        out["rank_biserial"] = float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())
        result = wilcoxon(differences, zero_method=self.zero_method)
        out["statistic"], out["p_value"] = float(result.statistic), float(result.pvalue)
        return out


@hookimpl
def register_stats(register):
    register("wilcoxon", Wilcoxon)
