"""Running the framework's commands as a user runs them, for the sweep, server and plugin tests:
a subprocess in a chosen directory, offline, logging to the local store under that directory
unless a tracking URI is given."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient
from mlflow.entities import Run

# two samples per condition (permutation tests need two), no more
TINY_GRID = ["task.context_lengths=[256]", "task.depths=[0.2,0.8]", "task.samples_per_cell=1"]


def environment(tracking_uri: str | None = None, pythonpath: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return env


def command(*args: str, module: str = "framework") -> list[str]:
    return [sys.executable, "-m", module, *args]


def run(cwd: Path, *args: str, module: str = "framework", env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, module=module), cwd=cwd, env=env or environment(),
                          capture_output=True, text=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(*args: str, log_path: Path) -> Iterator[str]:
    """``mlflow <args> --host 127.0.0.1 --port <free port>`` (``server`` or ``ui``) until the block
    ends; yields its URL once it answers /health. Its output goes to ``log_path``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"mlflow {args[0]} did not answer within 180 s"
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the group it leads
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def local_store(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def all_runs(client: MlflowClient) -> list[Run]:
    experiment = client.get_experiment_by_name("retrieval-heads")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def sweep_runs(client: MlflowClient) -> tuple[Run, list[Run]]:
    """The one parent run in the store and its child runs."""
    runs = all_runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def summary(client: MlflowClient, parent: Run, download_dir: Path) -> list[dict]:
    """The rows of a sweep's summary table (sweep/summary.json on its parent run)."""
    download_dir.mkdir(parents=True)
    path = Path(client.download_artifacts(parent.info.run_id, "sweep/summary.json", str(download_dir)))
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]
