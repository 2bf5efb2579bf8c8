"""Verdicts on the seed claims (DESIGN.md, claims 1-5) from a finished run: metrics and the figure
the paper shows.

An experiment config (``conf/experiment/``) names its claim with ``claim: <name>``; the run then
logs ``claim/...`` metrics, among them ``claim/verdict``, and ``claim/<name>.png``. Verdicts test
at ``ALPHA``. Claim 2 (theta vs head count) needs several models: its per-run part logs the head
count and theta, and ``python -m framework.analysis.compare`` gives the verdict across runs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from scipy.stats import spearmanr, ttest_1samp

from framework import plots
from framework.interfaces import BASELINE, ConfigError, RunContext
from framework.plots import plt, sns
from framework.statistics import cohens_dz, holm, mcnemar_exact, null_p_value, rowwise_spearman

ALPHA = 0.05
Verdict = tuple[dict[str, float], dict[str, plt.Figure]]


def _recall(context: RunContext, label: str) -> float:
    return float(np.mean(context.outcomes[label]))


def _labels(context: RunContext, role: str) -> list[str]:
    return [c.label for c in context.conditions if c.role == role]


def causal_heads(context: RunContext, table: pd.DataFrame) -> Verdict:
    """Claim 1: masking the detected heads collapses recall; masking random heads matched per
    layer does not. Verdict 1 when the treatment's recall is below the null of random controls
    (p < ALPHA) and below the matched control's by an exact McNemar test (p < ALPHA)."""
    nulls = _labels(context, "control") + _labels(context, "null")
    treatment = _recall(context, "treatment")
    null = np.array([_recall(context, label) for label in nulls])
    p_null = null_p_value(treatment, null, "less")
    p_control = mcnemar_exact(context.outcomes["treatment"], context.outcomes["control"])["p_value"]
    baseline = _recall(context, BASELINE)
    metrics = {
        "claim/recall_drop": baseline - treatment,
        "claim/null_recall_drop_mean": baseline - float(null.mean()),
        "claim/null_p_value": p_null,
        "claim/treatment_vs_control_p_value": p_control,
        "claim/verdict": float(p_null < ALPHA and p_control < ALPHA),
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.histplot(null, bins=np.linspace(0, 1, 21), ax=ax, label=f"{len(null)} random head sets (matched per layer)")
    ax.axvline(treatment, color="red", lw=2, label=f"detected heads masked ({treatment:.2f})")
    ax.axvline(baseline, color="black", ls="--", label=f"no mask ({baseline:.2f})")
    ax.set(xlim=(-0.02, 1.02), xlabel="recall", title=f"Masking detected vs random heads (null p = {p_null:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return metrics, {"causal_heads.png": fig}


def theta_heads(context: RunContext, table: pd.DataFrame) -> Verdict:
    """Claim 2, one model's part: how many heads the detector selects at this model's theta."""
    scores = context.head_scores
    theta = context.model.info.rope_theta
    return {"claim/heads_selected": len(scores.selected), "claim/heads_fraction": len(scores.selected) / scores.scores.size,
            "claim/rope_theta": float(theta) if theta is not None else float("nan")}, {}


def norm_utility(context: RunContext, table: pd.DataFrame) -> Verdict:
    """Claim 3: the relation between a head's query-row norms and its query-dim utilities. Per
    head, Spearman's rho across its dims between the L1 norm of W_q's rows (qnorm) and the utility
    u (utility detector); across heads, the mean rho, Cohen's d (mean / SD) and a one-sample
    t-test against 0. Verdict: the sign of a significant relation (+1 / -1), 0 where none."""
    found = [context.head_scores, *context.detector_scores.values()]
    utility = next((s.extra["utility"] for s in found if s is not None and "utility" in s.extra), None)
    norms = next((s.extra["per_dim"] for s in found if s is not None and "per_dim" in s.extra), None)
    rho = rowwise_spearman(norms, utility)
    valid = rho[np.isfinite(rho)]
    test = ttest_1samp(valid, 0.0)
    direction = float(np.sign(valid.mean())) if test.pvalue < ALPHA else 0.0
    metrics = {"claim/rho_mean": float(valid.mean()), "claim/cohens_d": cohens_dz(valid),
               "claim/p_value": float(test.pvalue), "claim/heads": float(len(valid)), "claim/verdict": direction}
    n_layers, n_heads, head_dim = utility.shape
    points = pd.DataFrame({"query-row L1 norm": np.asarray(norms).ravel(), "utility u": np.asarray(utility).ravel(),
                           "layer": np.repeat(np.arange(n_layers), n_heads * head_dim)})
    fig, (scatter, spread) = plt.subplots(1, 2, figsize=(11, 4))
    sns.scatterplot(data=points, x="query-row L1 norm", y="utility u", hue="layer", s=6, alpha=0.4, ax=scatter, legend=False)
    sns.regplot(data=points, x="query-row L1 norm", y="utility u", scatter=False, color="red", ax=scatter)
    scatter.set(title="Norm vs utility, every query dim of every head")
    sns.histplot(valid, bins=20, ax=spread)
    spread.axvline(0, color="black", lw=0.8)
    spread.set(xlabel="per-head Spearman rho (norm, utility)",
               title=f"mean rho {valid.mean():+.2f}, d = {metrics['claim/cohens_d']:+.2f}, p = {test.pvalue:.2g}")
    fig.tight_layout()
    return metrics, {"norm_utility.png": fig}


def lowfreq_dose(context: RunContext, table: pd.DataFrame) -> Verdict:
    """Claim 4: zeroing the lowest-frequency dims of the detected heads lowers recall with the
    dose, zeroing as many random dims does not. Verdict 1 when recall falls with the dose
    (Spearman rho < 0) and at some dose the treatment is below its control by an exact McNemar
    test, Holm-adjusted over the doses (p < ALPHA). (At large doses random dims can break a small
    model too, so no single dose is the test.)"""
    treated = [c for c in context.conditions if c.role == "treatment" and c.dose is not None]
    baseline = _recall(context, BASELINE)
    metrics, tests = {}, []
    for condition in treated:
        control = "control" + condition.label.removeprefix("treatment")
        metrics[f"claim/recall_drop.{condition.dose:g}"] = baseline - _recall(context, condition.label)
        metrics[f"claim/control_recall_drop.{condition.dose:g}"] = baseline - _recall(context, control)
        tests.append(mcnemar_exact(context.outcomes[condition.label], context.outcomes[control]))
    adjusted = holm([t["p_value"] for t in tests])
    for condition, p_value in zip(treated, adjusted):
        metrics[f"claim/treatment_vs_control_p_holm.{condition.dose:g}"] = float(p_value)
    recalls = [_recall(context, c.label) for c in treated]
    rho = spearmanr([c.dose for c in treated], recalls).statistic if np.ptp(recalls) > 0 else 0.0
    below = [p for t, p in zip(tests, adjusted) if t["effect_size"] < 0]
    metrics |= {"claim/dose_recall_spearman": float(rho), "claim/min_p_holm": float(min(below, default=1.0)),
                "claim/verdict": float(rho < 0 and min(below, default=1.0) < ALPHA)}
    fig = plots.recall_by_dose(table, f"{treated[0].intervention}: {context.config['dose']['param']}")
    fig.axes[0].set_title(f"Dose response (95% CI), Spearman rho {rho:+.2f}")
    return metrics, {"lowfreq_dose.png": fig}


def dims_grid(context: RunContext, table: pd.DataFrame) -> Verdict:
    """Claim 5 (Chiang & Yogatama, Tables 1-2): recall with the first / last n raw query dims or
    the low-utility dims masked in the detected heads, by gold position. Verdict 1 when masking
    the last n dims costs more recall than masking the first n, on average over the n's tried."""
    by_intervention: dict[str, list[str]] = {}
    for condition in context.conditions:
        if condition.role in ("treatment", "extra"):
            by_intervention.setdefault(condition.intervention, []).append(condition.label)
    baseline = _recall(context, BASELINE)
    metrics = {f"claim/recall_drop.{label}": baseline - _recall(context, label)
               for labels in by_intervention.values() for label in labels}
    mean_drop = {name: float(np.mean([metrics[f"claim/recall_drop.{label}"] for label in labels]))
                 for name, labels in by_intervention.items()}
    metrics |= {"claim/first_dims_drop": mean_drop["mask_first_dims"], "claim/last_dims_drop": mean_drop["mask_last_dims"],
                "claim/verdict": float(mean_drop["mask_last_dims"] > mean_drop["mask_first_dims"])}
    column = next((c for c in ("gold_position", "depth") if c in table), None)
    shown = table[table["role"].isin(["baseline", "treatment", "extra"])]
    grid = shown.groupby("condition")["correct"].mean().to_frame("mean")
    if column:
        grid = shown.pivot_table(index="condition", columns=column, values="correct").join(grid)
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3, 0.5 * grid.shape[0] + 1.5))
    sns.heatmap(grid, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax)
    ax.set(xlabel=column or "", ylabel="", title="Recall with query dims masked in the detected heads")
    fig.tight_layout()
    return metrics, {"dims_grid.png": fig}


CLAIMS: dict[str, Callable[[RunContext, pd.DataFrame], Verdict]] = {
    "causal_heads": causal_heads,
    "theta_heads": theta_heads,
    "norm_utility": norm_utility,
    "lowfreq_dose": lowfreq_dose,
    "dims_grid": dims_grid,
}


def _plugin_names(config: Mapping[str, Any], kind: str, extra: str) -> set[str]:
    """Names of the run's main plugin of ``kind`` and of its extra ones (``detectors``/``conditions``)."""
    main = [config.get(kind)] if config.get(kind) else []
    return {node["name"] for node in [*main, *(config.get(extra) or {}).values()]}


def _needs(config: Mapping[str, Any]) -> dict[str, dict[str, bool]]:
    """Per claim, what its verdict needs from the run's config: checked before the run is
    created, so that a run that could not reach a verdict never starts."""
    detectors = _plugin_names(config, "detector", "detectors")
    interventions = _plugin_names(config, "intervention", "conditions")
    return {
        "causal_heads": {"+intervention=head_mask": (config.get("intervention") or {}).get("name") == "head_mask",
                         "controls >= 19 (a null of 20 random head sets)": int(config.get("controls") or 0) >= 19},
        "theta_heads": {"+detector=<name>": bool(config.get("detector"))},
        "norm_utility": {"the utility detector": "utility" in detectors, "the qnorm detector": "qnorm" in detectors},
        "lowfreq_dose": {"+intervention=<name>": bool(config.get("intervention")),
                         "a dose list of two or more values": len((config.get("dose") or {}).get("values") or []) >= 2},
        "dims_grid": {"mask_first_dims and mask_last_dims conditions": {"mask_first_dims", "mask_last_dims"} <= interventions},
    }


def check_claim(config: Mapping[str, Any]) -> None:
    """Refuse an unknown claim, or a config from which the claim's verdict cannot be reached."""
    name = config.get("claim")
    if name is None:
        return
    if name not in CLAIMS:
        raise ConfigError(f"unknown claim {name!r}; available: {', '.join(CLAIMS)}")
    missing = [what for what, present in _needs(config)[name].items() if not present]
    if missing:
        raise ConfigError(f"claim {name!r} needs {'; '.join(missing)} in the run's config (or claim=null to run "
                          "without a verdict)")
