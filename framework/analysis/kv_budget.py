"""The KV budget curve of a compression run: recall against the fraction of the full KV cache
kept, per line (the detector's heads kept full, random heads kept full, named conditions such as
``all_streaming`` and ``lowest_kept``), with 95 % CIs; per line the smallest fraction whose recall
stays within ``within`` x the baseline's, and the area under the curve.

A condition's fraction comes from its intervention's ``kv/fraction_kept/<label>`` metric
(:meth:`framework.interfaces.Intervention.condition_metrics`); the baseline keeps the whole
cache (fraction 1). The per-run analysis (:func:`analyse`) is called by the pipeline when any
condition reports a fraction; ``python -m framework.analysis.kv_budget`` draws the curves of
several finished runs (e.g. one per detector, from a sweep) in one figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from framework import plots  # noqa: F401  (sets the non-interactive backend before pyplot draws)

FRACTION = "kv/fraction_kept/"
WITHIN = 0.95


def _line(label: str, role: str, detector: str | None, name: str, several: bool) -> str:
    """Which curve a condition belongs to: a detector's treatment doses share one line
    (``<detector>: treatment``), its matched controls another (``control``; with ``several``
    detectors in the run, ``per_detector``, each ``<detector>: control``); named conditions are
    their own."""
    if role == "treatment":
        return f"{detector or name}: treatment" if detector or name else "treatment"
    if role == "control":
        return f"{detector or name}: control" if several and (detector or name) else "control"
    return label


def curve(table: pd.DataFrame, fractions: dict[str, float], name: str = "") -> pd.DataFrame:
    """One row per condition with a fraction: line, fraction, recall, 95 % CI half-width
    (normal approximation, 1.96 standard errors of the mean), samples. ``name``: the main
    detector, which names its treatment line; extra detectors' lines carry their keys."""
    rows = []
    several = "detector" in table and bool(table["detector"].map(lambda key: isinstance(key, str)).any())
    for label, fraction in fractions.items():
        outcomes = table.loc[table["condition"] == label]
        if outcomes.empty:
            continue
        detector = outcomes["detector"].iloc[0] if "detector" in outcomes else None
        line = _line(label, outcomes["role"].iloc[0], detector if isinstance(detector, str) else None, name, several)
        correct = outcomes["correct"].to_numpy(dtype=float)
        half = 1.96 * correct.std(ddof=1) / np.sqrt(len(correct)) if len(correct) > 1 else 0.0
        rows.append({"line": line, "condition": label, "fraction": float(fraction), "recall": float(correct.mean()),
                     "ci": float(half), "n": len(correct)})
    return pd.DataFrame(rows, columns=["line", "condition", "fraction", "recall", "ci", "n"])


def summary(points: pd.DataFrame, baseline: float, within: float = WITHIN) -> dict[str, dict[str, float]]:
    """Per line: ``smallest_fraction`` whose recall is >= ``within`` x baseline (NaN if none) and
    ``auc``, the mean recall over the fractions from the line's smallest to 1 (trapezoids through
    its points and the baseline at fraction 1)."""
    result = {}
    for line, group in points.groupby("line", sort=False):
        group = group.sort_values("fraction")
        keeping = group.loc[group["recall"] >= within * baseline, "fraction"]
        xs = np.append(group["fraction"].to_numpy(), 1.0)
        ys = np.append(group["recall"].to_numpy(), baseline)
        span = 1.0 - xs[0]
        auc = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / span) if span > 0 else float(ys[0])
        result[str(line)] = {"smallest_fraction": float(keeping.min()) if len(keeping) else float("nan"), "auc": auc}
    return result


def figure(points: pd.DataFrame, baseline: float, within: float = WITHIN) -> plt.Figure:
    """Recall against the KV fraction kept, a line per detector and per baseline, 95 % CIs."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for line, group in points.groupby("line", sort=False):
        group = group.sort_values("fraction")
        ax.errorbar(group["fraction"], group["recall"], yerr=group["ci"], marker="o", capsize=3, label=line,
                    ls="-" if len(group) > 1 else "none")
    ax.axhline(baseline, color="black", ls="--", lw=1, label="full cache (baseline)")
    ax.axhline(within * baseline, color="grey", ls=":", lw=1, label=f"{within:g} x baseline")
    ax.set(xlabel="fraction of the full KV cache kept", ylabel="recall", ylim=(-0.02, 1.05), xlim=(0, 1.02),
           title="Recall at equal KV memory (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def analyse(table: pd.DataFrame, metrics: dict[str, float], name: str = "") -> tuple[dict[str, float], plt.Figure | None]:
    """A run's budget metrics (``kv_budget/<line>/smallest_fraction``, ``.../auc``) and figure,
    or ({}, None) when no condition reports a KV fraction."""
    fractions = {key.removeprefix(FRACTION): value for key, value in metrics.items() if key.startswith(FRACTION)}
    points = curve(table, fractions, name)
    if points.empty:
        return {}, None
    baseline = float(table.loc[table["condition"] == "baseline", "correct"].mean())
    flat = {f"kv_budget/{line}/{key}": value for line, values in summary(points, baseline).items()
            for key, value in values.items()}
    return flat, figure(points, baseline)


def main() -> None:
    """Draw several finished runs' curves in one figure (e.g. a sweep over detectors)."""
    from mlflow.tracking import MlflowClient

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_ids", nargs="+", help="finished compression runs (their treatment lines are named by detector)")
    parser.add_argument("--out", default="kv_budget.png")
    args = parser.parse_args()
    client = MlflowClient()
    curves, baselines = [], []
    for run_id in args.run_ids:
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory() as folder:
            data = json.loads(Path(client.download_artifacts(run_id, "samples.json", folder)).read_text())
        table = pd.DataFrame(data["data"], columns=data["columns"])
        fractions = {k.removeprefix(FRACTION): v for k, v in run.data.metrics.items() if k.startswith(FRACTION)}
        points = curve(table, fractions, run.data.tags.get("detector", run_id[:8]))
        if baselines:  # random heads, all_streaming and the like once, from the first run
            points = points[points["line"].str.contains(": treatment")]
        curves.append(points)
        baselines.append(float(table.loc[table["condition"] == "baseline", "correct"].mean()))
    points, baseline = pd.concat(curves), float(np.mean(baselines))
    figure(points, baseline).savefig(args.out, dpi=120)
    print(pd.DataFrame(summary(points, baseline)).T.to_string())


if __name__ == "__main__":
    main()
