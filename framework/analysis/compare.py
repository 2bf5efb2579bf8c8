"""Compare finished runs across model families: ``python -m framework.analysis.compare``.

Reads runs from the MLflow store (filtered by experiment and an MLflow filter string), builds one
row per run (model, family, RoPE theta, heads detected, recall per condition, recall drop with a
paired bootstrap CI from the per-sample table, p-values) and logs the table plus seaborn figures
as a run of its own (experiment ``comparisons`` by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy.stats import bootstrap, spearmanr  # noqa: E402

from framework.tracking import experiments  # noqa: E402

log = logging.getLogger(__name__)

CONDITIONS = ("baseline", "treatment", "control")


def _drop_ci(client: MlflowClient, run_id: str, confidence: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap CI of baseline - treatment recall, from the run's per-sample table."""
    with tempfile.TemporaryDirectory() as folder:
        table = json.loads(Path(client.download_artifacts(run_id, "samples.json", folder)).read_text())
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    wide = frame.pivot(index="sample", columns="condition", values="correct")
    differences = (wide["baseline"] - wide["treatment"]).to_numpy(dtype=float)
    if np.ptp(differences) == 0:
        return float(differences[0]), float(differences[0])
    interval = bootstrap((differences,), np.mean, confidence_level=confidence, random_state=0).confidence_interval
    return float(interval.low), float(interval.high)


def collect(client: MlflowClient, experiments: list[str], filter_string: str = "") -> pd.DataFrame:
    """One row per finished run of ``experiments`` matching ``filter_string``."""
    ids = [e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name)) is not None]
    if not ids:
        raise SystemExit(f"error: no experiment named {', '.join(experiments)} in {mlflow.get_tracking_uri()}")
    status = "attributes.status = 'FINISHED'"
    runs = client.search_runs(ids, f"{filter_string} and {status}" if filter_string else status)
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if "mlflow.parentRunId" not in tags and tags.get("sweep") == "parent":
            continue  # a sweep's summary run, not a job
        row = {
            "run_id": run.info.run_id,
            "model": tags.get("model"),
            "family": tags.get("model.family"),
            "rope_theta": float(tags["model.rope_theta"]) if tags.get("model.rope_theta") not in (None, "None") else np.nan,
            "task": tags.get("task"),
            "detector": tags.get("detector"),
            "intervention": tags.get("intervention"),
            "heads_selected": metrics.get("heads/selected", np.nan),
            "heads_fraction": metrics.get("heads/selected_fraction", np.nan),
            "p_treatment_vs_baseline": metrics.get("mcnemar/treatment_vs_baseline/p_value", np.nan),
            "p_treatment_vs_control": metrics.get("mcnemar/treatment_vs_control/p_value", np.nan),
        }
        row |= {"claim": tags.get("claim"), "head_dim": float(tags.get("model.head_dim", "nan")),
                "dose_param": run.data.params.get("dose.param")}
        row |= {key: value for key, value in metrics.items() if key.startswith("claim/")}
        for condition in CONDITIONS:
            row[f"recall_{condition}"] = metrics.get(f"recall/{condition}", np.nan)
        row["recall_drop"] = row["recall_baseline"] - row["recall_treatment"]
        row["drop_ci_low"], row["drop_ci_high"] = (
            _drop_ci(client, run.info.run_id) if np.isfinite(row["recall_drop"]) else (np.nan, np.nan)
        )
        rows.append(row)
    return pd.DataFrame(rows)


def figures(table: pd.DataFrame) -> dict[str, plt.Figure]:
    """Theta vs heads detected, and recall drop with CI per model and intervention."""
    out = {}
    detected = (table.dropna(subset=["heads_fraction"])
                .groupby(["model", "family", "rope_theta"], as_index=False)[["heads_selected", "heads_fraction"]].mean())
    if not detected.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        sns.scatterplot(data=detected, x="rope_theta", y="heads_fraction", hue="family", s=80, ax=ax)
        for _, row in detected.iterrows():
            ax.annotate(f"{row['model']} ({row['heads_selected']:.0f} heads)", (row["rope_theta"], row["heads_fraction"]),
                        textcoords="offset points", xytext=(5, 5))
        ax.set(xscale="log", xlabel="RoPE theta", ylabel="fraction of heads detected", title="Theta vs retrieval heads")
        ax.margins(x=0.4, y=0.2)  # room for the labels
        fig.tight_layout()
        out["theta_vs_heads.png"] = fig
    dosed = _dose_curves(table)
    for axis, curves in dosed.groupby("axis") if not dosed.empty else ():
        fig, ax = plt.subplots(figsize=(6, 4))
        sns.lineplot(data=curves, x="dose", y="recall drop", hue="model", style="condition", marker="o", ax=ax)
        ax.set(xscale="log", xlabel=axis, title=f"Recall drop in the retrieval heads vs {axis}")
        fig.tight_layout()
        out["dose_response.png" if axis == "n_dims / head_dim" else f"dose_response_{axis}.png"] = fig
    drops = table.dropna(subset=["recall_drop"])
    if not drops.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = drops["model"] + "\n" + drops["intervention"]
        ax.errorbar(labels, drops["recall_drop"],
                    yerr=[drops["recall_drop"] - drops["drop_ci_low"], drops["drop_ci_high"] - drops["recall_drop"]],
                    fmt="o", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(ylabel="recall drop (baseline - treatment)", title="Recall drop per model and intervention (95% CI)")
        fig.tight_layout()
        out["recall_drop.png"] = fig
    return out


def _dose_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Long table of the dose runs' recall drops (claim 4); ``axis`` names the dosed parameter,
    and counts of query dims are read as fractions of head_dim, so models with different head
    sizes share one axis."""
    rows = []
    for _, run in table.iterrows():
        param = run.get("dose_param") if isinstance(run.get("dose_param"), str) else "n_dims"
        per_head_dim = param == "n_dims"
        for column, value in run.items():
            for prefix, condition in (("claim/recall_drop.", "lowest frequencies"), ("claim/control_recall_drop.", "random (control)")):
                if isinstance(column, str) and column.startswith(prefix) and np.isfinite(value):
                    dose = float(column.removeprefix(prefix))
                    rows.append({"model": run["model"], "condition": condition, "recall drop": value,
                                 "axis": f"{param} / head_dim" if per_head_dim else param,
                                 "dose": dose / run["head_dim"] if per_head_dim else dose})
    return pd.DataFrame(rows)


def theta_verdict(table: pd.DataFrame) -> dict[str, float]:
    """Claim 2 across models: does a higher RoPE theta come with fewer retrieval heads? Heads are
    compared as the fraction of all heads selected (models differ in head count; the counts are
    logged too). Verdict 1 (the claim holds) when the model with the highest theta has at least
    the head fraction of the one with the lowest; with three models or more, also Spearman's rho
    of theta vs head fraction."""
    per_model = (table.dropna(subset=["heads_fraction", "rope_theta"])
                 .groupby("model")[["rope_theta", "heads_selected", "heads_fraction"]].mean())
    if per_model["rope_theta"].nunique() < 2:
        return {}
    lowest, highest = per_model["rope_theta"].idxmin(), per_model["rope_theta"].idxmax()
    metrics = {"claim2/models": len(per_model),
               "claim2/heads_at_lowest_theta": per_model.loc[lowest, "heads_selected"],
               "claim2/heads_at_highest_theta": per_model.loc[highest, "heads_selected"],
               "claim2/fraction_at_lowest_theta": per_model.loc[lowest, "heads_fraction"],
               "claim2/fraction_at_highest_theta": per_model.loc[highest, "heads_fraction"],
               "claim2/verdict": float(per_model.loc[highest, "heads_fraction"] >= per_model.loc[lowest, "heads_fraction"])}
    if len(per_model) > 2:
        metrics["claim2/spearman_theta_fraction"] = float(spearmanr(per_model["rope_theta"], per_model["heads_fraction"]).statistic)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m framework.analysis.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", nargs="+", default=["retrieval-heads"], help="MLflow experiments to read")
    parser.add_argument("--filter", default="", help="MLflow filter, e.g. \"tags.intervention = 'head_mask'\"")
    parser.add_argument("--log-to", default="comparisons", help="experiment the comparison run is logged under")
    parser.add_argument("--out", type=Path, help="also write the table and figures to this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    experiments.configure()
    table = collect(MlflowClient(), args.experiment, args.filter)
    if table.empty:
        raise SystemExit("error: no finished runs match; check --experiment and --filter")
    plots = figures(table)
    with mlflow.start_run(experiment_id=experiments.experiment_id(args.log_to), run_name="compare") as run:
        mlflow.set_tags({"kind": "comparison", "compared_experiments": ",".join(args.experiment), "filter": args.filter})
        mlflow.log_metric("runs_compared", len(table))
        verdicts = theta_verdict(table)
        if verdicts:
            mlflow.log_metrics(verdicts)
            print("claim 2 (theta vs heads): " + ", ".join(f"{k.removeprefix('claim2/')} {v:g}" for k, v in verdicts.items()))
        mlflow.log_table(table, "comparison.json")
        for name, fig in plots.items():
            mlflow.log_figure(fig, name)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "comparison.csv", index=False)
        for name, fig in plots.items():
            fig.savefig(args.out / name, dpi=120)
    columns = ["model", "family", "rope_theta", "intervention", "heads_selected", "recall_baseline",
               "recall_treatment", "recall_control", "drop_ci_low", "drop_ci_high", "p_treatment_vs_control"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nlogged as run {run.info.run_id} in experiment {args.log_to!r}")


if __name__ == "__main__":
    main()
