"""MLflow tracking: the store, one run per composed job, and failure handling.

Without ``MLFLOW_TRACKING_URI`` runs go to a local SQLite store under ``mlruns/`` with artifacts
in ``mlruns/artifacts``; a team sets ``MLFLOW_TRACKING_URI`` to its ``mlflow server`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import RunStatus

from framework.interfaces import ModelInfo

log = logging.getLogger(__name__)

STORE_DIR = Path("mlruns")
_MAX_PARAM_LENGTH = 6000
_PARAMS_PER_CALL = 100


def local_tracking_uri(store_dir: Path = STORE_DIR) -> str:
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def configure() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` if set, else at the local store; return the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        STORE_DIR.mkdir(exist_ok=True)
        uri = local_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/artifacts when local)."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if mlflow.get_tracking_uri() == local_tracking_uri():  # a server decides its own artifact root
        artifact_location = (STORE_DIR / "artifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another job
        return mlflow.get_experiment_by_name(name).experiment_id


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value}; lists become JSON strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def model_tags(info: ModelInfo) -> dict[str, str]:
    return {
        "model": info.name,
        "model.family": info.family,
        "model.rope_theta": str(info.rope_theta),
        "model.layers": str(info.n_layers),
        "model.heads": str(info.n_heads),
        "model.kv_heads": str(info.n_kv_heads),
        "model.head_dim": str(info.head_dim),
    }


@contextmanager
def tracked_run(config: Mapping[str, Any], info: ModelInfo, experiment: str, run_name: str | None) -> Iterator[Any]:
    """An active MLflow run with config, params and model tags logged up front.

    An exception ends the run FAILED (Ctrl-C: KILLED) with the error logged as a tag and an
    artifact; everything logged before it stays.
    """
    configure()
    run = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name)
    try:
        mlflow.set_tags(model_tags(info))
        params = {k: str(v)[:_MAX_PARAM_LENGTH] for k, v in flatten(config).items()}
        items = sorted(params.items())
        for start in range(0, len(items), _PARAMS_PER_CALL):
            mlflow.log_params(dict(items[start : start + _PARAMS_PER_CALL]))
        mlflow.log_dict(dict(config), "config.yaml")
        yield run
    except BaseException as error:
        status = RunStatus.to_string(RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED)
        mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
        mlflow.log_text(traceback.format_exc(), "error.txt")
        mlflow.end_run(status=status)
        log.error("run %s marked %s; what it logged so far is kept", run.info.run_id, status)
        raise
    else:
        mlflow.end_run()
