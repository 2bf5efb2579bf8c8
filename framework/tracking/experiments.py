"""Where runs go: the store's location (``mlruns/`` or ``MLFLOW_TRACKING_URI``), experiments
created with the UI's saved view of the runs table, and the UI addresses printed after a run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

import mlflow

from framework.tracking import stores

STORE_DIR = Path("mlruns")

# MLflow 3.17's UI opens an experiment on its GenAI overview unless the address says
# workflowType=machine_learning (else the browser's last choice of the "GenAI / Model training"
# switch decides); the kind tag is what the UI reads when that switch is off.
_UI_QUERY = "workflowType=machine_learning"
_EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A saved view of the runs table (MLflow keeps saved views as experiment tags, listed under
# "Views"): the columns a researcher compares, in this order, opened by the addresses printed.
RUNS_VIEW = "retrieval-heads"
RUNS_VIEW_COLUMNS = [
    "attributes.`Dataset`",
    *(f"metrics.`{metric}`" for metric in ("recall/baseline", "recall/treatment", "recall/control",
                                           "permutation/treatment_vs_control/p_value", "heads/selected")),
    "tags.`model.family`",
    "metrics.`cost/wall_time_s`",
    "metrics.`cost/peak_rss_mb`",
]
_RUNS_VIEW_STATE = {"selectedColumns": RUNS_VIEW_COLUMNS, "columnOrder": ["attributes.`Run Name`", *RUNS_VIEW_COLUMNS],
                    "columnWidths": {"attributes.`Run Name`": 420, "attributes.`Dataset`": 240}}


def local_tracking_uri(store_dir: Path = STORE_DIR) -> str:
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the local store's URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()


def check_store() -> None:
    """Refuse a store that cannot take runs, creating nothing: a run's first check, before any
    model work (a local store is created by :func:`configure` when the run starts)."""
    stores.check(tracking_uri(), create=False)


def configure() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` if set, else at the local store; return the URI.
    The store is checked first (:func:`framework.tracking.stores.check`)."""
    uri = tracking_uri()
    stores.check(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/artifacts when local)."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        for key, value in _experiment_tags(existing.tags).items():  # experiments made before these tags
            mlflow.MlflowClient().set_experiment_tag(existing.experiment_id, key, value)
        return existing.experiment_id
    artifact_location = None
    if mlflow.get_tracking_uri() == local_tracking_uri():  # a server decides its own artifact root
        artifact_location = (STORE_DIR / "artifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location, tags=_experiment_tags({}))
    except mlflow.exceptions.MlflowException:  # created concurrently by another job
        return mlflow.get_experiment_by_name(name).experiment_id


def _experiment_tags(existing: Mapping[str, str]) -> dict[str, str]:
    """The tags that make the UI open the experiment on the runs table with its saved view, less
    those already set (a view the user has changed and saved is kept)."""
    now = int(time.time() * 1000)
    view = {"name": RUNS_VIEW, "createdAt": now, "updatedAt": now,
            "state": json.dumps(_RUNS_VIEW_STATE)}
    wanted = {**_EXPERIMENT_KIND, f"mlflow.sharedViewState.{RUNS_VIEW}": json.dumps(view)}
    return {key: value for key, value in wanted.items() if key not in existing}


def run_address(run_id: str) -> str:
    """Where to see a run and its experiment's runs table: URLs on a tracking server; for a local
    store, the same pages on 127.0.0.1:5000 once ``mlflow ui`` (the command given) is up."""
    uri = mlflow.get_tracking_uri()
    experiment = mlflow.get_run(run_id).info.experiment_id
    remote = uri.startswith(("http://", "https://"))
    server = uri.rstrip("/") if remote else "http://127.0.0.1:5000"
    how = "" if remote else f"after `mlflow ui --backend-store-uri {uri}`; "
    return (f"run page: {server}/#/experiments/{experiment}/runs/{run_id}?{_UI_QUERY}\n"
            f"  {how}runs table: {server}/#{runs_page(experiment)}")


def runs_page(experiment: str) -> str:
    """The UI page (after ``#``) of an experiment's runs table in the project's saved view."""
    return f"/experiments/{experiment}/runs?{_UI_QUERY}&viewStateShareKey={RUNS_VIEW}"


def system_metrics() -> bool | None:
    """``log_system_metrics`` for a run: CPU, memory (and GPU with nvidia-ml-py) every 10 s,
    unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise."""
    return None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True
