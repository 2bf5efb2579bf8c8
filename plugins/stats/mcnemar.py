"""Exact McNemar test on paired binary outcomes (scipy's exact binomial test on the
discordant pairs), with the risk difference and the Haldane-corrected odds ratio."""

from __future__ import annotations

import numpy as np

from framework.api import StatTest, hookimpl, mcnemar_exact


class McNemar(StatTest):
    accepts = frozenset({"binary"})  # counts discordant pairs of 0/1 outcomes

    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        return mcnemar_exact(treatment, reference)


@hookimpl
def register_stats(register):
    register("mcnemar", McNemar)
