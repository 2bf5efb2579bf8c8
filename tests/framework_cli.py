"""Running the framework's commands as a user runs them, for the sweep, server and plugin tests:
a subprocess in a chosen directory, offline, logging to the local store under that directory
unless a tracking URI is given."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, Iterator

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


_NO_HYDRA_LOGGING = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def _is_hydra_command(module: str) -> bool:
    """Whether ``python -m module`` is a ``@hydra.main`` command (others parse their own arguments)."""
    spec = importlib.util.find_spec(module)
    path = Path(spec.origin)
    if spec.submodule_search_locations:  # a package runs its __main__
        path = path.parent / "__main__.py"
    return "@hydra.main" in path.read_text()


def run_here(cwd: Path, *args: str, module: str = "framework", env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """:func:`run`, but inside this interpreter: ``python -m module args`` executed by runpy in
    ``cwd`` with ``env`` as the environment, its output and exit status captured as a finished
    process's. For commands whose process itself is not under test (not signalled, no plugins on a
    new path), where a new interpreter costs most of a short test's time (about 25 s each on a
    busy 2-core machine). The process
    state a command changes (environment, working directory, signal handlers, logging, Hydra's
    global state) is restored afterwards; commands that load plugins from a new path
    (``PYTHONPATH``) need :func:`run`, since the registry is read once per process."""
    from hydra.core.global_hydra import GlobalHydra

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_sigterm, root = signal.getsignal(signal.SIGTERM), logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    command_env = env or environment()  # read before the clear: environment() copies os.environ
    os.environ.clear()
    os.environ.update(command_env)
    os.chdir(cwd)
    # Hydra's own logging set-up (logging.config.dictConfig) would close every handler of this
    # process, pytest's included: it is left out, and a handler like Hydra's console one (INFO
    # and up, to stdout, its format) stands in for it during the command.
    sys.argv = [module, *args, *(_NO_HYDRA_LOGGING if _is_hydra_command(module) else ())]
    console = logging.StreamHandler(stdout)
    console.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.handlers[:] = [*saved_handlers, console]
    root.setLevel(logging.INFO)
    GlobalHydra.instance().clear()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                with warnings.catch_warnings():  # the module is imported already (by the tests): runpy
                    # warns, then runs its code afresh as __main__, which is what a new process does
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as stop:  # as the interpreter reports it: a message goes to stderr, status 1
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_sigterm)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess([module, *args], code, stdout.getvalue(), stderr.getvalue())


def _ctrl_c_reaches_it() -> None:
    """A shell ignores SIGINT in the jobs it starts in the background (``pytest ... &``), and a
    child inherits that; a terminal's Ctrl-C reaches the command, so restore the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_watching(cwd: Path, *args: str, after: list[str], action: Callable[[subprocess.Popen], None],
                 module: str = "framework", env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the command (in a process group of its own) and call ``action`` on it once its output
    has shown each of ``after`` in turn; its exit status and output."""
    process = subprocess.Popen(command(*args, module=module), cwd=cwd, env=env or environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_ctrl_c_reaches_it)
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    lines, waiting = [], list(after)
    try:
        for line in process.stdout:
            lines.append(line)
            if waiting and waiting[0] in line:
                waiting.pop(0)
                if not waiting:
                    action(process)
        return process.wait(), "".join(lines)
    finally:
        watchdog.cancel()


def run_until_signalled(cwd: Path, *args: str, after: list[str], sig: int = signal.SIGINT, module: str = "framework",
                        env: dict[str, str] | None = None) -> tuple[int, str]:
    """Send ``sig`` to the command's process group (SIGINT: as a terminal's Ctrl-C does; SIGTERM:
    as Slurm does at a time limit) once its output has shown each of ``after`` in turn."""
    return run_watching(cwd, *args, after=after, action=lambda process: os.killpg(process.pid, sig),
                        module=module, env=env)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """A real ``mlflow server`` (or, with ``args``, ``mlflow ui`` or any other serving command) on
    127.0.0.1; by default a SQLite backend with artifacts served from ``root/artifacts``. It can be
    stopped and started again on the same port and store."""

    def __init__(self, root: Path, *args: str):
        self.root, self.port = root, free_port()
        self.url, self.artifacts = f"http://127.0.0.1:{self.port}", root / "artifacts"
        self.args = args or ("server", "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--artifacts-destination", str(self.artifacts))
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *self.args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"mlflow {self.args[0]} did not answer within 180 s"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers: the group it leads
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@contextmanager
def serving(root: Path, *args: str) -> Iterator[TrackingServer]:
    """A :class:`TrackingServer` that answers for the duration of the block."""
    server = TrackingServer(root, *args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
