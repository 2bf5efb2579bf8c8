"""What a run actually cost, logged to its MLflow run when it ends (a failed run's too).

:func:`measured` wraps every tracked run (:func:`framework.tracking.runs.tracked_run`); the pipeline
names its steps with :func:`step` and hands over the loaded model with :func:`watch`, whose
forward pre-hook counts every forward pass through the top-level model (greedy decoding, detection,
interventions alike) and the token positions each one computes.

Metrics: ``cost/wall_time_s``, ``cost/model_time_s`` (inside the model's forward passes),
``cost/forward_passes``, ``cost/tokens``, ``cost/peak_rss_mb`` (the
process's peak resident memory during the run), ``cost/cuda_peak_mb`` on a GPU, and
``cost/step/<step>/wall_time_s`` per step. Tags: ``device``, ``dtype``. Artifact ``cost.json``: all
of it, with forward passes and tokens per step (kept out of the metrics, which the UI lists
alphabetically: a dozen more ``cost/`` rows would push recall down the compare view).
"""

from __future__ import annotations

import logging
import re
import resource
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import torch

_STATUS = Path("/proc/self/status")  # Linux: VmHWM, the peak resident memory
_CLEAR_REFS = Path("/proc/self/clear_refs")  # Linux: writing 5 restarts VmHWM from the current RSS
_CPU = torch.device("cpu")
log = logging.getLogger(__name__)


@dataclass
class Tally:
    wall_time_s: float = 0.0
    model_time_s: float = 0.0  # inside the model's forward passes; the rest is loading, logging, figures
    forward_passes: int = 0
    tokens: int = 0


class Meter:
    """One run's cost, counted from its creation until :meth:`close`."""

    def __init__(self) -> None:
        reset_peak(_CPU)  # several runs in one process (a sweep's jobs): each its own peak
        self.started = self.step_started = time.perf_counter()
        self.total = Tally()
        self.steps: dict[str, Tally] = {}
        self.current: Tally | None = None
        self.tags: dict[str, str] = {}
        self.cuda_device: Any = None
        self._hooks: list[Any] = []
        self._forward_started = 0.0

    def step(self, name: str) -> None:
        """End the current step (if any) and start counting ``name``."""
        self._end_step()
        self.current = self.steps.setdefault(re.sub(r"[^\w\-.:/]+", "_", name).strip("_"), Tally())

    def watch(self, model: Any) -> None:
        """Count the forward passes, tokens and seconds of ``model`` (a torch module) and note its
        device and dtype; on a GPU, start its peak-memory count afresh (and time passes as the
        host sees them: a pass's result is read before the next one starts)."""
        self.tags = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
        if model.device.type == "cuda":
            self.cuda_device = model.device
            reset_peak(model.device)
        self._hooks = [model.register_forward_pre_hook(self._count, with_kwargs=True),
                       model.register_forward_hook(self._time)]

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else args[0]
        tokens = int(inputs.shape[0] * inputs.shape[1])  # [batch, positions computed in this pass]
        for tally in filter(None, (self.total, self.current)):
            tally.forward_passes += 1
            tally.tokens += tokens
        self._forward_started = time.perf_counter()

    def _time(self, module: Any, args: tuple, output: Any) -> None:
        seconds = time.perf_counter() - self._forward_started
        for tally in filter(None, (self.total, self.current)):
            tally.model_time_s += seconds

    def _end_step(self) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.current.wall_time_s += now - self.step_started
        self.step_started = now

    def close(self) -> None:
        self._end_step()
        self.current = None
        self.total.wall_time_s = time.perf_counter() - self.started
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def metrics(self) -> dict[str, float]:
        metrics = {f"cost/{key}": float(value) for key, value in vars(self.total).items()}
        metrics["cost/peak_rss_mb"] = peak_rss_mb()
        if self.cuda_device is not None:
            metrics["cost/cuda_peak_mb"] = memory_peak(self.cuda_device) / 2**20
        return metrics | {f"cost/step/{name}/wall_time_s": tally.wall_time_s for name, tally in self.steps.items()}

    def report(self) -> dict[str, Any]:
        """Everything measured, per step in full: the run's ``cost.json``."""
        return {"metrics": self.metrics(), **self.tags, "steps": {name: vars(t) for name, t in self.steps.items()}}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (on Linux since the last :class:`Meter` began)."""
    return memory_peak(_CPU) / 2**20


def _proc_kib(field_name: str) -> int:
    """A memory field of /proc/self/status (Linux); elsewhere the lifetime peak RSS stands in."""
    try:
        return int(re.search(rf"{field_name}:\s+(\d+)", _STATUS.read_text()).group(1))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def memory_now(device: Any) -> int:
    """Bytes in use now: the process's resident memory on CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_kib("VmRSS") * 1024


def reset_peak(device: Any) -> None:
    """Start counting the peak memory of ``device`` afresh."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            log.debug("cannot reset the peak RSS; the process's lifetime peak is used")


def memory_peak(device: Any) -> int:
    """Peak bytes since :func:`reset_peak`: resident memory on CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_kib("VmHWM") * 1024


_active: Meter | None = None


@contextmanager
def measured() -> Iterator[Meter]:
    """Count the active MLflow run's cost in this block and log it at the end, also when the block
    fails (the run's own error is then the one raised)."""
    global _active
    _active = meter = Meter()
    try:
        yield meter
    except BaseException:
        with suppress(Exception):
            _log(meter)
        raise
    else:
        _log(meter)
    finally:
        _active = None


def _log(meter: Meter) -> None:
    meter.close()
    mlflow.log_metrics(meter.metrics())
    mlflow.log_dict(meter.report(), "cost.json")
    if meter.tags:
        mlflow.set_tags(meter.tags)


def step(name: str) -> None:
    """Start counting the step ``name`` of the run being measured (none: nothing to count)."""
    if _active is not None:
        _active.step(name)


def active() -> Meter | None:
    """The meter of the run being measured, if any."""
    return _active


def watch(model: Any) -> None:
    """Count ``model``'s forward passes and tokens in the run being measured (none: nothing to count)."""
    if _active is not None:
        _active.watch(model)
