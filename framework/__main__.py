"""Front door: ``python -m framework +detector=attn_mass +intervention=zero_lowfreq``.

With ``--multirun`` every job becomes a child run of one parent run per sweep (see
:mod:`framework.tracking.sweep`). Errors end in one ``error: ...`` line naming the plugin that raised and
the MLflow run it ended, never in a bare traceback (``hydra.verbose=true`` logs the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from framework.interfaces import ConfigError, RunContext
from framework.runner import stopping

log = logging.getLogger("framework")


def describe(error: Exception) -> str:
    """The user-facing account of a failed run: what went wrong, in which plugin, which run."""
    from framework.tracking.runs import failed_run_id, failing_plugin

    if isinstance(error, ConfigError):
        message = str(error)
    else:
        plugin = failing_plugin(error)
        message = f"run failed{f' in plugin {plugin}' if plugin else ''}: {type(error).__name__}: {error}"
    run_id = failed_run_id(error)
    if run_id is not None:
        message += f"\n(run {run_id} is marked FAILED in MLflow; the traceback is in its error.txt artifact)"
    return message


def exit_stopped(interrupt: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C or SIGTERM: one line, and the shell's exit status for the signal (130 / 143)."""
    code, how = stopping.exit_for(interrupt)
    print(f"{how}: the run is marked KILLED in MLflow and keeps what it logged so far", file=sys.stderr)
    sys.exit(code)


def run_or_exit(run: Callable[[dict], dict[str, float]], cfg: DictConfig) -> dict[str, float]:
    """Run a one-run command (the training experiments) on its resolved config; a failure ends
    in one ``error: ...`` line (see :func:`describe`), not a traceback; Ctrl-C or SIGTERM ends
    the run KILLED."""
    stopping.on_sigterm()
    try:
        return run(OmegaConf.to_container(cfg, resolve=True))
    except KeyboardInterrupt as interrupt:
        exit_stopped(interrupt)
    except Exception as error:
        log.debug("run failed", exc_info=True)
        sys.exit(f"error: {describe(error)}")


def print_result(context: RunContext) -> None:
    """Recall per condition (random controls summarised), the p-values and any claim verdict."""
    from framework.tracking.experiments import run_address  # where to see the run in the MLflow UI

    if not context.run_id:  # dry_run: the plan was printed, no run was made
        return
    nulls = [v.mean() for k, v in context.outcomes.items() if k.startswith("null.")]
    summary = ", ".join(f"{k}={v.mean():.3f}" for k, v in context.outcomes.items() if not k.startswith("null."))
    if nulls:
        summary += f", {len(nulls)} more random controls: mean {np.mean(nulls):.3f}"
    print(f"run {context.run_id}: recall {summary}")
    for key, value in context.metrics.items():
        if key.endswith("p_value") or key.startswith("claim/"):
            print(f"  {key} = {value:.4g}")
    print(run_address(context.run_id))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from framework.runner import pipeline
    from framework.tracking import sweep  # heavy imports after Hydra has parsed the command line
    from framework.tracking.runs import failed_run_id

    stopping.on_sigterm()  # again here: a parallel launcher runs this function in worker processes
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its INFO lines about plot axes are noise in a run's log
    config = OmegaConf.to_container(cfg, resolve=True)
    redo = bool(config.pop(sweep.REDO, False))  # a flag for the sweep, not part of the job's config
    job = sweep.current_job()
    if job is None:
        try:
            context = pipeline.run(config)
        except Exception as error:
            log.debug("run failed", exc_info=True)
            sys.exit(f"error: {describe(error)}")
        print_result(context)
        return

    # A sweep job reports a failure and returns, so that the sweep goes on with the other jobs;
    # the parent run is marked FAILED and the command exits non-zero when the sweep ends.
    if not redo and (previous := job.finished_run(config)) is not None:
        log.info("%s: skipped, it finished before as run %s", job.label, previous)
        job.report("skipped", previous)
        return
    log.info("%s: starting", job.label)
    try:
        context = pipeline.run(config, job.sweep.parent_run_id, job.run_tags(config.get("run_name")))
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the sweep stops here
        job.report("killed", failed_run_id(interrupt))
        raise
    except Exception as error:
        log.debug("run failed", exc_info=True)
        message = describe(error)
        print(f"error: {job.label}: {message}", file=sys.stderr)
        job.report("failed", failed_run_id(error), message)
        return
    job.report("finished", context.run_id)
    print_result(context)


def cli() -> None:
    """``main``, plus the end of a sweep that stopped early: Ctrl-C or SIGTERM marks the open
    parent run KILLED (each job's run has marked itself), a launcher error marks it FAILED."""
    from framework.tracking import sweep

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stopping.on_sigterm()
    try:
        main()
    except KeyboardInterrupt as interrupt:
        sweep.close(stopped="KILLED")
        exit_stopped(interrupt)
    except BaseException as error:
        sweep.close(stopped="FAILED")  # no-op unless a sweep is still open
        if isinstance(error, Exception):  # e.g. a launcher's or Hydra's own usage error
            sys.exit(f"error: {type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    cli()
