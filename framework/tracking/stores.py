"""The tracking store, checked before a run starts: a server that does not answer, or a local
store that cannot be written, is one error within seconds that names the URI and says what to do
(MLflow's own client would retry a missing server for minutes). New SQLite stores are created
atomically, so that runs starting together on a fresh store do not both create its tables.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import mlflow

from framework.interfaces import ConfigError


class TrackingStoreError(ConfigError):
    """The tracking store cannot be reached or written; the message says what to do."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def quiet_retries() -> None:
    """Fail within seconds when a tracking server does not answer, instead of MLflow's default
    of retrying for minutes; the user's own MLFLOW_HTTP_REQUEST_* settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check(uri: str, create: bool = True) -> None:
    """Refuse a store that cannot take runs (see the module docstring); ``create=False`` checks
    a new local store's folder without creating anything (a run checks that before any model work)."""
    if is_server(uri):
        _check_server(uri)
    else:
        _check_writable(uri, create)


def _check_server(uri: str) -> None:
    quiet_retries()
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:
        refused = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))  # what urllib3's retry message wraps
        reason = refused.group(0) if refused else str(error).splitlines()[0][:300]
        raise TrackingStoreError(
            f"the tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {reason}; start it or fix "
            "MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to log to the local store mlruns/") from None


def _check_writable(uri: str, create: bool) -> None:
    """A SQLite store needs its folder writable (SQLite writes a journal next to the database);
    a new one is created here (or, without ``create``, its nearest existing folder is written to)."""
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    try:
        if create:
            database.parent.mkdir(parents=True, exist_ok=True)
        folder = next(p for p in (database.parent, *database.parent.parents) if p.exists())
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(folder))
        with tempfile.TemporaryFile(dir=folder):
            pass
        if database.exists():
            with database.open("ab"):
                pass
        elif create:
            create_sqlite_store(database)
    except OSError as error:
        raise TrackingStoreError(
            f"the tracking store {uri} cannot be written ({error.strerror or error}: {error.filename or database}); "
            "run from a folder you can write to, or set MLFLOW_TRACKING_URI to a writable store or a tracking "
            "server") from None


def _empty_store() -> Path:
    """An empty SQLite store with MLflow's schema, made once per MLflow version in the cache:
    creating the schema takes seconds, copying it does not."""
    from framework.model.loading import cache_root

    template = cache_root() / f"empty-mlflow-{mlflow.__version__}.db"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=template.parent))
        mlflow.MlflowClient(f"sqlite:///{staging / 'mlflow.db'}").search_experiments()  # creates the schema
        (staging / "mlflow.db").replace(template)
        shutil.rmtree(staging)
    return template


def create_sqlite_store(database: Path) -> None:
    """Give ``database`` MLflow's schema unless it exists, atomically: two runs that create the
    same new store at once would otherwise both create its tables, and one fails."""
    if database.exists():
        return
    staging = database.with_name(f".{database.name}.{os.getpid()}")
    shutil.copyfile(_empty_store(), staging)
    try:
        os.link(staging, database)  # fails if another process was first
    except FileExistsError:
        pass
    finally:
        staging.unlink()
