"""A baseline-only run in process, with lifecycle hooks observed through a real plugin."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from framework import hookimpl
from framework.registry import get_registry
from framework.runner import pipeline


class Observer:
    def __init__(self):
        self.started_with_model = False
        self.passes = self.tokens = 0

    @hookimpl
    def run_started(self, context):
        self.started_with_model = context.model is not None and mlflow.active_run() is not None
        context.model.model.register_forward_pre_hook(self.count, with_kwargs=True)  # a count of its own

    def count(self, module, args, kwargs):
        self.passes += 1
        self.tokens += kwargs["input_ids"].numel()

    @hookimpl
    def run_finished(self, context):
        return {"observer/baseline_correct": float(np.sum(context.outcomes["baseline"]))}


@pytest.mark.e2e
def test_baseline_only_run_with_lifecycle_hooks(tmp_path, monkeypatch, compose_config, embedded_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = compose_config("task=passkey", "task.context_lengths=[200]", "task.depths=[0.5]", "task.samples_per_cell=3")
    observer = Observer()
    manager = get_registry().manager
    manager.register(observer, name="test-observer")
    try:
        context = pipeline.run(config)
    finally:
        manager.unregister(observer)
    assert observer.started_with_model
    assert set(context.outcomes) == {"baseline"}
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(context.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["task"] == "passkey" and run.data.tags["detector"] == "none"
    assert run.data.metrics["recall/baseline"] == pytest.approx(context.outcomes["baseline"].mean())
    assert run.data.metrics["observer/baseline_correct"] == context.outcomes["baseline"].sum()
    assert not any(key.endswith("p_value") for key in run.data.metrics)  # nothing to compare
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    # the run's cost, against the observer's own count; its samples as the one dataset input
    assert (run.data.metrics["cost/forward_passes"], run.data.metrics["cost/tokens"]) == (observer.passes, observer.tokens)
    assert observer.tokens >= 3 * 200 and run.data.tags["device"] == "cpu"
    assert run.data.metrics["cost/step/baseline/wall_time_s"] <= run.data.metrics["cost/wall_time_s"]
    [evaluated] = run.inputs.dataset_inputs
    assert evaluated.dataset.name == "passkey-eval-seed0-len200" and evaluated.tags[0].value == "eval"
