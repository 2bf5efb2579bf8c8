"""One composed run: load model -> samples -> baseline -> detect -> intervene + control -> tests.

Paired design: every condition generates on exactly the same evaluation samples; detection uses
samples drawn with a different seed. Everything is logged to one MLflow run as it finishes, so a
failure later in the run (or Ctrl-C) keeps what came before, including the per-sample outputs of
the conditions that finished. Progress is logged per step and per batch of samples.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
import pandas as pd

from framework import plots, tracking
from framework.attention import AttentionEdit
from framework.generation import greedy_generate
from framework.interfaces import ConfigError, HeadScores, LoadedModel, RunContext, Sample, Task
from framework.models import load_model, model_info
from framework.registry import get_registry

log = logging.getLogger(__name__)

# Paired comparisons tested on every run with an intervention: (treatment, reference)
COMPARISONS = [("treatment", "baseline"), ("control", "baseline"), ("treatment", "control")]


def _evaluate(
    condition: str, model: LoadedModel, task: Task, samples: list[Sample], edit: AttentionEdit | None, batch_size: int
) -> tuple[list[str], np.ndarray]:
    started, done = time.perf_counter(), 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        elapsed = time.perf_counter() - started
        left = elapsed / done * (len(samples) - done)
        log.info("[%s] %d/%d samples (%.0f s, ~%.0f s left)", condition, done, len(samples), elapsed, left)

    outputs = greedy_generate(model, samples, task.max_new_tokens, edit, batch_size, progress)
    outcomes = np.array([task.score(s, o) for s, o in zip(samples, outputs)])
    mlflow.log_metric(f"recall/{condition}", float(outcomes.mean()))
    log.info("[%s] recall %.3f", condition, outcomes.mean())
    return outputs, outcomes


def _log_head_scores(result: HeadScores) -> None:
    prefix = f"detector/{result.detector}"
    mlflow.log_dict({"shape": list(result.scores.shape), "scores": result.scores.tolist()}, f"{prefix}/scores.json")
    mlflow.log_dict({"selected_heads": [list(h) for h in result.selected]}, f"{prefix}/selected_heads.json")
    mlflow.log_figure(plots.head_score_heatmap(result.scores, result.selected, result.detector), f"{prefix}/heatmap.png")
    mlflow.log_metric("heads/selected", len(result.selected))
    mlflow.log_metric("heads/selected_fraction", len(result.selected) / result.scores.size)


def _sample_table(samples: list[Sample], outputs: dict[str, list[str]], outcomes: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for condition in outcomes:
        for sample, output, correct in zip(samples, outputs[condition], outcomes[condition]):
            meta = {k: v for k, v in sample.meta.items() if isinstance(v, (int, float, str))}
            rows.append({"sample": sample.id, "condition": condition, "answer": sample.answer,
                         "output": output, "correct": float(correct), **meta})
    return pd.DataFrame(rows)


@contextmanager
def _keep_partial_samples(
    samples: list[Sample], outputs: dict[str, list[str]], outcomes: dict[str, np.ndarray]
) -> Iterator[None]:
    """On a failure or Ctrl-C between conditions, log the per-sample table of the conditions
    that finished, so the run keeps them (the full table is logged once all have run)."""
    try:
        yield
    except BaseException:
        if outputs:
            mlflow.log_table(_sample_table(samples, outputs, outcomes), "samples.json")
        raise


class _Steps:
    """Announces each step of a run as 'step i/n', so a long run shows how far it got."""

    def __init__(self, names: list[str]):
        self.names = names

    def start(self, name: str, detail: str) -> None:
        log.info("step %d/%d: %s (%s)", self.names.index(name) + 1, len(self.names), name, detail)


def run(
    config: Mapping[str, Any], parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> RunContext:
    """Execute one composed job; ``config`` is the resolved Hydra config as plain containers.

    ``parent_run_id`` and ``tags`` nest the run under a sweep's parent run (see :mod:`framework.sweep`).
    """
    registry = get_registry()
    task = registry.create("task", config["task"])
    detector = registry.create("detector", config["detector"]) if config.get("detector") else None
    intervention = registry.create("intervention", config["intervention"]) if config.get("intervention") else None
    stats = {key: registry.create("stats", node) for key, node in (config.get("stats") or {}).items()}
    if intervention is not None and detector is None:
        raise ConfigError(
            f"intervention {intervention.name!r} needs heads to act on: add +detector=<name> "
            f"(available: {', '.join(registry.names('detector'))})"
        )
    if config["detect_seed"] == config["seed"]:
        raise ConfigError("detect_seed must differ from seed: detection and evaluation need different samples")
    info = model_info(config["model"])
    for plugin in (detector, intervention):
        if plugin is not None:
            plugin.validate(info)

    steps = _Steps(["baseline"] + (["detection"] if detector else []) + (["treatment", "control"] if intervention else []))
    with tracking.tracked_run(config, info, config["experiment"], config.get("run_name"), parent_run_id, tags) as active:
        context = RunContext(config=dict(config), run_id=active.info.run_id)
        mlflow.set_tags({"task": task.name, "detector": getattr(detector, "name", "none"),
                         "intervention": getattr(intervention, "name", "none")})
        context.model = model = load_model(config["model"])
        registry.manager.hook.run_started(context=context)

        samples = task.build_samples(model.tokenizer, "eval", config["seed"])
        mlflow.log_metric("samples", len(samples))
        outputs: dict[str, list[str]] = {}
        batch_size = config["batch_size"]
        with _keep_partial_samples(samples, outputs, context.outcomes):
            steps.start("baseline", f"{len(samples)} samples")
            outputs["baseline"], context.outcomes["baseline"] = _evaluate("baseline", model, task, samples, None, batch_size)

            if detector is not None:
                detect_samples = task.build_samples(model.tokenizer, "detect", config["detect_seed"])
                steps.start("detection", f"{detector.name} on {len(detect_samples)} samples")
                context.head_scores = detector.detect(model, detect_samples)
                _log_head_scores(context.head_scores)
                log.info("[detection] %d heads selected", len(context.head_scores.selected))
                if intervention is not None and not context.head_scores.selected:
                    raise ConfigError(
                        f"detector {detector.name!r} selected no heads (max score "
                        f"{context.head_scores.scores.max():.3f}); lower its threshold or set top_k"
                    )

            if intervention is not None:
                heads = context.head_scores.selected
                intervention.prepare(model, detect_samples)
                edits = {
                    "treatment": intervention.treatment(model, heads),
                    "control": intervention.control(model, heads, np.random.default_rng(config["control_seed"])),
                }
                mlflow.log_dict({name: edit.describe() for name, edit in edits.items()}, "intervention/edits.json")
                for name, edit in edits.items():
                    steps.start(name, f"{intervention.name} on {len(heads)} heads, {len(samples)} samples")
                    outputs[name], context.outcomes[name] = _evaluate(name, model, task, samples, edit, batch_size)

        table = _sample_table(samples, outputs, context.outcomes)
        mlflow.log_table(table, "samples.json")
        if "depth" in table:
            mlflow.log_figure(plots.recall_by_condition(table, "depth"), "recall_by_depth.png")

        for treatment, reference in COMPARISONS:
            if treatment not in context.outcomes:
                continue
            for key, test in stats.items():
                result = test.compare(context.outcomes[treatment], context.outcomes[reference])
                for metric, value in result.items():
                    context.metrics[f"{key}/{treatment}_vs_{reference}/{metric}"] = value
        for extra in registry.manager.hook.run_finished(context=context):
            context.metrics.update(extra or {})
        if context.metrics:
            mlflow.log_metrics(context.metrics)
    return context
