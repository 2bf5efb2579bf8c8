"""Figures logged with every run (seaborn on a non-interactive backend)."""

from __future__ import annotations

import os

import matplotlib

# Figures are written to files: no window. Jupyter's inline backend (ipykernel sets MPLBACKEND)
# is kept, so that a notebook that runs experiments still shows its own plots.
if not os.environ.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from framework.model.attention import Head  # noqa: E402


def head_score_heatmap(scores: np.ndarray, selected: list[Head], title: str) -> plt.Figure:
    """Layers x heads score heatmap; selected heads are outlined."""
    n_layers, n_heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 2), max(4.0, 0.28 * n_layers + 1.5)))
    sns.heatmap(scores, ax=ax, cmap="viridis", cbar_kws={"label": "score"})
    for layer, head in selected:
        ax.add_patch(plt.Rectangle((head, layer), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set(xlabel="head", ylabel="layer", title=f"{title} ({len(selected)} selected, outlined)")
    fig.tight_layout()
    return fig


def recall_by_condition(table: pd.DataFrame, by: str) -> plt.Figure:
    """Mean outcome per condition, split by a sample attribute (e.g. needle depth)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=table, x=by, y="correct", hue="condition", ax=ax, errorbar=("ci", 95))
    ax.set(ylim=(0, 1.05), ylabel="recall", title=f"Recall by {by} and condition (95% CI)")
    fig.tight_layout()
    return fig


def recall_by_dose(table: pd.DataFrame, dose: str) -> plt.Figure:
    """Treatment and control recall against the dose, the x axis named after the dosed parameter."""
    dosed = table[table["role"].isin(["treatment", "control"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=dosed, x="dose", y="correct", hue="role", marker="o", errorbar=("ci", 95), ax=ax)
    baseline = table.loc[table["condition"] == "baseline", "correct"].mean()
    ax.axhline(baseline, color="black", ls="--", label="no intervention")
    ax.set(ylim=(-0.02, 1.05), xlabel=dose, ylabel="recall", title="Recall by dose (95% CI)")
    ax.legend()
    fig.tight_layout()
    return fig


def recall_by_length_and_depth(table: pd.DataFrame, max_panels: int = 12, columns: int = 4) -> plt.Figure:
    """Recall as a context length x needle depth heatmap, one panel per condition (Wu et al.'s
    and the needle-in-a-haystack literature's figure); cells are means over the cell's samples.
    Panels wrap after ``columns`` and share one colour bar, so a dose run's nine stay readable."""
    labels = list(dict.fromkeys(table["condition"]))[:max_panels]
    width = min(columns, len(labels))
    rows = -(-len(labels) // width)
    fig, axes = plt.subplots(rows, width, figsize=(3.4 * width + 1.0, 3.2 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for index, (ax, label) in enumerate(zip(axes.flat, labels)):
        grid = table[table["condition"] == label].pivot_table(index="context_length", columns="depth", values="correct")
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="RdYlGn", annot=True, fmt=".2f", cbar=False, annot_kws={"size": 8})
        ax.set(title=label, xlabel="needle depth" if index >= len(labels) - width else "",
               ylabel="context length (tokens)" if index % width == 0 else "")
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    fig.colorbar(axes.flat[0].collections[0], ax=axes, label="recall", shrink=0.8)
    fig.suptitle("Recall by context length and needle depth")
    return fig


def agreement_heatmaps(spearman: pd.DataFrame, jaccard: pd.DataFrame) -> plt.Figure:
    """Detectors x detectors: Spearman's rho of their head scores and the Jaccard index of their selections, side by side."""
    size = max(4.0, 0.7 * len(spearman) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    sns.heatmap(spearman, ax=axes[0], cmap="coolwarm", vmin=-1, vmax=1, annot=True, fmt=".2f", square=True)
    axes[0].set(title="Spearman's rho of the head scores")
    sns.heatmap(jaccard, ax=axes[1], cmap="viridis", vmin=0, vmax=1, annot=True, fmt=".2f", square=True)
    axes[1].set(title="Jaccard index of the selected heads")
    fig.tight_layout()
    return fig
