"""What the MLflow UI gets from a run: its name, the experiment tags that open the runs table in
the project's saved view, the printed addresses, and the samples as dataset inputs."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from framework.interfaces import Sample
from framework.tracking import dataset_inputs, experiments, runs

CONFIG = {"model": {"name": "smollm2_135m"}, "task": {"name": "niah", "context_lengths": [256]},
          "detector": {"name": "attn_mass", "top_k": 5}, "intervention": {"name": "head_mask"},
          "seed": 0, "batch_size": 8}


def test_run_names_say_what_ran_and_differ_with_the_config():
    name = runs.run_label(CONFIG, "smollm2_135m")
    assert name == f"smollm2_135m-attn_mass-head_mask-niah-seed0-{runs.config_hash(CONFIG)[:6]}"
    assert runs.run_label(dict(CONFIG), "smollm2_135m") == name  # a re-run of one config
    assert runs.run_label({**CONFIG, "batch_size": 4}, "smollm2_135m") != name  # differs outside the name
    baseline = {k: v for k, v in CONFIG.items() if k not in ("detector", "intervention")}
    assert runs.run_label(baseline, "smollm2_135m").startswith("smollm2_135m-niah-seed0-")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments.configure()
    return MlflowClient()


def saved_view(client: MlflowClient, experiment: str) -> dict:
    view = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{experiments.RUNS_VIEW}"])
    return {**view, "state": json.loads(view["state"])}


def test_experiments_open_on_the_runs_table_in_the_saved_view(store):
    created = experiments.experiment_id("fresh")
    assert store.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    view = saved_view(store, created)
    assert view["name"] == experiments.RUNS_VIEW and view["state"]["selectedColumns"] == experiments.RUNS_VIEW_COLUMNS
    assert "metrics.`recall/treatment`" in experiments.RUNS_VIEW_COLUMNS

    older = store.create_experiment("made before")  # without the tags: they are added on next use
    assert experiments.experiment_id("made before") == older
    assert saved_view(store, older)["state"]["selectedColumns"] == experiments.RUNS_VIEW_COLUMNS

    changed = {**saved_view(store, older), "state": json.dumps({"selectedColumns": ["attributes.`Dataset`"]})}
    store.set_experiment_tag(older, f"mlflow.sharedViewState.{experiments.RUNS_VIEW}", json.dumps(changed))
    experiments.experiment_id("made before")
    assert saved_view(store, older)["state"]["selectedColumns"] == ["attributes.`Dataset`"]  # the user's view kept


def test_printed_addresses(store, monkeypatch):
    experiment = experiments.experiment_id("retrieval-heads")
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    run_id, uri = run.info.run_id, mlflow.get_tracking_uri()
    local = experiments.run_address(run_id).splitlines()
    assert local[0] == f"run page: http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    assert local[1] == (f"  after `mlflow ui --backend-store-uri {uri}`; runs table: http://127.0.0.1:5000/#/experiments/"
                        f"{experiment}/runs?workflowType=machine_learning&viewStateShareKey=retrieval-heads")
    # the address a server gets: its URL, nothing to start (the run is read through the local store)
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow.example.org:5000/")
    monkeypatch.setattr(mlflow, "get_run", lambda _: run)
    assert experiments.run_address(run_id).splitlines()[0] == (
        f"run page: http://mlflow.example.org:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning")


def sample(i: int, ids: list[int], depth: float) -> Sample:
    return Sample(id=f"s{i}", input_ids=ids, answer="42", answer_ids=[7], context_span=(1, 5), query_start=5,
                  needle_span=(2, 3), meta={"context_length": 256, "depth": depth, "tokens": len(ids), "answers": ["42"]})


def logged_inputs(samples: list[Sample]) -> list:
    with mlflow.start_run(experiment_id=experiments.experiment_id("retrieval-heads")) as run:
        dataset_inputs.log_samples(samples, CONFIG["task"], "eval", 0)
        dataset_inputs.log_samples(samples[:1], CONFIG["task"], "detect", 1)
    return MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs


def test_samples_are_dataset_inputs_with_a_digest_of_their_prompts(store):
    samples = [sample(0, [1, 5, 6, 7, 8, 9], 0.2), sample(1, [1, 5, 6, 7, 8, 9], 0.8)]
    first, again = logged_inputs(samples), logged_inputs(list(samples))
    changed = logged_inputs([sample(0, [1, 5, 6, 7, 8, 10], 0.2), samples[1]])  # one prompt token differs
    evaluation = first[[i.tags[0].value for i in first].index("eval")].dataset
    assert evaluation.name == "niah-eval-seed0-len256"
    columns = {c["name"]: c["type"] for c in json.loads(evaluation.schema)["mlflow_colspec"]}
    assert columns["context_length"] == "long" and columns["depth"] == "double" and "answers" not in columns
    assert json.loads(evaluation.source)["tags"] == {**CONFIG["task"], "split": "eval", "seed": 0}
    assert sorted(i.dataset.digest for i in again) == sorted(i.dataset.digest for i in first)
    assert {i.dataset.digest for i in changed} != {i.dataset.digest for i in first}
    assert sorted(i.tags[0].value for i in first) == ["detect", "eval"]
