"""MLflow tracking: the store, one run per composed job, and failure handling.

Without ``MLFLOW_TRACKING_URI`` runs go to a local SQLite store under ``mlruns/`` with artifacts
in ``mlruns/artifacts``; a team sets ``MLFLOW_TRACKING_URI`` to its ``mlflow server`` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from contextlib import contextmanager, suppress
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import RunStatus

from framework import cost, hookspecs, stores
from framework.interfaces import ModelInfo
from framework.registry import get_registry

log = logging.getLogger(__name__)

STORE_DIR = Path("mlruns")
_MAX_PARAM_LENGTH = 6000
_PARAMS_PER_CALL = 100

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


def configure() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` if set, else at the local store; return the URI.
    The store is checked first (:func:`framework.stores.check`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
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


def config_hash(config: Mapping[str, Any]) -> str:
    """Identity of a resolved job config (tag ``config_hash``): a re-run sweep skips jobs whose
    config already has a FINISHED run, so the hash must not depend on key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_label(config: Mapping[str, Any], model: str) -> str:
    """The default run name: what ran (model, detector, intervention, task, seed) and the start of
    the config hash, which tells apart runs whose configs differ elsewhere."""
    plugins = [config[kind]["name"] for kind in ("detector", "intervention", "task")
               if isinstance(config.get(kind), Mapping) and "name" in config[kind]]
    seed = [f"seed{config['seed']}"] if "seed" in config else []
    return "-".join([model, *plugins, *seed, config_hash(config)[:6]])


def failing_plugin(error: BaseException) -> str | None:
    """The plugin whose code raised ``error`` (innermost plugin frame of its traceback), named
    with its distribution, so that a failure inside third-party code points at that code."""
    group = entry_points(group=hookspecs.PROJECT)
    owners = {ep.module: f"{ep.name} ({ep.dist.name} {ep.dist.version})" for ep in group}
    with suppress(Exception):  # a registry that fails to load still leaves the entry points to go by
        owners |= {e.cls.__module__: e.source for kind in get_registry().entries.values() for e in kind.values()}
    culprit = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        culprit = owners.get(frame.f_globals.get("__name__", ""), culprit)
    return culprit


def failed_run_id(error: BaseException) -> str | None:
    """The MLflow run that ``error`` ended (marked FAILED or KILLED), if one was open."""
    return getattr(error, "_mlflow_run_id", None)


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
def tracked_run(
    config: Mapping[str, Any],
    info: ModelInfo,
    experiment: str,
    run_name: str | None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """An active MLflow run with config, params and model tags logged up front; nested under
    ``parent_run_id`` when it is one job of a sweep.

    An exception ends the run FAILED (Ctrl-C, SIGTERM: KILLED) with the error (and the plugin
    that raised it) logged as tags and an artifact; everything logged before it stays. Against a
    tracking server, the run's results go to the server through a local folder
    (:func:`framework.upload.kept_locally`), so a server that goes away mid-run loses nothing.
    """
    from framework.upload import kept_locally  # it builds on this module

    uri = configure()
    opened = kept_locally if stores.is_server(uri) else _local_run
    name = run_name or (tags or {}).get("mlflow.runName") or run_label(config, info.name)
    with opened(uri, experiment, name, parent_run_id, {"config_hash": config_hash(config), **(tags or {})}) as run:
        yield from _logged(run, config, info)


def system_metrics() -> bool | None:
    """``log_system_metrics`` for a run: CPU, memory (and GPU with nvidia-ml-py) every 10 s,
    unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise."""
    return None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True


@contextmanager
def _local_run(uri: str, experiment: str, run_name: str, parent_run_id: str | None,
               tags: Mapping[str, str]) -> Iterator[Any]:
    yield mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name,
                           parent_run_id=parent_run_id, tags=dict(tags), log_system_metrics=system_metrics())


def _logged(run: Any, config: Mapping[str, Any], info: ModelInfo) -> Iterator[Any]:
    """The body of :func:`tracked_run` on the active run: log up front, end the run."""
    try:
        mlflow.set_tags(model_tags(info))
        params = {k: str(v)[:_MAX_PARAM_LENGTH] for k, v in flatten(config).items()}
        items = sorted(params.items())
        for start in range(0, len(items), _PARAMS_PER_CALL):
            mlflow.log_params(dict(items[start : start + _PARAMS_PER_CALL]))
        mlflow.log_dict(dict(config), "config.yaml")
        with cost.measured():
            yield run
    except BaseException as error:
        status = RunStatus.to_string(RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED)
        try:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            plugin = failing_plugin(error)
            if plugin is not None:
                mlflow.set_tag("error.plugin", plugin)
            mlflow.log_text(traceback.format_exc(), "error.txt")
        except Exception as logging_error:  # e.g. a full disk: the run must still end, with the first error
            log.error("could not log the error to run %s: %s", run.info.run_id, logging_error)
        mlflow.end_run(status=status)
        log.error("run %s marked %s; what it logged so far is kept", run.info.run_id, status)
        error._mlflow_run_id = run.info.run_id  # read back by failed_run_id()
        raise
    else:
        mlflow.end_run()
