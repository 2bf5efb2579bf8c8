"""Claim verdicts on hand-built run outcomes: each verdict says yes where the planted effect is
there and no where it is not, and its statistics match an independent computation."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, spearmanr, ttest_1samp

from framework.analysis.claims import causal_heads, check_claim, dims_grid, lowfreq_dose, norm_utility
from framework.analysis.compare import theta_verdict
from framework.interfaces import Condition, ConfigError, HeadScores, RunContext
from framework.model.attention import AttentionEdit
from framework.statistics import holm

N = 20


def condition(label: str, role: str, intervention: str = "head_mask", dose: float | None = None) -> Condition:
    return Condition(label, role, intervention, AttentionEdit(), dose)


def context_with(outcomes: dict[str, np.ndarray], conditions: list[Condition]) -> RunContext:
    return RunContext(config={}, run_id="test", conditions=conditions, outcomes=outcomes)


def table_of(context: RunContext, meta: dict[str, list] | None = None) -> pd.DataFrame:
    roles = {c.label: c for c in context.conditions}
    rows = []
    for label, values in context.outcomes.items():
        for i, correct in enumerate(values):
            c = roles.get(label)
            rows.append({"sample": i, "condition": label, "role": c.role if c else "baseline",
                         "dose": c.dose if c else None, "correct": float(correct),
                         **{k: v[i] for k, v in (meta or {}).items()}})
    return pd.DataFrame(rows)


def head_mask_run(treatment_correct: int, rng: np.random.Generator) -> RunContext:
    outcomes = {"baseline": np.ones(N), "treatment": np.r_[np.ones(treatment_correct), np.zeros(N - treatment_correct)]}
    conditions = [condition("treatment", "treatment"), condition("control", "control")]
    outcomes["control"] = (rng.random(N) < 0.9).astype(float)
    for i in range(1, 20):
        conditions.append(condition(f"null.{i}", "null"))
        outcomes[f"null.{i}"] = (rng.random(N) < 0.9).astype(float)
    return context_with(outcomes, conditions)


def test_causal_heads_verdict_follows_the_null():
    rng = np.random.default_rng(0)
    collapsed = head_mask_run(0, rng)
    metrics, figures = causal_heads(collapsed, table_of(collapsed))
    assert metrics["claim/verdict"] == 1.0 and "causal_heads.png" in figures
    assert metrics["claim/null_p_value"] == pytest.approx(1 / 21)  # below all 20 random draws
    lost = int(collapsed.outcomes["control"].sum())
    assert metrics["claim/treatment_vs_control_p_value"] == pytest.approx(binomtest(0, lost, 0.5).pvalue)

    unaffected = head_mask_run(18, rng)
    assert causal_heads(unaffected, table_of(unaffected))[0]["claim/verdict"] == 0.0


@pytest.mark.parametrize("name, override, missing", [
    ("claim1_causal_heads", "controls=5", "controls >= 19"),
    ("claim1_causal_heads", "intervention=zero_lowfreq", "+intervention=head_mask"),
    ("claim3_norm_utility", "~detectors.qnorm", "the qnorm detector"),
    ("claim4_lowfreq_dose", "dose.values=[0.25]", "a dose list of two or more values"),
    ("claim5_dims_grid", "~conditions.first_8", None),
])
def test_a_claim_its_config_cannot_reach_is_refused_before_the_run(compose_config, name, override, missing):
    """Each experiment's own config passes; without what its verdict needs it is refused, naming that."""
    check_claim(compose_config(f"+experiment={name}"))
    broken = compose_config(f"+experiment={name}", override)
    if missing is None:  # dims_grid keeps first_16, another mask_first_dims condition
        check_claim(broken)
        broken = compose_config(f"+experiment={name}", "~conditions.first_8", "~conditions.first_16")
        missing = "mask_first_dims and mask_last_dims conditions"
    with pytest.raises(ConfigError, match=re.escape(missing)):
        check_claim(broken)
    with pytest.raises(ConfigError, match="unknown claim 'nope'; available: causal_heads"):
        check_claim({"claim": "nope"})


def planted_norm_utility(sign: float, noise: float) -> RunContext:
    rng = np.random.default_rng(1)
    norms = rng.random((3, 4, 16))
    utility = np.clip(0.5 + sign * (norms - 0.5) + noise * rng.normal(size=norms.shape), 0, 1)
    scores = HeadScores("utility", utility.mean(-1), [], {"utility": utility})
    context = context_with({"baseline": np.ones(4)}, [])
    context.head_scores = scores
    context.detector_scores = {"qnorm": HeadScores("qnorm", norms.sum(-1), [], {"per_dim": norms})}
    return context


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_norm_utility_finds_a_planted_relation_and_its_sign(sign):
    context = planted_norm_utility(sign, 0.05)
    metrics, _ = norm_utility(context, table_of(context))
    norms, utility = context.detector_scores["qnorm"].extra["per_dim"], context.head_scores.extra["utility"]
    rho = np.array([spearmanr(n, u).statistic for n, u in zip(norms.reshape(12, 16), utility.reshape(12, 16))])
    assert metrics["claim/rho_mean"] == pytest.approx(rho.mean())
    assert metrics["claim/p_value"] == pytest.approx(ttest_1samp(rho, 0).pvalue)
    assert metrics["claim/cohens_d"] == pytest.approx(rho.mean() / rho.std(ddof=1))
    assert metrics["claim/verdict"] == sign


def test_norm_utility_without_a_relation_gives_no_direction():
    context = planted_norm_utility(0.0, 0.3)
    assert norm_utility(context, table_of(context))[0]["claim/verdict"] == 0.0


def dose_run(treatment_correct: list[int], control_correct: list[int] | None = None) -> RunContext:
    outcomes, conditions = {"baseline": np.ones(N)}, []
    for i, (dose, correct) in enumerate(zip((2, 4, 8), treatment_correct)):
        conditions += [condition(f"treatment.n_dims_{dose}", "treatment", "zero_lowfreq", dose),
                       condition(f"control.n_dims_{dose}", "control", "zero_lowfreq", dose)]
        outcomes[f"treatment.n_dims_{dose}"] = np.r_[np.ones(correct), np.zeros(N - correct)]
        kept = control_correct[i] if control_correct else N
        outcomes[f"control.n_dims_{dose}"] = np.r_[np.ones(kept), np.zeros(N - kept)]
    context = context_with(outcomes, conditions)
    context.config = {"dose": {"param": "n_dims"}}
    return context


def test_lowfreq_dose_needs_a_falling_curve_and_a_difference_from_control():
    falling = dose_run([19, 12, 3])
    metrics, figures = lowfreq_dose(falling, table_of(falling))
    assert metrics["claim/verdict"] == 1.0 and "lowfreq_dose.png" in figures
    assert metrics["claim/recall_drop.8"] == pytest.approx(17 / N)
    assert metrics["claim/dose_recall_spearman"] == pytest.approx(-1.0)
    raw = [binomtest(0, lost, 0.5).pvalue for lost in (1, 8, 17)]  # every lost sample is discordant
    expected = holm(np.array(raw))
    for dose, p_value in zip((2, 4, 8), expected):
        assert metrics[f"claim/treatment_vs_control_p_holm.{dose}"] == pytest.approx(p_value)
    assert metrics["claim/min_p_holm"] == pytest.approx(expected.min())
    flat = dose_run([19, 19, 19])
    assert lowfreq_dose(flat, table_of(flat))[0]["claim/verdict"] == 0.0


def test_lowfreq_dose_counts_a_middle_dose_when_random_dims_break_the_top_one():
    saturated = dose_run([10, 0, 0], control_correct=[20, 20, 0])  # at the top dose both collapse
    metrics, _ = lowfreq_dose(saturated, table_of(saturated))
    assert metrics["claim/treatment_vs_control_p_holm.8"] == 1.0
    assert metrics["claim/verdict"] == 1.0  # dose 4: 0/20 vs 20/20
    matched = dose_run([10, 0, 0], control_correct=[10, 0, 0])  # random dims hurt as much
    assert lowfreq_dose(matched, table_of(matched))[0]["claim/verdict"] == 0.0


def test_dims_grid_compares_last_with_first_dims():
    outcomes = {"baseline": np.ones(N), "treatment": np.r_[np.ones(5), np.zeros(15)], "control": np.ones(N),
                "first_8": np.r_[np.ones(19), np.zeros(1)], "last_8": np.r_[np.ones(10), np.zeros(10)]}
    conditions = [condition("treatment", "treatment", "mask_last_dims"), condition("control", "control", "mask_last_dims"),
                  condition("first_8", "extra", "mask_first_dims"), condition("last_8", "extra", "mask_last_dims")]
    context = context_with(outcomes, conditions)
    metrics, figures = dims_grid(context, table_of(context, {"gold_position": [1, 10] * (N // 2)}))
    assert metrics["claim/last_dims_drop"] == pytest.approx((15 / N + 10 / N) / 2)
    assert metrics["claim/first_dims_drop"] == pytest.approx(1 / N)
    assert metrics["claim/verdict"] == 1.0 and "dims_grid.png" in figures
    context.outcomes["first_8"] = np.zeros(N)
    assert dims_grid(context, table_of(context))[0]["claim/verdict"] == 0.0


def test_theta_verdict_compares_head_fractions_at_the_extreme_thetas():
    table = pd.DataFrame({"model": ["a", "a", "b", "c"], "rope_theta": [1e4, 1e4, 5e5, 1e6],
                          "heads_selected": [40, 44, 47, 30], "heads_fraction": [0.04, 0.044, 0.047, 0.03]})
    metrics = theta_verdict(table)
    assert metrics["claim2/fraction_at_lowest_theta"] == pytest.approx(0.042)  # mean over model a's runs
    assert metrics["claim2/fraction_at_highest_theta"] == pytest.approx(0.03)
    assert metrics["claim2/verdict"] == 0.0  # the highest theta has fewer heads: the claim fails here
    assert metrics["claim2/spearman_theta_fraction"] == pytest.approx(spearmanr([1e4, 5e5, 1e6], [0.042, 0.047, 0.03]).statistic)
    table.loc[3, "heads_fraction"] = 0.05
    assert theta_verdict(table)["claim2/verdict"] == 1.0
    assert theta_verdict(table[table["model"] == "a"]) == {}  # one theta: no verdict
