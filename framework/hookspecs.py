"""The plugin contract: every hook a plugin may implement.

A plugin is any module or object, registered through the ``retrieval_heads`` entry-point group,
that implements some of these hooks with ``@framework.hookimpl``. Built-in plugins under
``plugins/`` use exactly the same route as third-party packages.

The four registration hooks follow the ``register(...)`` callback pattern: the framework passes
a callable, the plugin calls it once per plugin class it provides. The class is then constructed
with the keyword arguments of its Hydra config node (all keys except ``name``). The interfaces
those classes implement are in :mod:`framework.interfaces`.

The lifecycle hooks let a plugin observe a run and add metrics or artifacts of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from framework.interfaces import Detector, Intervention, RunContext, StatTest, Task

PROJECT = "retrieval_heads"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a plugin module's functions as implementations of the hooks below (``@hookimpl``)."""


@hookspec
def register_detectors(register: Callable[[str, type[Detector]], None]) -> None:
    """Register head detectors: ``register("name", DetectorClass)``.

    A detector scores every (layer, head) of a model and selects the heads it calls
    retrieval heads; ``name`` is the option name in the ``detector`` config group.
    """


@hookspec
def register_interventions(register: Callable[[str, type[Intervention]], None]) -> None:
    """Register interventions: ``register("name", InterventionClass)``.

    An intervention turns selected heads into an attention edit (masked heads, zeroed query
    dimensions) and also builds its matched random control; ``name`` is the option name in the
    ``intervention`` config group.
    """


@hookspec
def register_tasks(register: Callable[[str, type[Task]], None]) -> None:
    """Register tasks: ``register("name", TaskClass)``.

    A task builds tokenised, seeded samples and scores generated answers; ``name`` is the
    option name in the ``task`` config group.
    """


@hookspec
def register_stats(register: Callable[[str, type[StatTest]], None]) -> None:
    """Register statistical tests: ``register("name", StatTestClass)``.

    A statistical test compares two conditions' per-sample outcomes on the same samples;
    ``name`` is the option name in the ``stats`` config group.
    """


@hookspec
def run_started(context: RunContext) -> None:
    """Called once the MLflow run is open and the model is loaded, before any condition runs."""


@hookspec
def run_finished(context: RunContext) -> dict[str, float] | None:
    """Called after all conditions and tests ran, while the MLflow run is still open.

    Return extra metrics to log (name -> value), or None. Plugins may also log artifacts
    themselves through ``mlflow`` since the run is active.
    """
