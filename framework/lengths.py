"""Detection across context lengths: are the heads found at 512 tokens the heads that retrieve at 8K?

With ``detect_lengths=[512, 2048, 8192]`` a run takes the task's detection samples at each length
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
from typing import Mapping

import mlflow
import pandas as pd

from framework.interfaces import Detector, HeadScores, LoadedModel, Sample

log = logging.getLogger(__name__)


def detect_across_lengths(
    samples_by_length: Mapping[int, list[Sample]], detectors: Mapping[str, Detector], model: LoadedModel
) -> pd.DataFrame | None:
    """Run each detector (by key: ``main`` and the extra detectors' keys) on the detection samples
    of every length, log scores and agreement, and return the table (None without lengths)."""
    from framework.pipeline import _detector_agreement, _log_head_scores  # the run's own comparison and logging

    lengths = list(samples_by_length)
    if not lengths:
        return None
    results: dict[str, dict[int, HeadScores]] = {key: {} for key in detectors}
    for length, samples in samples_by_length.items():
        for key, detector in detectors.items():
            log.info("[detection at %d tokens] %s on %d samples", length, detector.name, len(samples))
            results[key][length] = found = detector.detect(model, samples)
            _log_head_scores(found, f"lengths/{key}/{length}")
    rows, metrics = [], {}
    for key, by_length in results.items():
        for length, found in by_length.items():
            fraction = len(found.selected) / found.scores.size
            rows.append({"detector": key, "name": found.detector, "length": length, "heads_selected": len(found.selected),
                         "selected_fraction": fraction})
            metrics[f"lengths/{key}/{length}/selected_fraction"] = fraction
        for a, b in combinations(lengths, 2):
            agreement = _detector_agreement(by_length[a], by_length[b])
            rows.append({"detector": key, "name": by_length[a].detector, "length": a, "versus": b,
                         **{k: agreement[k] for k in ("spearman", "overlap", "jaccard")}})
            metrics.update({f"lengths/{key}/{a}_vs_{b}/{k}": agreement[k] for k in ("spearman", "overlap", "jaccard")})
    table = pd.DataFrame(rows)
    mlflow.log_table(table, "lengths/detection.json")
    mlflow.log_metrics(metrics)
    log.info("detection across lengths:\n%s", table.to_string(index=False))
    return table
