"""Sweeps: one MLflow parent run per ``--multirun``, one nested child run per job, a summary.

Hydra runs a sweep's jobs in the launching process (basic launcher), in worker processes
(joblib) or on other machines (submitit / Slurm). So :class:`SweepCallback` opens the parent run
in the launching process and hands it to the jobs through a file in the sweep directory, which
all launchers share; each job reports how it ended in a file in its own output directory, and
the parent's summary (table + figure) is built from those reports when the sweep ends.

A sweep is identified by its experiment and its command-line overrides: running the same
command again (after Ctrl-C, a crash, or a failed job) reuses the parent run and skips every job
whose resolved config (tag ``config_hash``) already has a FINISHED child run, unless the command
says ``+redo=true``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

if TYPE_CHECKING:  # imported where used: Hydra instantiates the callback on every start-up
    import pandas as pd
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

REDO = "redo"  # +redo=true re-runs jobs that already finished
SWEEP_FILE = "mlflow_sweep.json"  # in the sweep directory: the parent run, for the jobs
JOB_FILE = "mlflow_job.json"  # in each job's output directory: how the job ended
Outcome = Literal["finished", "skipped", "failed", "killed"]  # killed: stopped by Ctrl-C or SIGTERM


def _key(override: str) -> str:
    """``+intervention=a,b`` -> ``intervention``."""
    return OverridesParser.create().parse_overrides([override])[0].key_or_group


@dataclass(frozen=True)
class Sweep:
    """What the launching process tells every job of one sweep invocation."""

    parent_run_id: str
    tracking_uri: str
    invocation: str  # tells this invocation's job reports from older ones in a reused sweep dir
    jobs: int  # the size of the grid the command line spans
    swept: list[str]  # the keys whose values vary between jobs

    @classmethod
    def read(cls, sweep_dir: Path) -> Sweep:
        return cls(**json.loads((sweep_dir / SWEEP_FILE).read_text()))


@dataclass(frozen=True)
class Job:
    """One job of a sweep, seen from inside the job."""

    sweep: Sweep
    num: int
    overrides: list[str]
    output_dir: Path

    @property
    def name(self) -> str:
        """The overrides that tell this job from the others, e.g. ``seed=1 +intervention=head_mask``."""
        return " ".join(o for o in self.overrides if _key(o) in self.sweep.swept) or f"job {self.num}"

    @property
    def label(self) -> str:
        return f"sweep job {self.num + 1}/{self.sweep.jobs} ({self.name})"

    def run_tags(self, run_name: str | None) -> dict[str, str]:
        """Tags of the job's run; it is named after the job unless the config names it."""
        return {"mlflow.runName": run_name or self.name, "sweep.job": str(self.num),
                "sweep.overrides": " ".join(self.overrides)}

    def finished_run(self, config: dict[str, Any]) -> str | None:
        """The id of a FINISHED child run of this sweep with the same resolved config, if any."""
        from mlflow import MlflowClient

        from framework.tracking.experiments import experiment_id
        from framework.tracking.runs import config_hash

        runs = MlflowClient(self.sweep.tracking_uri).search_runs(
            [experiment_id(config["experiment"])],
            f"tags.`mlflow.parentRunId` = '{self.sweep.parent_run_id}' "
            f"and tags.config_hash = '{config_hash(config)}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def report(self, outcome: Outcome, run_id: str | None, error: str | None = None) -> None:
        record = {"invocation": self.sweep.invocation, "num": self.num, "name": self.name,
                  "outcome": outcome, "run_id": run_id, "error": error}
        (self.output_dir / JOB_FILE).write_text(json.dumps(record))


def current_job() -> Job | None:
    """The sweep job this process is running, or None outside a sweep; points MLflow at the
    sweep's store, so that a job on another machine logs next to its parent."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or not (Path(hydra.sweep.dir) / SWEEP_FILE).exists():
        return None  # not a sweep, or one without the callback (e.g. a config without it)
    sweep = Sweep.read(Path(hydra.sweep.dir))
    os.environ["MLFLOW_TRACKING_URI"] = sweep.tracking_uri
    return Job(sweep, int(hydra.job.num), list(hydra.overrides.task), Path(hydra.runtime.output_dir))


class SweepCallback(Callback):
    """Opens the sweep's parent run before the first job and closes it, with its summary, after
    the last (configured under ``hydra.callbacks`` in ``conf/config.yaml``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):  # each job prints its plan; nothing is logged, so no parent run either
            return
        try:
            _open(config)
        except Exception as error:  # no parent, no sweep: say so once instead of failing every job
            sys.exit(f"error: cannot open the sweep's parent run in MLflow: {type(error).__name__}: {error}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return
        try:
            failed = close()
        except Exception as error:
            sys.exit(f"error: cannot close the sweep's parent run in MLflow: {type(error).__name__}: {error}")
        if failed:
            sys.exit(f"error: {failed} sweep job(s) failed (see above); the sweep's parent run is marked FAILED")


_opened: tuple[Path, Sweep, list[str]] | None = None  # the sweep this (launching) process has open; job names


def _open(config: DictConfig) -> None:
    from mlflow import MlflowClient

    from framework.tracking import experiments, runs

    global _opened
    overrides = [o for o in config.hydra.overrides.task if _key(o) != REDO]
    parser = OverridesParser.create(GlobalHydra.instance().config_loader())  # which expands glob(...) sweeps
    parsed = [o for o in parser.parse_overrides(overrides) if o.is_sweep_override()]
    key = runs.config_hash({"experiment": config.experiment, "overrides": sorted(overrides)})
    uri = experiments.configure()
    client = MlflowClient(uri)
    experiment = experiments.experiment_id(config.experiment)
    previous = client.search_runs([experiment], f"tags.`sweep.key` = '{key}'", max_results=1)
    if previous:
        parent = previous[0].info.run_id
        client.update_run(parent, status="RUNNING")
        log.info("sweep: the same command ran before; resuming its parent run %s", parent)
    else:
        command = " ".join(overrides)
        parent = client.create_run(experiment, run_name=f"sweep {command}"[:250],
                                   tags={"sweep": "parent", "sweep.key": key, "sweep.command": command}).info.run_id
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    client.set_tag(parent, "sweep.dir", str(sweep_dir.resolve()))
    # the job names in the order of Hydra's basic sweeper (job i is the i-th of the product)
    names = [" ".join(job) for job in itertools.product(
        *([f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] for o in parsed))]
    sweep = Sweep(parent, uri, uuid.uuid4().hex, len(names), [o.key_or_group for o in parsed])
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(asdict(sweep)))
    _opened = sweep_dir, sweep, names
    log.info("sweep: %d jobs under parent run %s (%s)", sweep.jobs, parent, uri)


def close(stopped: Literal["KILLED", "FAILED"] | None = None) -> int:
    """Log the summary of the jobs that reported to the open sweep's parent run and end it: with
    the status ``stopped`` if the sweep stopped early, else FAILED if a job failed, else FINISHED.
    A sweep that stopped early lists the jobs that did not finish (killed, or never started) in
    its summary and its last line; running the same command again resumes it.
    Returns the number of failed jobs (0 when no sweep is open in this process)."""
    from mlflow import MlflowClient

    global _opened
    if _opened is None:
        return 0
    sweep_dir, sweep, names = _opened
    _opened = None
    reports = [json.loads(p.read_text()) for p in sweep_dir.rglob(JOB_FILE)]
    reports = [r for r in reports if r["invocation"] == sweep.invocation]
    reported = {r["num"] for r in reports}
    if stopped:  # no report from a job means it never started (or was cut off before it could report)
        reports += [{"invocation": sweep.invocation, "num": num, "name": name, "outcome": "not started",
                     "run_id": None, "error": None} for num, name in enumerate(names) if num not in reported]
    reports.sort(key=lambda r: r["num"])
    _kill_open_children(sweep)
    client = MlflowClient(sweep.tracking_uri)
    counts = {outcome: sum(r["outcome"] == outcome for r in reports)
              for outcome in ("finished", "skipped", "failed", "killed", "not started")}
    if reports:
        table = summary_table(client, reports)
        # log_text, not log_table: a resumed sweep replaces the summary, log_table would append to it
        client.log_text(sweep.parent_run_id, table.to_json(orient="split", index=False), "sweep/summary.json")
        client.log_figure(sweep.parent_run_id, summary_figure(table), "sweep/recall.png")
    for outcome, count in counts.items():
        client.log_metric(sweep.parent_run_id, f"sweep/{outcome.replace(' ', '_')}", count)
    status = stopped or ("FAILED" if counts["failed"] else "FINISHED")
    client.set_terminated(sweep.parent_run_id, status)
    print(f"sweep {sweep.parent_run_id} ({status}): {sweep.jobs} jobs: "
          + ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n or outcome != "not started"))
    unfinished = [f"{r['num'] + 1} ({r['name']})" for r in reports if r["outcome"] in ("killed", "not started")]
    if unfinished:
        print(f"did not finish: job {', '.join(unfinished)}; run the same command again to resume the sweep")
    return counts["failed"]


def _kill_open_children(sweep: Sweep) -> None:
    """Mark KILLED any job run of this sweep still RUNNING when the sweep ends: one whose
    process was stopped before it could mark its own run (a parallel worker, a cancelled
    Slurm job)."""
    from mlflow import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_run(sweep.parent_run_id).info.experiment_id
    for run in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}' "
                                               "and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "error", "the sweep stopped before this job's run ended")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("sweep: run %s was still RUNNING; marked KILLED", run.info.run_id)


def summary_table(client: MlflowClient, reports: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per job: how it ended, its run (for a skipped job: the earlier run) and metrics."""
    import pandas as pd

    rows = []
    for report in reports:
        row = {"job": report["num"], "name": report["name"], "outcome": report["outcome"],
               "run_id": report["run_id"], "error": report["error"]}
        if report["run_id"]:
            run = client.get_run(report["run_id"])
            row |= {"status": run.info.status, "config_hash": run.data.tags.get("config_hash"), **run.data.metrics}
        rows.append(row)
    return pd.DataFrame(rows)


def summary_figure(table: pd.DataFrame) -> Figure:
    """Recall per condition (baseline / treatment / control ...; extra random controls left out)
    for each job of the sweep."""
    from framework.plots import plt, sns

    conditions = [c for c in table.columns if c.startswith("recall/") and not c.startswith("recall/null.")]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(table) + 2.5), 5))
    if conditions:  # none when every job failed before its baseline
        long = table.melt(id_vars="name", value_vars=conditions, var_name="condition", value_name="recall")
        long["condition"] = long["condition"].str.removeprefix("recall/")
        long["name"] = long["name"].str.replace(" ", "\n")  # one override per line under its bars
        sns.barplot(data=long.dropna(), x="name", y="recall", hue="condition", ax=ax)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    ax.set(ylim=(0, 1.05), xlabel="job", ylabel="recall", title=f"Recall per sweep job ({len(table)} jobs)")
    fig.tight_layout()
    return fig
