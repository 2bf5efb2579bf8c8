"""Cohen's d (the two conditions as independent groups, pooled SD) and d_z (paired differences):
standardised effect sizes for comparing magnitudes across models and tasks."""

from __future__ import annotations

import numpy as np

from framework.api import StatTest, cohens_d, cohens_dz, hookimpl


class CohensD(StatTest):
    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        treatment, reference = np.asarray(treatment, dtype=float), np.asarray(reference, dtype=float)
        values = {"cohens_d": cohens_d(treatment, reference), "cohens_dz": cohens_dz(treatment - reference)}
        out = {key: value for key, value in values.items() if np.isfinite(value)}
        if "cohens_d" in out:
            out["effect_size"] = out["cohens_d"]
        return out


@hookimpl
def register_stats(register):
    register("cohens_d", CohensD)
