"""Progress lines for long steps: ``[detection] 4/10 samples (12 s, ~18 s left)``.

One mechanism for evaluation (batches of samples) and for every detector (samples, layers):
:class:`Progress` counts what is done and logs elapsed and estimated remaining time;
:func:`track` wraps an iterable. The time left is the elapsed time scaled by the *work* left, not
the count: samples weigh their prompt tokens, so that on a length grid the 8K samples still to
come are not priced like the 1K samples done. The label of a detector's lines is the step the pipeline is in
(``detection``, ``detection (<key>)`` for a second detector, ``prepare``), set with
:func:`labelled`, so a detector never names itself.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, Sized, TypeVar

log = logging.getLogger("framework.runner.progress")
T = TypeVar("T")
_label: ContextVar[str] = ContextVar("retrieval_heads_progress_label", default="detection")


@contextmanager
def labelled(label: str) -> Iterator[None]:
    """Progress lines inside the block that give no label of their own are labelled ``label``."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


class Progress:
    """Counts ``total`` units (together ``work``, by default one each) and logs a line per :meth:`advance`."""

    def __init__(self, total: int, unit: str = "samples", label: str | None = None, work: float | None = None):
        self.total, self.unit, self.label = total, unit, label or _label.get()
        self.work = float(work if work is not None else total)
        self.done, self.work_done, self.started = 0, 0.0, time.perf_counter()

    def advance(self, n: int = 1, work: float | None = None) -> None:
        """``n`` more units done, weighing ``work`` together (default: ``n``)."""
        self.done += n
        self.work_done += n if work is None else work
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.work_done * max(0.0, self.work - self.work_done) if self.work_done else float("nan")
        log.info("[%s] %d/%d %s (%.0f s, ~%.0f s left)", self.label, self.done, self.total, self.unit, elapsed, left)


def weight(item: object) -> float:
    """The work an item stands for: a sample's prompt tokens, anything else 1."""
    ids = getattr(item, "input_ids", None)
    return float(len(ids)) if ids else 1.0


def track(items: Iterable[T], unit: str = "samples", label: str | None = None) -> Iterator[T]:
    """Yield ``items``, logging a progress line after each one is processed."""
    items = list(items) if not isinstance(items, Sized) else items
    progress = Progress(len(items), unit, label, work=sum(weight(item) for item in items))
    for item in items:
        yield item
        progress.advance(1, weight(item))
