"""Logging a detector's results, comparing two detectors, and detection across context lengths.

A detector's scores, selection and heatmap are logged under one prefix (``detection/`` for the
main detector, ``detectors/<key>/`` for extra ones), with the scores pooled per KV head
(``kv_scores.json``: max and mean over the query heads each KV head serves, the unit that KV-cache
policies keep or drop under GQA); two detectors are compared by Spearman's rho of their scores
and the overlap of their selections. A detector that brings its own samples
(:attr:`Detector.own_samples`) is announced as such and is not run again per length.

Several detectors in one run (``detectors: {key: ...}``): every pair's agreement as two matrices,
Spearman's rho of the scores and the Jaccard index of the selections, logged as the table
``detectors/agreement.json`` and the figure ``detectors/agreement.png`` (the main detector under
its own name). With ``per_detector: true`` each detector's selected heads also get the
intervention and its matched control; ``detectors/causal.json`` then has a row per detector: its
heads, the recall of baseline, treatment and control, and every test's paired p-value of the
treatment against its control and against the baseline.

Across lengths (are the heads found at 512 tokens the heads that retrieve at 8K?): with ``detect_lengths=[512, 2048, 8192]`` a run takes the task's detection samples at each length
(the task's own grid of depths, one length at a time, ``detect_seed``; built by the planner) and
runs its main detector and every extra detector there. Logged: per detector and length the scores, selection
and heatmap (``lengths/<detector>/<length>/``); one table ``lengths/detection.json`` with a row
per detector and length (heads selected, selection fraction) and a row per detector and pair of
lengths (Spearman's rho of the scores, overlap and Jaccard index of the selections); and the
same numbers as metrics ``lengths/<detector>/<length>/selected_fraction`` and
``lengths/<detector>/<a>_vs_<b>/{spearman,overlap,jaccard}``.
"""

from __future__ import annotations

import logging
from itertools import combinations
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from framework import plots
from framework.interfaces import BASELINE, Detector, HeadScores, LoadedModel, RunContext, Sample

log = logging.getLogger(__name__)


def kv_head_scores(scores: np.ndarray, n_kv_heads: int) -> dict[str, np.ndarray]:
    """[layers, heads] scores pooled per KV head: ``max`` and ``mean`` [layers, kv_heads] over the
    query heads of each group (query head h reads KV head ``h // (heads // kv_heads)``, as
    transformers' ``repeat_kv`` lays them out)."""
    n_layers, n_heads = scores.shape
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot be split into {n_kv_heads} KV groups")
    groups = scores.reshape(n_layers, n_kv_heads, n_heads // n_kv_heads)
    return {"max": groups.max(-1), "mean": groups.mean(-1)}


def samples_detail(detector: Detector, samples: list[Sample]) -> str:
    """What a detector runs on, for the step's announcement."""
    return "its own samples" if detector.own_samples else f"{len(samples)} samples"


def log_head_scores(result: HeadScores, prefix: str, n_kv_heads: int | None = None) -> None:
    """Log scores, selection, heatmap and extra results under ``prefix``; with ``n_kv_heads``
    also the scores pooled per KV head (:func:`kv_head_scores`)."""
    mlflow.log_dict({"shape": list(result.scores.shape), "scores": result.scores.tolist()}, f"{prefix}/scores.json")
    if n_kv_heads is not None:
        pooled = kv_head_scores(result.scores, n_kv_heads)
        mlflow.log_dict({"n_kv_heads": n_kv_heads, **{k: v.tolist() for k, v in pooled.items()}}, f"{prefix}/kv_scores.json")
    mlflow.log_dict({"selected_heads": [list(h) for h in result.selected]}, f"{prefix}/selected_heads.json")
    mlflow.log_figure(plots.head_score_heatmap(result.scores, result.selected, result.detector), f"{prefix}/heatmap.png")
    numbers, rest = split_extra(result.extra)
    mlflow.log_metrics({f"{prefix}/{key}": value for key, value in numbers.items()})
    for name, curve in (result.extra.get("curves") or {}).items():  # e.g. an optimising detector's loss per step
        for step, value in enumerate(curve):
            mlflow.log_metric(f"{prefix}/curves/{name}", float(value), step=step)
    if rest:
        mlflow.log_dict(rest, f"{prefix}/extra.json")


def _jsonable(value: Any) -> Any:
    """``value`` with arrays as lists and (layer, head) keys as "layer.head", for JSON."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, dict):
        return {".".join(map(str, k)) if isinstance(k, tuple) else str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def split_extra(extra: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """A detector's extra results (``HeadScores.extra``): the single numbers, logged as metrics,
    and the rest (per-trial lists, arrays), logged as JSON."""
    numbers = {k: float(v) for k, v in extra.items() if isinstance(v, int | float | np.number) and not isinstance(v, bool)}
    return numbers, {k: _jsonable(v) for k, v in extra.items() if k not in numbers}


def detector_agreement(main: HeadScores, other: HeadScores) -> dict[str, float]:
    """How far two detectors agree: Spearman's rho of their [layers x heads] scores, and the
    overlap (count and Jaccard index) of their selections."""
    rho = spearmanr(main.scores.ravel(), other.scores.ravel())
    shared = len(set(main.selected) & set(other.selected))
    union = len(set(main.selected) | set(other.selected))
    return {"heads_selected": len(other.selected), "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "overlap": shared, "jaccard": shared / union if union else float("nan")}


def detect_across_lengths(
    samples_by_length: Mapping[int, list[Sample]], detectors: Mapping[str, Detector], model: LoadedModel
) -> pd.DataFrame | None:
    """Run each detector (by key: ``main`` and the extra detectors' keys) on the detection samples
    of every length, log scores and agreement, and return the table (None without lengths)."""
    lengths = list(samples_by_length)
    if not lengths:
        return None
    for key, detector in detectors.items():
        if detector.own_samples:
            log.info("[detection across lengths] %s (%s) brings its own samples: not run per length", key, detector.name)
    detectors = {key: detector for key, detector in detectors.items() if not detector.own_samples}
    results: dict[str, dict[int, HeadScores]] = {key: {} for key in detectors}
    for length, samples in samples_by_length.items():
        for key, detector in detectors.items():
            log.info("[detection at %d tokens] %s on %d samples", length, detector.name, len(samples))
            results[key][length] = found = detector.detect(model, samples)
            log_head_scores(found, f"lengths/{key}/{length}", model.info.n_kv_heads)
    rows, metrics = [], {}
    for key, by_length in results.items():
        for length, found in by_length.items():
            fraction = len(found.selected) / found.scores.size
            rows.append({"detector": key, "name": found.detector, "length": length, "heads_selected": len(found.selected),
                         "selected_fraction": fraction})
            metrics[f"lengths/{key}/{length}/selected_fraction"] = fraction
        for a, b in combinations(lengths, 2):
            agreement = detector_agreement(by_length[a], by_length[b])
            rows.append({"detector": key, "name": by_length[a].detector, "length": a, "versus": b,
                         **{k: agreement[k] for k in ("spearman", "overlap", "jaccard")}})
            metrics.update({f"lengths/{key}/{a}_vs_{b}/{k}": agreement[k] for k in ("spearman", "overlap", "jaccard")})
    table = pd.DataFrame(rows)
    mlflow.log_table(table, "lengths/detection.json")
    mlflow.log_metrics(metrics)
    log.info("detection across lengths:\n%s", table.to_string(index=False))
    return table


def agreement_matrices(results: Mapping[str, HeadScores]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Detectors x detectors (by key): Spearman's rho of the scores and Jaccard index of the selections."""
    keys = list(results)
    spearman = pd.DataFrame(np.eye(len(keys)), index=keys, columns=keys)
    jaccard = spearman.copy()
    for a, b in combinations(keys, 2):
        agreement = detector_agreement(results[a], results[b])
        spearman.loc[a, b] = spearman.loc[b, a] = agreement["spearman"]
        jaccard.loc[a, b] = jaccard.loc[b, a] = agreement["jaccard"]
    return spearman, jaccard


def log_agreement(results: Mapping[str, HeadScores]) -> None:
    """Log the agreement matrices of a run's detectors (nothing with fewer than three: the main
    detector's agreement with one other is already logged as ``detectors/<key>/...``)."""
    if len(results) < 3:
        return
    spearman, jaccard = agreement_matrices(results)
    table = spearman.stack().rename("spearman").to_frame().join(jaccard.stack().rename("jaccard"))
    mlflow.log_table(table.rename_axis(["detector", "versus"]).reset_index(), "detectors/agreement.json")
    mlflow.log_figure(plots.agreement_heatmaps(spearman, jaccard), "detectors/agreement.png")
    log.info("detector agreement (Spearman's rho of scores):\n%s", spearman.round(2).to_string())


def causal_table(context: RunContext, main_key: str) -> pd.DataFrame:
    """Per detector whose heads were intervened on (and per dose, in a dose run): heads, recalls
    and paired p-values of its treatment against its control and the baseline (one column per test)."""
    rows = []
    for treatment in (c for c in context.conditions if c.role == "treatment"):
        key = treatment.detector or main_key
        control = "control" + treatment.label.removeprefix("treatment")
        result = context.detector_scores[treatment.detector] if treatment.detector else context.head_scores
        row: dict[str, Any] = {"detector": key, "name": result.detector, "dose": treatment.dose,
                               "heads": len(treatment.edit.heads),
                               "recall_baseline": float(context.outcomes[BASELINE].mean()),
                               "recall_treatment": float(context.outcomes[treatment.label].mean()),
                               "recall_control": float(context.outcomes[control].mean())}
        for metric, value in context.metrics.items():
            test, _, rest = metric.partition("/")
            for reference, column in ((control, "control"), (BASELINE, "baseline")):
                if rest == f"{treatment.label}_vs_{reference}/p_value":
                    row[f"{test}_p_vs_{column}"] = value
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.drop(columns="dose") if table["dose"].isna().all() else table
