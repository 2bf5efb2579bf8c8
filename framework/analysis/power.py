"""Whether a claim run's design can reach its verdict, known from its sample counts before any
model work: per comparison the claim decides, the smallest p-value the design allows and the
power to detect the seed's effect at the run's sample size.

* exact McNemar on ``n`` pairs: the smallest two-sided p is ``2 * 0.5**n`` (every pair discordant
  the same way), and Holm over ``m`` comparisons multiplies the smallest raw p by ``m``;
* a null of ``K`` random draws: ``null_p_value`` is ``(1 + hits) / (K + 1)``, at best ``1 / (K + 1)``.

Power is exact: the paired outcomes are drawn with the seed's recalls (treatment, reference),
independently within a pair, and every table of discordant pairs (McNemar) or every treatment
recall with the binomial count of null draws at or below it (null) is summed. It is the power of
the comparison at the seed's effect, not of the whole verdict (claim 4 also asks recall to fall
with the dose). A design whose smallest p cannot fall below ``ALPHA`` is refused with the sample
size that would suffice; ``allow_underpowered=true`` runs it anyway, tagged ``underpowered``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from scipy.special import gammaln
from scipy.stats import binom

from framework.analysis.claims import ALPHA
from framework.interfaces import ConfigError

POWER_TARGET = 0.8
_MAX_SAMPLES = 500  # the largest sample size searched for the one that suffices

# The seed's recalls (DESIGN.md, seed 000): claim 1 masks the retrieval heads (1.00 -> 0.00, random
# heads: no effect), claim 4 zeroes 32 of 128 lowest-frequency dims (0.18, random dims: 0.98).
SEED_EFFECTS = {"causal_heads": (0.0, 1.0), "lowfreq_dose": (0.18, 0.98)}


def mcnemar_min_p(pairs: int, family: int = 1) -> float:
    """The smallest Holm-adjusted two-sided exact McNemar p that ``pairs`` pairs allow."""
    return min(1.0, family * 2 * 0.5**pairs) if pairs else 1.0


def null_min_p(draws: int) -> float:
    """The smallest permutation p-value against a null of ``draws`` draws."""
    return 1.0 / (draws + 1)


def mcnemar_power(pairs: int, treatment: float, reference: float, family: int = 1, alpha: float = ALPHA) -> float:
    """Probability that the exact McNemar test on ``pairs`` pairs, Holm-adjusted over ``family``
    comparisons (this one the smallest p), finds the treatment below the reference at ``alpha``."""
    if pairs == 0:
        return 0.0
    lost_p, gained_p = reference * (1 - treatment), treatment * (1 - reference)
    tie_p = 1.0 - lost_p - gained_p
    gained, lost = np.meshgrid(np.arange(pairs + 1), np.arange(pairs + 1), indexing="ij")
    valid = gained + lost <= pairs
    ties = np.where(valid, pairs - gained - lost, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = (gammaln(pairs + 1) - gammaln(gained + 1) - gammaln(lost + 1) - gammaln(ties + 1)
                 + _xlogy(gained, gained_p) + _xlogy(lost, lost_p) + _xlogy(ties, tie_p))
    discordant = gained + lost
    p_value = np.minimum(1.0, 2 * binom.cdf(np.minimum(gained, lost), np.maximum(discordant, 1), 0.5))
    significant = valid & (lost > gained) & (family * p_value < alpha)
    return float(np.exp(log_p[significant]).sum())


def _xlogy(count: np.ndarray, probability: float) -> np.ndarray:
    """count * log(probability), 0 where count is 0 (also when the probability is 0)."""
    return np.where(count > 0, count * np.log(probability) if probability > 0 else -np.inf, 0.0)


def null_power(samples: int, treatment: float, null: float, draws: int, alpha: float = ALPHA) -> float:
    """Probability that the treatment's recall on ``samples`` samples lies below a null of
    ``draws`` random draws (each with recall ``null``) at ``alpha``: ``(1 + hits) / (draws + 1) < alpha``,
    hits the draws at or below the treatment's recall."""
    most_hits = sum((1 + hits) / (draws + 1) < alpha for hits in range(draws + 1)) - 1  # the most that give p < alpha
    if most_hits < 0 or samples == 0:
        return 0.0
    correct = np.arange(samples + 1)
    at_or_below = binom.cdf(correct, samples, null)  # P(one null draw's count <= the treatment's)
    return float(np.sum(binom.pmf(correct, samples, treatment) * binom.cdf(most_hits, draws, at_or_below)))


@dataclass
class Comparison:
    """One comparison a claim's verdict needs, with its design and what the design allows."""

    key: str  # as logged: plan/<key>/...
    test: str
    samples: int
    family: int  # Holm over this many comparisons (1: none)
    draws: int  # random draws of a null (0: a paired test)
    effect: tuple[float, float]  # the seed's recall: treatment, reference

    def min_p(self, samples: int | None = None) -> float:
        n = self.samples if samples is None else samples
        return null_min_p(self.draws) if self.draws else mcnemar_min_p(n, self.family)

    def power(self, samples: int | None = None) -> float:
        n = self.samples if samples is None else samples
        if self.draws:
            return null_power(n, *self.effect, self.draws)
        return mcnemar_power(n, *self.effect, self.family)

    @property
    def reachable(self) -> bool:
        return self.min_p() < ALPHA

    def samples_needed(self, power: float = 0.0) -> int | None:
        """The fewest samples whose smallest p falls below ALPHA (and, with ``power``, that reach
        it); None where no sample size does (a null with too few draws)."""
        if self.draws and not self.reachable:
            return None
        n = 1
        while n <= _MAX_SAMPLES and not (self.min_p(n) < ALPHA and (not power or self.power(n) >= power)):
            n += 1
        return n if n <= _MAX_SAMPLES else None

    @property
    def design(self) -> str:
        if self.draws:
            return f"null of {self.draws} random draws"
        return f"exact McNemar on {self.samples} pairs" + (f", Holm over {self.family}" if self.family > 1 else "")

    def describe(self) -> str:
        treatment, reference = self.effect
        return (f"{self.test} ({self.design}): smallest reachable p {self.min_p():.3g}; power {self.power():.2f} "
                f"at the seed's recall {treatment:.2f} vs {reference:.2f}")

    def params(self) -> dict[str, Any]:
        return {f"plan/{self.key}/samples": self.samples, f"plan/{self.key}/holm_family": self.family,
                f"plan/{self.key}/null_draws": self.draws, f"plan/{self.key}/min_p": round(self.min_p(), 6),
                f"plan/{self.key}/power": round(self.power(), 4)}


def comparisons(config: Mapping[str, Any], samples: int) -> list[Comparison]:
    """The comparisons the run's claim decides by a p-value, given ``samples`` evaluation
    samples (every condition generates on all of them: ``samples`` pairs)."""
    claim = config.get("claim")
    if claim == "causal_heads":
        effect = SEED_EFFECTS[claim]
        return [Comparison("null", "treatment below the random head sets", samples, 1,
                           1 + int(config.get("controls") or 0), effect),
                Comparison("treatment_vs_control", "treatment below its matched control", samples, 1, 0, effect)]
    if claim == "lowfreq_dose":
        doses = len((config.get("dose") or {}).get("values") or [])
        return [Comparison("treatment_vs_control", "treatment below its control at the seed's dose", samples, doses, 0,
                           SEED_EFFECTS[claim])]
    return []


def report(found: list[Comparison]) -> list[str]:
    """The plan's lines on the design's power."""
    return [f"design: {c.describe()}" for c in found]


def check(config: Mapping[str, Any], found: list[Comparison]) -> str | None:
    """Refuse a design that cannot reach its claim's verdict (naming the smallest reachable p and
    the sample size that would suffice); with ``allow_underpowered``, or in a dry run, the refusal
    is returned as a note instead."""
    short = [c for c in found if not c.reachable]
    if not short:
        return None
    reasons = []
    for c in short:
        needed, powered = c.samples_needed(), c.samples_needed(POWER_TARGET)
        if c.draws:
            fix = f"a null of {math.ceil(1 / ALPHA)} draws or more would make it reachable (raise controls)"
        else:
            fix = (f"{needed} evaluation samples would make it reachable" if needed else "no sample size up to "
                   f"{_MAX_SAMPLES} would") + (f", {powered} give {POWER_TARGET:.0%} power at the seed's effect"
                                               if powered else "")
        reasons.append(f"{c.test} has {c.samples} samples, so its smallest reachable p is {c.min_p():.3g}, not below "
                       f"{ALPHA} ({c.design}); {fix}")
    message = (f"claim {config['claim']!r} cannot reach its verdict with this design: {'; '.join(reasons)}. "
               "Add samples (e.g. task.samples_per_cell) or set allow_underpowered=true to run it anyway")
    if config.get("allow_underpowered") or config.get("dry_run"):
        return message
    raise ConfigError(message)
