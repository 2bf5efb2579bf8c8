"""Progress lines of detection, through the one mechanism evaluation uses, and a detector's
extra results split into metrics and JSON for logging."""

from __future__ import annotations

import json
import logging

import numpy as np
from conftest import tiny_llama

from framework.interfaces import Sample
from framework.registry import get_registry
from framework.runner.detection import split_extra
from framework.runner.progress import Progress, labelled, track


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "framework.runner.progress"]


def test_track_logs_a_line_per_item_with_the_step_label(caplog):
    caplog.set_level(logging.INFO, logger="framework.runner.progress")
    assert list(track(["a", "b", "c"])) == ["a", "b", "c"]
    with labelled("detection (second)"):
        list(track(range(2), unit="layers fitted"))
    Progress(4, label="treatment").advance(3)
    found = lines(caplog)
    assert [line.rsplit(" (", 1)[0] for line in found] == [
        "[detection] 1/3 samples", "[detection] 2/3 samples", "[detection] 3/3 samples",
        "[detection (second)] 1/2 layers fitted", "[detection (second)] 2/2 layers fitted", "[treatment] 3/4 samples"]
    assert found[-1].endswith("s left)")


def test_time_left_follows_the_work_left_not_the_count(caplog, monkeypatch):
    """A 1,000-token sample done in 10 s with a 3,000-token one to come: ~30 s left, not ~10 s."""
    caplog.set_level(logging.INFO, logger="framework.runner.progress")
    clock = iter([100.0, 110.0, 140.0])
    monkeypatch.setattr("framework.runner.progress.time.perf_counter", lambda: next(clock))
    samples = [Sample(str(n), [1] * n, "x", [5], (1, 2), 2, (0, 1)) for n in (1000, 3000)]
    list(track(samples))
    assert [line.rsplit(" (", 1)[1] for line in lines(caplog)] == ["10 s, ~30 s left)", "40 s, ~0 s left)"]


def test_a_built_in_detector_reports_progress_per_sample(caplog):
    caplog.set_level(logging.INFO, logger="framework.runner.progress")
    model = tiny_llama()
    samples = [Sample(str(i), list(range(3 + i, 33 + i)), "x", [5], (1, 20), 20, (5, 10)) for i in range(3)]
    detector = get_registry().create("detector", {"name": "attn_mass", "threshold": None, "top_k": 2})
    with labelled("detection"):
        detector.detect(model, samples)
    assert [line.rsplit(" (", 1)[0] for line in lines(caplog)] == [f"[detection] {i}/3 samples" for i in (1, 2, 3)]


def test_extra_results_split_into_metrics_and_json():
    numbers, rest = split_extra({"trials": 4, "kept_trials": np.int64(3), "flag": True, "recall": [1.0, 0.5],
                                  "utility": np.ones((2, 1, 2)), "low_dims": {(0, 1): [3]}})
    assert numbers == {"trials": 4.0, "kept_trials": 3.0}
    assert rest == {"flag": True, "recall": [1.0, 0.5], "utility": [[[1.0, 1.0]], [[1.0, 1.0]]], "low_dims": {"0.1": [3]}}
    json.dumps(rest)
