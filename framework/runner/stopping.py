"""Runs stopped from outside: Ctrl-C (SIGINT) and SIGTERM, which Slurm sends at a job's time
limit or on preemption, and ``kill`` and ``timeout`` send by default.

Python turns only SIGINT into an exception (KeyboardInterrupt). :func:`on_sigterm` makes SIGTERM
raise :class:`Terminated`, a KeyboardInterrupt, so that every place that ends a run KILLED on
Ctrl-C and keeps what it logged (:func:`framework.tracking.runs.tracked_run`, the pipeline's partial
per-sample table, a sweep's parent run) does the same on SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Only the first SIGTERM interrupts: a second one (Slurm may repeat it) must not cut short
    # the marking of the run; SIGKILL still ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("SIGTERM")


def on_sigterm() -> None:
    """Raise :class:`Terminated` in the main thread when SIGTERM arrives (a no-op elsewhere:
    only the main thread may set signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def exit_for(interrupt: KeyboardInterrupt) -> tuple[int, str]:
    """The exit status (128 + the signal's number, as a shell reports it) and the one line that
    says how the command stopped."""
    if isinstance(interrupt, Terminated):
        return 128 + signal.SIGTERM, "terminated (SIGTERM)"
    return 128 + signal.SIGINT, "interrupted"
