"""Runs against a tracking server keep their results in a local folder until they have reached
the server: ``python -m framework.tracking.upload FOLDER`` uploads them once the server is back.

A run against ``MLFLOW_TRACKING_URI=http(s)://...`` is created on the server when it starts (with
its tags, so the server shows it RUNNING), but logs its params, metrics and artifacts to its own
SQLite store in ``mlruns/pending/<run id>/`` and uploads them when it ends. If the server is gone
by then (restarted, network down, a Slurm node cut off), nothing is lost: the folder stays, the
error names it and this command, and the server run keeps its id, so sweeps resume as usual.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking.context.registry import resolve_tags

from framework.tracking import experiments, stores

log = logging.getLogger(__name__)

PENDING = experiments.STORE_DIR / "pending"
TARGET_FILE = "target.json"  # in a run's folder: the server and the run id there
_BATCH = 100  # MLflow's limit of params (and tags) per log_batch call


def _store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


@contextmanager
def kept_locally(server_uri: str, experiment: str, run_name: str | None, parent_run_id: str | None,
                 tags: Mapping[str, str]) -> Iterator[Run]:
    """The server's run for a job; while it is open, MLflow's fluent API logs to the run's local
    folder, uploaded when the run ends (see the module docstring)."""
    run_tags = resolve_tags({**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
    server_run = MlflowClient(server_uri).create_run(experiments.experiment_id(experiment), run_name=run_name,
                                                      tags=run_tags)
    folder = (PENDING / server_run.info.run_id).resolve()
    folder.mkdir(parents=True)
    (folder / TARGET_FILE).write_text(json.dumps({"tracking_uri": server_uri, "run_id": server_run.info.run_id}))
    stores.create_sqlite_store(folder / "mlflow.db")
    mlflow.set_tracking_uri(_store_uri(folder))
    local_experiment = mlflow.create_experiment(experiment, artifact_location=(folder / "artifacts").as_uri())
    mlflow.start_run(experiment_id=local_experiment, run_name=server_run.info.run_name, tags=run_tags,
                     log_system_metrics=experiments.system_metrics())
    try:
        yield server_run
    except BaseException:
        _upload_or_keep(folder, server_uri, failing=True)
        raise
    else:
        _upload_or_keep(folder, server_uri, failing=False)


def _upload_or_keep(folder: Path, server_uri: str, failing: bool) -> None:
    mlflow.end_run()  # no-op when the run has been ended already, as tracked_run does
    mlflow.set_tracking_uri(server_uri)
    try:
        upload(folder)
    except Exception as error:
        message = (f"the tracking server {server_uri} did not take the run's results "
                   f"({type(error).__name__}: {str(error)[:300]}); they are kept in {folder}: "
                   f"upload them with `python -m framework.tracking.upload {folder}` once the server is back")
        if failing:  # the run's own error is the one to raise; say where its results are
            log.error(message)
        else:
            raise stores.TrackingStoreError(message) from None


def upload(folder: Path) -> Run:
    """Copy the run kept in ``folder`` (params, metric histories, tags, artifacts, final status)
    into its run on the tracking server, then remove the folder. Safe to repeat after a failure."""
    folder = Path(folder)
    target = json.loads((folder / TARGET_FILE).read_text())
    local = MlflowClient(_store_uri(folder))
    [run] = local.search_runs([e.experiment_id for e in local.search_experiments()])
    server, run_id = MlflowClient(target["tracking_uri"]), target["run_id"]
    params = [Param(k, v) for k, v in run.data.params.items()]
    tags = [RunTag(k, v) for k, v in run.data.tags.items()]
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in run.data.metrics for m in local.get_metric_history(run.info.run_id, key)]
    for start in range(0, max(len(params), len(tags), len(metrics)), _BATCH):
        server.log_batch(run_id, metrics[start:start + _BATCH], params[start:start + _BATCH],
                         tags[start:start + _BATCH])
    artifacts = Path(mlflow.artifacts.download_artifacts(run.info.artifact_uri)) if local.list_artifacts(
        run.info.run_id) else None
    if artifacts is not None:
        server.log_artifacts(run_id, str(artifacts))
    # still RUNNING here: its process died before it could end the run
    server.set_terminated(run_id, "KILLED" if run.info.status == "RUNNING" else run.info.status,
                          end_time=run.info.end_time)
    shutil.rmtree(folder)
    return server.get_run(run_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m framework.tracking.upload", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders named by the error, mlruns/pending/<run id>")
    args = parser.parse_args(argv)
    stores.quiet_retries()
    failed = 0
    for folder in args.folders:
        if not (folder / TARGET_FILE).is_file():
            print(f"error: {folder} holds no run kept for upload (no {TARGET_FILE})", file=sys.stderr)
            failed += 1
            continue
        try:
            run = upload(folder)
        except Exception as error:
            print(f"error: {folder}: {type(error).__name__}: {str(error)[:300]}; the folder is kept", file=sys.stderr)
            failed += 1
            continue
        print(f"uploaded run {run.info.run_id} ({run.info.status}); {folder} is removed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
