"""The conditions one run evaluates, planned from its config, and the comparisons between them.

Every condition is an :class:`AttentionEdit` evaluated on the same samples as the baseline
(paired design). A run with an intervention has, by config:

* ``treatment`` and ``control``: the intervention on the detected heads, and its matched random
  control (``control_seed``);
* ``dose: {param, values, of_head_dim}``: instead of one treatment/control pair, one pair per
  dose, labelled ``treatment.<param>_<value>`` / ``control.<param>_<value>``. ``param`` is a
  parameter of the intervention (e.g. ``n_dims``), or ``heads``: the intervention on the
  ``value`` highest-scoring heads. Values may be fractional (``intervention.factor`` 0.25, 0.5)
  unless the parameter is an int (``n_dims``, ``heads``). With ``of_head_dim: true`` the values
  are fractions of the model's head_dim, turned into whole dims (one config fits 64- and 128-dim
  heads);
* ``controls: K``: K more random controls, seeds ``[control_seed, 1..K]`` (for head masks:
  random head sets matched per layer), whose recalls form the null distribution the
  treatment's recall is tested against (seed 000's layer-clustered permutation);
* ``conditions: {label: intervention}``: further interventions on the same heads (the largest
  dose's, in a dose run), each evaluated as the condition ``label`` (e.g. Chiang & Yogatama's
  first/last-n dims grid); an intervention may pick other heads from the scores
  (:meth:`Intervention.select`, e.g. ``streaming_heads keep=lowest``: as many of the lowest-scoring).
* ``per_detector: true``: the intervention's treatment and matched control on each extra
  detector's selected heads too (``detectors: {key: ...}``), labelled ``treatment.<key>`` /
  ``control.<key>``: a causal check of every detector in one run (``detector_comparison``). With
  a dose, each extra detector gets the whole dose series on its own scores
  (``treatment.<key>.<param>_<value>``), e.g. a KV budget curve per detector (``kv_compression``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, get_args, get_type_hints

import numpy as np

from framework.interfaces import BASELINE, Condition, ConfigError, HeadScores, Intervention, LoadedModel, ModelInfo, Sample
from framework.model.attention import Head
from framework.model.heads import select_heads
from framework.registry import Registry

HEADS = "heads"  # the dose parameter that counts heads rather than setting an intervention parameter


@dataclass
class Plan:
    """A run's interventions, built and validated before the model loads."""

    intervention: Intervention
    doses: list[float]
    dose_param: str | None
    controls: int
    extras: dict[str, Intervention]
    per_detector: list[str] = field(default_factory=list)  # extra detectors' keys whose heads get a pair too

    @classmethod
    def from_config(cls, config: Mapping[str, Any], registry: Registry, info: ModelInfo) -> Plan:
        intervention = registry.create("intervention", config["intervention"])
        intervention.validate(info)
        dose = config.get("dose") or {}
        dose_param = dose.get("param")
        doses = _dose_values(dose, info, intervention) if is_dosed(config) else []
        for value in doses:
            _at_dose(intervention, dose_param, value, info)
        controls = int(config.get("controls") or 0)
        if controls < 0:
            raise ConfigError(f"controls={controls} is impossible: the number of extra random controls is >= 0")
        extras = {}
        for label, node in (config.get("conditions") or {}).items():
            if label in (BASELINE, "treatment", "control") or label.startswith(("treatment.", "control.", "null.")):
                raise ConfigError(f"condition label {label!r} is reserved; choose another")
            extras[label] = registry.create("intervention", node)
            extras[label].validate(info)
        per_detector = list(config.get("detectors") or {}) if config.get("per_detector") else []
        for key in per_detector:
            if any(label.split(".")[:2] in (["treatment", key], ["control", key]) for label in extras) or "." in key:
                raise ConfigError(f"detector key {key!r} clashes with a condition label (or holds a '.'); rename one")
        plan = cls(intervention, doses, dose_param, controls, extras, per_detector)
        targets = (config.get("task") or {}).get("context_lengths")
        if targets:  # the task's prompt lengths, checked again on the built samples: refused before any model work
            plan.check_lengths([int(length) for length in targets])
        return plan

    @property
    def dose_label(self) -> str:
        """What a dose is, for plot axes: ``zero_lowfreq: n_dims``, ``heads (top-k by score)``."""
        if self.dose_param == HEADS:
            return "heads (top-k by detector score)"
        return f"{self.intervention.name}: {self.dose_param}"

    @property
    def n_conditions(self) -> int:
        return 2 * max(1, len(self.doses)) * (1 + len(self.per_detector)) + len(self.extras) + self.controls

    def check_lengths(self, lengths: list[int]) -> None:
        """Every intervention learns the evaluation prompt lengths (and may refuse them)."""
        for intervention in (self.intervention, *self.extras.values()):
            intervention.check_lengths(lengths)

    def prepare(self, model: LoadedModel, samples: list[Sample]) -> None:
        for intervention in (self.intervention, *self.extras.values()):
            intervention.prepare(model, samples)

    def condition_metrics(self, model: LoadedModel, conditions: list[Condition]) -> dict[str, float]:
        """Each condition's metrics from the intervention that built it, as ``<metric>/<label>``."""
        metrics = {}
        for condition in conditions:
            intervention = self.extras.get(condition.label, self.intervention)
            for name, value in intervention.condition_metrics(model, condition.edit).items():
                metrics[f"{name}/{condition.label}"] = float(value)
        return metrics

    def conditions(self, model: LoadedModel, scores: HeadScores, control_seed: int,
                   detector_scores: Mapping[str, HeadScores] | None = None) -> list[Condition]:
        """Every condition of the run, in evaluation order (nulls last); ``detector_scores``: the
        extra detectors' results, by key, for ``per_detector``."""
        planned = self._pairs(model, scores, control_seed, "")
        for key in self.per_detector:
            other = (detector_scores or {})[key]
            if not other.selected:
                raise ConfigError(f"per_detector: detector {key!r} selected no heads; lower its threshold or set its top_k")
            planned += self._pairs(model, other, control_seed, key)
        if self.doses:
            reference, heads = _at_dose(self.intervention, self.dose_param, self.doses[-1], model.info, scores)
        else:
            reference, heads = self.intervention, scores.selected
        acted = reference.select(scores, heads)
        name = self.intervention.name
        planned += [Condition(label, "extra", extra.name, extra.treatment(model, extra.select(scores, heads)))
                    for label, extra in self.extras.items()]
        planned += [
            Condition(f"null.{i}", "null", name, reference.control(model, acted, np.random.default_rng([control_seed, i])))
            for i in range(1, self.controls + 1)
        ]
        return planned

    def _pairs(self, model: LoadedModel, scores: HeadScores, control_seed: int, key: str) -> list[Condition]:
        """The treatment and matched control on one detector's heads (``key``: an extra
        detector's, "" for the main one), once or at every dose."""
        name, tag = self.intervention.name, f".{key}" if key else ""
        doses: list[float | None] = list(self.doses) or [None]
        pairs = []
        for value in doses:
            if value is None:
                variant, heads, suffix = self.intervention, scores.selected, ""
            else:
                variant, heads = _at_dose(self.intervention, self.dose_param, value, model.info, scores)
                suffix = f".{self.dose_param}_{dose_text(value)}"
            heads = variant.select(scores, heads)
            pairs += [
                Condition(f"treatment{tag}{suffix}", "treatment", name, variant.treatment(model, heads), value, key or None),
                Condition(f"control{tag}{suffix}", "control", name,
                          variant.control(model, heads, np.random.default_rng(control_seed)), value, key or None),
            ]
        return pairs


def is_dosed(config: Mapping[str, Any]) -> bool:
    dose = config.get("dose") or {}
    return bool(dose.get("param") or dose.get("values"))


def comparisons(conditions: list[Condition]) -> list[tuple[str, str]]:
    """Paired comparisons (condition, reference) tested with every stat: each treatment, control
    and extra condition against the baseline, and each treatment against its own control."""
    pairs = [(c.label, BASELINE) for c in conditions if c.role in ("treatment", "control", "extra")]
    pairs += [(c.label, "control" + c.label.removeprefix("treatment")) for c in conditions if c.role == "treatment"]
    return pairs


def _dose_values(dose: Mapping[str, Any], info: ModelInfo, intervention: Intervention) -> list[float]:
    """The dose values, sorted: whole numbers (as ints) for head counts and integer parameters,
    any numbers for the others (e.g. a scale factor of 0.5)."""
    param = dose.get("param")
    if not param or not dose.get("values"):
        raise ConfigError("dose needs a param (an intervention parameter, or 'heads') and a list of values")
    values = list(dose["values"])
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise ConfigError(f"dose values {values} must be numbers")
    if dose.get("of_head_dim"):
        if not all(0 < v <= 1 for v in values):
            raise ConfigError(f"dose values {values} must be fractions in (0, 1] of head_dim with of_head_dim: true")
        values = [int(round(v * info.head_dim)) for v in values]
    if param == HEADS and any(int(v) != v or v < 1 for v in values):
        raise ConfigError(f"dose values {values} must be positive whole numbers: dose.param=heads counts heads")
    if param != HEADS and _takes_whole_numbers(intervention, param) and any(int(v) != v for v in values):
        raise ConfigError(f"dose values {values} must be whole numbers: {intervention.name} parameter "
                          f"{param!r} is an int (fractions are for float parameters, or with dose.of_head_dim=true)")
    whole = param == HEADS or _takes_whole_numbers(intervention, param)
    return sorted({int(v) if whole else float(v) for v in values})


def _takes_whole_numbers(intervention: Intervention, param: str) -> bool:
    """Whether the intervention's constructor types ``param`` as int (and not float); without a
    type hint, whether its current value is an int."""
    try:
        hint = get_type_hints(type(intervention).__init__).get(param)
    except (NameError, TypeError):
        hint = None
    if hint is None:
        value = getattr(intervention, param, None)
        return isinstance(value, int) and not isinstance(value, bool)
    types = set(get_args(hint)) or {hint}
    return int in types and float not in types


def dose_text(value: float) -> str:
    """A dose as labels show it: ``8``, ``0.5``."""
    return f"{value:g}"


def _at_dose(
    intervention: Intervention, param: str, value: float, info: ModelInfo, scores: HeadScores | None = None
) -> tuple[Intervention, list[Head]]:
    """The intervention and heads at one dose. Without ``scores`` (before detection) only checks."""
    if param == HEADS:
        if value > info.n_heads_total:
            raise ConfigError(f"dose heads={value} is impossible: {info.name} has {info.n_heads_total} heads")
        return intervention, select_heads(scores.scores, top_k=int(value)) if scores is not None else []
    if not hasattr(intervention, param):
        raise ConfigError(
            f"dose param {param!r} is not a parameter of intervention {intervention.name!r}; "
            f"use one of its config keys or {HEADS!r}"
        )
    variant = copy.copy(intervention)  # keeps what prepare() computed; only the dosed parameter differs
    setattr(variant, param, value)
    variant.validate(info)
    return variant, scores.selected if scores is not None else []
