"""One composed run: load model -> samples -> baseline -> detect -> intervene + control -> tests
-> claim verdict (the conditions a run evaluates are planned in :mod:`framework.runner.conditions`).

Paired design: every condition generates on exactly the same evaluation samples; detection uses
samples drawn with a different seed. Everything is logged to one MLflow run as it finishes, so a
failure later in the run (or Ctrl-C) keeps what came before, including the per-sample outputs of
the conditions that finished. Progress is logged per step and per batch of samples.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
import pandas as pd

from framework import plots
from framework.interfaces import BASELINE, Condition, ConfigError, LoadedModel, RunContext, Sample, Task
from framework.model.attention import AttentionEdit
from framework.model.generation import NonFiniteLogits, greedy_generate
from framework.model.loading import load_model, model_info
from framework.planning import cost, planner
from framework.registry import get_registry
from framework.runner import detection, validation
from framework.runner.conditions import Plan, comparisons, is_dosed
from framework.runner.progress import Progress, labelled, weight
from framework.runner.stat_choice import choose_stats
from framework.statistics import benjamini_hochberg, holm, null_p_value
from framework.tracking import dataset_inputs
from framework.tracking.experiments import check_store
from framework.tracking.runs import tracked_run

log = logging.getLogger(__name__)


def _evaluate(
    condition: str, model: LoadedModel, task: Task, samples: list[Sample], edit: AttentionEdit | None, batch_size: int
) -> tuple[list[str], np.ndarray]:
    progress = Progress(len(samples), label=condition, work=sum(weight(s) for s in samples))
    try:
        outputs = greedy_generate(model, samples, task.max_new_tokens, edit, batch_size, progress.advance)
    except NonFiniteLogits as error:  # the run fails: NaN logits would be scored as wrong answers
        raise NonFiniteLogits(f"condition {condition!r}: {error}") from error
    outcomes = np.array([task.score(s, o) for s, o in zip(samples, outputs)])
    mlflow.log_metric(f"recall/{condition}", float(outcomes.mean()))
    log.info("[%s] recall %.3f", condition, outcomes.mean())
    return outputs, outcomes


def _test_comparisons(
    context: RunContext, stats: dict[str, Any], pairs: list[tuple[str, str]]
) -> dict[str, float]:
    """Every stat on every paired comparison; where a stat gives p-values for several
    comparisons, also their Holm (family-wise) and Benjamini-Hochberg (FDR) adjustments."""
    metrics = {}
    for key, test in stats.items():
        p_values = {}
        for treatment, reference in pairs:
            result = test.compare(context.outcomes[treatment], context.outcomes[reference])
            for metric, value in result.items():
                metrics[f"{key}/{treatment}_vs_{reference}/{metric}"] = value
            if "p_value" in result:
                p_values[f"{key}/{treatment}_vs_{reference}"] = result["p_value"]
        if len(p_values) > 1:
            for name, p_holm, p_bh in zip(p_values, holm(list(p_values.values())), benjamini_hochberg(list(p_values.values()))):
                metrics[f"{name}/p_holm"], metrics[f"{name}/p_bh"] = float(p_holm), float(p_bh)
    return metrics


def _null_metrics(context: RunContext) -> dict[str, float]:
    """The treatment's recall against the null of random controls (all of the run's random draws
    at the treatment's setting: the control and every extra ``controls`` draw)."""
    nulls = [c.label for c in context.conditions if c.role == "null"]
    if not nulls:
        return {}
    treatment = next(c.label for c in reversed(context.conditions) if c.role == "treatment")
    control = "control" + treatment.removeprefix("treatment")
    null = np.array([context.outcomes[label].mean() for label in [control, *nulls]])
    observed = float(context.outcomes[treatment].mean())
    return {"null/draws": len(null), "null/recall_mean": float(null.mean()), "null/recall_min": float(null.min()),
            "null/p_value": null_p_value(observed, null, "less")}


def _sample_table(
    samples: list[Sample], outputs: dict[str, list[str]], outcomes: dict[str, np.ndarray], conditions: list[Condition]
) -> pd.DataFrame:
    described = {c.label: c for c in conditions}
    rows = []
    for label in outcomes:
        condition = described.get(label)
        for sample, output, correct in zip(samples, outputs[label], outcomes[label]):
            meta = {k: v for k, v in sample.meta.items() if isinstance(v, (int, float, str))}
            rows.append({"sample": sample.id, "condition": label, "role": condition.role if condition else BASELINE,
                         "dose": condition.dose if condition else None,
                         "detector": condition.detector if condition else None, "answer": sample.answer,
                         "output": output, "correct": float(correct), **meta})
    return pd.DataFrame(rows)


@contextmanager
def _keep_partial_samples(
    samples: list[Sample], outputs: dict[str, list[str]], outcomes: dict[str, np.ndarray], conditions: list[Condition]
) -> Iterator[None]:
    """On a failure or Ctrl-C between conditions, log the per-sample table of the conditions
    that finished, so the run keeps them (the full table is logged once all have run)."""
    try:
        yield
    except BaseException:
        if outputs:
            mlflow.log_table(_sample_table(samples, outputs, outcomes, conditions), "samples.json")
        raise


@dataclass
class _Design:
    """What the plan says on the claim's power: its lines, its ``plan/...`` params, and whether
    the run goes ahead although its design cannot reach the verdict."""

    lines: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    underpowered: bool = False


def _design(config: Mapping[str, Any], samples: int) -> _Design:
    """The claim's comparisons at this sample size; a design that cannot reach the verdict is
    refused here, before any model work, unless ``allow_underpowered`` (or a dry run: a note)."""
    if not config.get("claim"):
        return _Design()
    from framework.analysis import power  # analysis, outside the core: imported by claim runs only

    found = power.comparisons(config, samples)
    refusal = power.check(config, found)
    if refusal and not config.get("dry_run"):
        log.warning("%s; it runs anyway (allow_underpowered=true) and is tagged underpowered", refusal)
    lines = power.report(found) + ([f"note: {refusal}"] if refusal else [])
    params = {key: value for c in found for key, value in c.params().items()}
    return _Design(lines, params, bool(refusal) and not config.get("dry_run"))


class _Steps:
    """Announces each step of a run as 'step i/n', so a long run shows how far it got."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def start(self, name: str, detail: str) -> None:
        self.done += 1
        planner.release_memory()  # what the last step freed goes back, so a long run's RSS stays what it holds
        cost.step(name)
        log.info("step %d/%d: %s (%s)", self.done, self.total, name, detail)


def run(
    config: Mapping[str, Any], parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
    loaded: LoadedModel | None = None,
) -> RunContext:
    """Execute one composed job; ``config`` is the resolved Hydra config as plain containers.

    ``parent_run_id`` and ``tags`` nest the run under a sweep's parent run (see :mod:`framework.tracking.sweep`).
    ``loaded``: the config's model, already in memory (a notebook's, reused across runs), instead
    of loading it again.
    """
    validation.validate(config)
    if not config.get("dry_run"):  # a dry run creates nothing: it plans without the store
        check_store()  # a server that does not answer, or a store that cannot be written, is refused first
    registry = get_registry()
    task = registry.create("task", config["task"])
    detector = registry.create("detector", config["detector"]) if config.get("detector") else None
    extra_detectors = {key: registry.create("detector", node) for key, node in (config.get("detectors") or {}).items()}
    stats = choose_stats(config.get("stats") or {}, task, registry)
    if config.get("claim"):  # verdicts are analysis, outside the core: imported only by runs that log one
        from framework.analysis.claims import check_claim

        check_claim(config)
    if detector is None and (config.get("intervention") or extra_detectors):
        needs = (f"intervention {config['intervention']['name']!r} needs heads to act on" if config.get("intervention")
                 else "extra detectors are compared with a main detector")
        raise ConfigError(f"{needs}: add +detector=<name> (available: {', '.join(registry.names('detector'))})")
    if config.get("intervention") is None and (is_dosed(config) or config.get("controls") or config.get("conditions")
                                              or config.get("per_detector")):
        raise ConfigError("dose, controls, conditions and per_detector act on an intervention: add +intervention=<name> "
                          f"(available: {', '.join(registry.names('intervention'))})")
    if config["detect_seed"] == config["seed"]:
        raise ConfigError("detect_seed must differ from seed: detection and evaluation need different samples")
    info = model_info(config["model"])
    for plugin in (detector, *extra_detectors.values()):
        if plugin is not None:
            plugin.validate(info)
    plan = Plan.from_config(config, registry, info) if config.get("intervention") else None
    planned = planner.plan_samples(config, registry, task, detector, extra_detectors, plan.n_conditions if plan else 0)
    if plan is not None:  # e.g. a streaming window as long as the prompts, refused before any model work
        plan.check_lengths([len(s.input_ids) for s in planned.eval])
    for plugin in filter(None, (detector, *extra_detectors.values())):
        if not plugin.own_samples:
            plugin.check_samples(planned.detect)
    design = _design(config, len(planned.eval))
    estimate = planner.estimate_run(config, registry, task, detector, extra_detectors, plan.n_conditions if plan else 0,
                                    planned, design.lines)
    if config.get("dry_run"):
        return RunContext(config=dict(config), run_id="")  # the plan is printed; no run is created

    steps = _Steps(1 + (detector is not None) + len(extra_detectors) + (plan.n_conditions if plan else 0))
    with tracked_run(config, info, config["experiment"], config.get("run_name"), parent_run_id, tags) as active:
        context = RunContext(config=dict(config), run_id=active.info.run_id)
        mlflow.set_tags({"task": task.name, "detector": getattr(detector, "name", "none"),
                         "intervention": plan.intervention.name if plan else "none",
                         **({"claim": config["claim"]} if config.get("claim") else {}),
                         **({"underpowered": "true"} if design.underpowered else {})})
        planner.log_estimate(estimate)
        if design.params:
            mlflow.log_params(design.params)
        cost.step("load_model")
        context.model = model = loaded if loaded is not None else load_model(config["model"])
        planner.rescale(estimate, model.model)  # before the meter counts passes: the reference pass is not the run's
        cost.watch(model.model)
        registry.manager.hook.run_started(context=context)

        samples = estimate.eval_samples  # built by the planner from the same tokenizer
        dataset_inputs.log_samples(samples, config["task"], "eval", config["seed"])
        mlflow.log_metric("samples", len(samples))
        outputs: dict[str, list[str]] = {}
        batch_size = config["batch_size"]
        with _keep_partial_samples(samples, outputs, context.outcomes, context.conditions):
            steps.start(BASELINE, f"{len(samples)} samples")
            outputs[BASELINE], context.outcomes[BASELINE] = _evaluate(BASELINE, model, task, samples, None, batch_size)

            if detector is not None:
                detect_samples = estimate.detect_samples  # empty when every detector brings its own
                if detect_samples:
                    dataset_inputs.log_samples(detect_samples, config["task"], "detect", config["detect_seed"])
                steps.start("detection", f"{detector.name} on {detection.samples_detail(detector, detect_samples)}")
                with labelled("detection"):
                    context.head_scores = detector.detect(model, [] if detector.own_samples else detect_samples)
                detection.log_head_scores(context.head_scores, f"detector/{detector.name}", model.info.n_kv_heads)
                mlflow.log_metrics({"heads/selected": len(context.head_scores.selected),
                                    "heads/selected_fraction": len(context.head_scores.selected) / context.head_scores.scores.size})
                log.info("[detection] %d heads selected", len(context.head_scores.selected))
                for key, other in extra_detectors.items():
                    steps.start(f"detection ({key})", f"{other.name} on {detection.samples_detail(other, detect_samples)}")
                    with labelled(f"detection ({key})"):
                        context.detector_scores[key] = result = other.detect(model, [] if other.own_samples else detect_samples)
                    detection.log_head_scores(result, f"detectors/{key}", model.info.n_kv_heads)
                    mlflow.log_metrics({f"detectors/{key}/{name}": value
                                        for name, value in detection.detector_agreement(context.head_scores, result).items()})
                if context.detector_scores:
                    detection.log_agreement({detector.name: context.head_scores, **context.detector_scores})
                detection.detect_across_lengths(estimate.detect_samples_by_length, {"main": detector, **extra_detectors}, model)
                if plan is not None and not context.head_scores.selected:
                    raise ConfigError(f"detector {detector.name!r} selected no heads: "
                                      f"{detector.why_no_heads(context.head_scores)}")

            if plan is not None:
                with labelled("prepare"):
                    plan.prepare(model, detect_samples)
                context.conditions.extend(plan.conditions(model, context.head_scores, config["control_seed"],
                                                          context.detector_scores))
                mlflow.log_dict({c.label: c.describe() for c in context.conditions}, "intervention/edits.json")
                planner.reprice_conditions(estimate, model.model, context.conditions)  # biased edits cost more
                for condition in context.conditions:
                    steps.start(condition.label, f"{condition.intervention} on {len(condition.edit.heads)} heads, "
                                f"{len(samples)} samples")
                    outputs[condition.label], context.outcomes[condition.label] = _evaluate(
                        condition.label, model, task, samples, condition.edit, batch_size)
                    own = plan.condition_metrics(model, [condition])  # e.g. kv/fraction_kept/<label>, kv/bytes/<label>
                    context.metrics.update(own)
                    mlflow.log_metrics(own)

        cost.step("analysis")
        table = _sample_table(samples, outputs, context.outcomes, context.conditions)
        mlflow.log_table(table, "samples.json")
        if "depth" in table:
            shown = table[table["role"] != "null"]
            mlflow.log_figure(plots.recall_by_condition(shown, "depth"), "recall_by_depth.png")
            if table.get("context_length", pd.Series(dtype=float)).nunique() > 1:
                mlflow.log_figure(plots.recall_by_length_and_depth(shown), "recall_by_length_depth.png")
        if plan is not None and plan.doses:
            mlflow.log_figure(plots.recall_by_dose(table, plan.dose_label), "recall_by_dose.png")
        if any(key.startswith("kv/fraction_kept/") for key in context.metrics):  # analysis: imported only when needed
            from framework.analysis import kv_budget

            budget, budget_figure = kv_budget.analyse(table, context.metrics, getattr(detector, "name", ""))
            context.metrics.update(budget)
            mlflow.log_figure(budget_figure, "kv_budget.png")

        context.metrics.update(_test_comparisons(context, stats, comparisons(context.conditions)))
        context.metrics.update(_null_metrics(context))
        if plan is not None and plan.per_detector:
            causal = detection.causal_table(context, detector.name)
            mlflow.log_table(causal, "detectors/causal.json")
            log.info("causal check per detector:\n%s", causal.to_string(index=False))
        if config.get("claim"):
            from framework.analysis.claims import CLAIMS

            claim_metrics, figures = CLAIMS[config["claim"]](context, table)
            context.metrics.update(claim_metrics)
            for name, figure in figures.items():
                mlflow.log_figure(figure, f"claim/{name}")
        for extra in registry.manager.hook.run_finished(context=context):
            context.metrics.update(extra or {})
        if context.metrics:
            mlflow.log_metrics(context.metrics)
        planner.log_accuracy(estimate)
    return context
