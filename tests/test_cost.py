"""A run's measured cost (framework/planning/cost.py): forward passes and tokens counted by the hook against
the calls made, steps kept apart, peak memory against the process's own RSS, and the metrics
logged to the MLflow run also when the run fails."""

from __future__ import annotations

import time

import mlflow
import numpy as np
import psutil
import pytest
import torch
from conftest import tiny_llama
from mlflow import MlflowClient

from framework.planning import cost


def forward(model, batch: int, positions: int, embeds: bool = False) -> None:
    ids = torch.randint(3, 256, (batch, positions))
    with torch.no_grad():
        if embeds:
            model(inputs_embeds=model.get_input_embeddings()(ids))
        else:
            model(input_ids=ids)


def test_forward_passes_and_tokens_per_step():
    model = tiny_llama().model
    meter = cost.Meter()
    forward(model, 1, 5)  # before watch(): not counted
    meter.watch(model)
    meter.step("first")
    forward(model, 2, 7)
    forward(model, 2, 1)
    meter.step("detection (qnorm)")
    forward(model, 3, 4, embeds=True)
    meter.close()
    forward(model, 1, 9)  # after close(): the hook is gone
    metrics, steps = meter.metrics(), meter.report()["steps"]
    assert metrics["cost/forward_passes"] == 3 and metrics["cost/tokens"] == 2 * 7 + 2 * 1 + 3 * 4
    assert steps["first"]["forward_passes"] == 2 and steps["first"]["tokens"] == 16
    assert steps["detection_qnorm"]["tokens"] == 12  # named as MLflow metric names must be
    steps = metrics["cost/step/first/wall_time_s"] + metrics["cost/step/detection_qnorm/wall_time_s"]
    assert 0 < steps <= metrics["cost/wall_time_s"]
    assert meter.tags == {"device": "cpu", "dtype": "float32"}


def test_model_time_counts_inside_forward_passes_only():
    """Seconds spent inside the model's passes (a pre-hook sleeping 0.2 s stands for the work)
    count as model time; a pause between passes counts only in the wall time."""
    model = tiny_llama().model
    meter = cost.Meter()
    meter.watch(model)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.2))  # runs after the meter's own
    meter.step("baseline")
    forward(model, 1, 4)
    time.sleep(0.3)
    forward(model, 1, 4)
    meter.close()
    metrics, steps = meter.metrics(), meter.report()["steps"]
    assert metrics["cost/model_time_s"] >= 0.4
    assert metrics["cost/wall_time_s"] - metrics["cost/model_time_s"] >= 0.3
    assert steps["baseline"]["model_time_s"] == metrics["cost/model_time_s"]


def test_peak_memory_covers_what_the_run_held():
    meter = cost.Meter()
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    held = psutil.Process().memory_info().rss / 2**20
    del block
    after = psutil.Process().memory_info().rss / 2**20
    meter.close()
    peak = meter.metrics()["cost/peak_rss_mb"]
    assert peak >= held - 1  # 1 MiB: the kernel's RSS counters are per thread, summed lazily
    assert peak - after > 150  # the block was freed; the peak still holds it


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow


def test_cost_is_logged_also_when_the_run_fails(store):
    model = tiny_llama().model
    with store.start_run() as run:
        with pytest.raises(ValueError, match="late failure"), cost.measured():
            cost.step("baseline")
            cost.watch(model)
            forward(model, 1, 6)
            raise ValueError("late failure")
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.metrics["cost/forward_passes"] == 1 and logged.metrics["cost/tokens"] == 6
    assert logged.metrics["cost/step/baseline/wall_time_s"] > 0
    report = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/cost.json")
    assert report["steps"]["baseline"]["tokens"] == 6 and report["device"] == "cpu"
    assert logged.tags["device"] == "cpu" and logged.tags["dtype"] == "float32"
    cost.step("outside a run")  # no meter: nothing to count, no error
