"""One MLflow run per composed job: its config, params and model tags up front, and its end
(FINISHED, or FAILED / KILLED with the error and the plugin that raised it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from contextlib import contextmanager, suppress
from importlib.metadata import entry_points
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import RunStatus

from framework import hookspecs
from framework.interfaces import ModelInfo
from framework.planning import cost
from framework.registry import get_registry
from framework.tracking import stores
from framework.tracking.experiments import configure, experiment_id, system_metrics

log = logging.getLogger(__name__)

_MAX_PARAM_LENGTH = 6000
_PARAMS_PER_CALL = 100


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
    (:func:`framework.tracking.upload.kept_locally`), so a server that goes away mid-run loses nothing.
    """
    from framework.tracking.upload import kept_locally  # it builds on this module

    uri = configure()
    opened = kept_locally if stores.is_server(uri) else _local_run
    name = run_name or (tags or {}).get("mlflow.runName") or run_label(config, info.name)
    with opened(uri, experiment, name, parent_run_id, {"config_hash": config_hash(config), **(tags or {})}) as run:
        yield from _logged(run, config, info)


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
