"""Which statistical tests a run uses, given what its task's scores are.

A task declares its per-sample scores with ``Task.score_kind`` (``binary`` 0/1, or ``continuous``
in [0, 1]); a test declares the kinds it is valid for with ``StatTest.accepts``. The ``stats``
config is a list of tests; its default, ``auto`` (conf/stats/auto.yaml), stands for the tests
listed there for the task's score kind (binary: McNemar's exact test and the paired permutation
test; continuous: permutation, bootstrap CI and Wilcoxon signed-rank), each with its default
parameters. A list that names tests (``stats=[permutation,wilcoxon]``) wins over ``auto``; a named
test that does not accept the task's scores is refused before any model work.
"""

from __future__ import annotations

from typing import Any, Mapping

from framework.interfaces import SCORE_KINDS, ConfigError, StatTest, Task
from framework.registry import Registry

AUTO = "auto"  # the stats option that follows the task's score kind


def choose_stats(nodes: Mapping[str, Mapping[str, Any]], task: Task, registry: Registry) -> dict[str, StatTest]:
    """The run's tests by config key, ``auto`` expanded for ``task``; each checked against the
    task's score kind."""
    kind = task.score_kind
    if kind not in SCORE_KINDS:
        raise ConfigError(f"task {task.name!r} declares score_kind={kind!r}; a task's scores are one of {SCORE_KINDS}")
    chosen: dict[str, StatTest] = {}
    for key, node in nodes.items():
        if node.get("name") == AUTO:
            names = node.get(kind) or []
            chosen.update({name: registry.create("stats", {"name": name}) for name in names if name not in nodes})
        else:
            chosen[key] = registry.create("stats", node)
    for key, test in chosen.items():
        if kind not in test.accepts:
            fitting = [n for n in registry.names("stats") if kind in registry.get("stats", n).cls.accepts]
            raise ConfigError(
                f"stats test {test.name!r} accepts only {' or '.join(sorted(test.accepts))} scores, but task "
                f"{task.name!r} scores each sample as {kind} (Task.score_kind); tests that fit {kind} scores: "
                f"{', '.join(fitting) or '(none installed)'}, e.g. stats=[{','.join(fitting[:2])}]"
            )
    return chosen
