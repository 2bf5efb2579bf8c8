"""Detectors that bring their own samples, and several detectors compared in one run: agreement
matrices and a causal check per detector (``per_detector``), on the embedded model."""

from __future__ import annotations

import json
import logging

import pytest
from mlflow.tracking import MlflowClient

from framework.interfaces import ConfigError
from framework.runner import pipeline

SMALL_TASK = ("task=passkey", "task.context_lengths=[128]", "task.depths=[0.5]", "task.samples_per_cell=2", "task.max_new_tokens=6")
OWN = ("detector.length=8", "detector.n_sequences=1", "detectors.echo.length=8", "detectors.echo.n_sequences=1")


def client(tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


def artifact(run_client: MlflowClient, run_id: str, path: str, tmp_path) -> dict:
    return json.loads(open(run_client.download_artifacts(run_id, path, str(tmp_path))).read())


@pytest.mark.e2e
def test_detectors_with_their_own_samples_need_no_task_samples(tmp_path, monkeypatch, compose_config, embedded_model,
                                                                caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = compose_config(*SMALL_TASK, "+detector=induction", "+detector@detectors.echo=echo", *OWN)
    with caplog.at_level(logging.INFO):
        context = pipeline.run(config, loaded=embedded_model)
    assert "induction on its own samples" in caplog.text and "echo on its own samples" in caplog.text
    store = client(tmp_path)
    run = store.get_run(context.run_id)
    assert [d.tags[0].value for d in run.inputs.dataset_inputs] == ["eval"]  # no detection samples built or logged
    pooled = artifact(store, context.run_id, "detector/induction/kv_scores.json", tmp_path)
    assert pooled["n_kv_heads"] == 3 and len(pooled["max"]) == 30 and len(pooled["max"][0]) == 3
    scores = context.head_scores.scores
    assert pooled["max"][17][1] == pytest.approx(scores[17, 3:6].max())


@pytest.mark.e2e
def test_each_detector_gets_its_own_causal_check(tmp_path, monkeypatch, compose_config, embedded_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = compose_config(*SMALL_TASK, "+detector=induction", "+detector@detectors.echo=echo",
                            "+detector@detectors.qnorm=qnorm", *OWN, "detector.top_k=5", "detectors.echo.top_k=5",
                            "detectors.qnorm.top_k=5", "+intervention=head_mask", "per_detector=true")
    context = pipeline.run(config, loaded=embedded_model)
    labels = [c.label for c in context.conditions]
    assert labels == ["treatment", "control", "treatment.echo", "control.echo", "treatment.qnorm", "control.qnorm"]
    echo = next(c for c in context.conditions if c.label == "treatment.echo")
    assert sorted(echo.edit.heads) == sorted(context.detector_scores["echo"].selected)
    store = client(tmp_path)
    causal = artifact(store, context.run_id, "detectors/causal.json", tmp_path)
    rows = {row[causal["columns"].index("detector")]: dict(zip(causal["columns"], row)) for row in causal["data"]}
    assert set(rows) == {"induction", "echo", "qnorm"}
    assert rows["echo"]["recall_treatment"] == pytest.approx(context.outcomes["treatment.echo"].mean())
    assert rows["qnorm"]["mcnemar_p_vs_control"] == context.metrics["mcnemar/treatment.qnorm_vs_control.qnorm/p_value"]
    agreement = artifact(store, context.run_id, "detectors/agreement.json", tmp_path)
    assert len(agreement["data"]) == 9  # 3 x 3 detectors
    assert "detectors/agreement.png" in [f.path for f in store.list_artifacts(context.run_id, "detectors")]


def test_per_detector_needs_an_intervention(compose_config):
    with pytest.raises(ConfigError, match="per_detector act on an intervention"):
        pipeline.run(compose_config("+detector=qnorm", "+detector@detectors.echo=echo", "per_detector=true"))


def test_per_detector_with_a_dose_gives_each_detector_its_dose_series(compose_config):
    import numpy as np
    from conftest import tiny_llama

    from framework.interfaces import HeadScores
    from framework.registry import get_registry
    from framework.runner.conditions import Plan, comparisons

    loaded = tiny_llama()
    config = compose_config("+detector=qnorm", "+detector@detectors.echo=echo", "per_detector=true",
                            "+intervention=head_mask", "dose.param=heads", "dose.values=[1,2]")
    plan = Plan.from_config(config, get_registry(), loaded.info)
    assert plan.n_conditions == 8
    main_scores, echo_scores = np.arange(12.0).reshape(3, 4), -np.arange(12.0).reshape(3, 4)
    conditions = plan.conditions(loaded, HeadScores("qnorm", main_scores, [(2, 3)]), 0,
                                 {"echo": HeadScores("echo", echo_scores, [(0, 0)])})
    by_label = {c.label: c for c in conditions}
    assert list(by_label) == ["treatment.heads_1", "control.heads_1", "treatment.heads_2", "control.heads_2",
                              "treatment.echo.heads_1", "control.echo.heads_1", "treatment.echo.heads_2",
                              "control.echo.heads_2"]
    # each series follows its own detector's scores: the top heads of qnorm are the last, of echo the first
    assert by_label["treatment.heads_2"].edit.heads == [(2, 2), (2, 3)]
    assert by_label["treatment.echo.heads_2"].edit.heads == [(0, 0), (0, 1)]
    assert {c.detector for c in conditions} == {None, "echo"}
    assert ("treatment.echo.heads_2", "control.echo.heads_2") in comparisons(conditions)


def test_per_detector_refuses_a_detector_that_selected_no_heads(compose_config):
    import numpy as np
    from conftest import tiny_llama

    from framework.interfaces import HeadScores
    from framework.registry import get_registry
    from framework.runner.conditions import Plan

    loaded = tiny_llama()
    config = compose_config("+detector=qnorm", "+detector@detectors.echo=echo", "per_detector=true",
                            "+intervention=head_mask")
    plan = Plan.from_config(config, get_registry(), loaded.info)
    assert plan.n_conditions == 4
    main = HeadScores("qnorm", np.zeros((3, 4)), [(0, 1)])
    with pytest.raises(ConfigError, match="detector 'echo' selected no heads"):
        plan.conditions(loaded, main, 0, {"echo": HeadScores("echo", np.zeros((3, 4)), [])})
    labels = [c.label for c in plan.conditions(loaded, main, 0, {"echo": HeadScores("echo", np.zeros((3, 4)), [(1, 2)])})]
    assert labels == ["treatment", "control", "treatment.echo", "control.echo"]
