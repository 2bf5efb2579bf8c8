"""Typed interfaces of the four plugin kinds and the data they exchange.

A third-party plugin subclasses one of :class:`Detector`, :class:`Intervention`, :class:`Task`
or :class:`StatTest`, takes its Hydra config keys as constructor keyword arguments, and is
registered through the hooks in :mod:`framework.hookspecs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from framework.model.attention import AttentionEdit, Head

Split = Literal["detect", "eval"]
"""Which samples a task builds: ``detect`` for head detection, ``eval`` for the conditions' evaluation
(built with different seeds, so that heads are never scored on the samples they are judged by)."""
ScoreKind = Literal["binary", "continuous"]
SCORE_KINDS: tuple[str, ...] = ("binary", "continuous")
"""What a task's per-sample scores can be (:attr:`Task.score_kind`): 0/1, or anywhere in [0, 1]."""


class ConfigError(ValueError):
    """Impossible or inconsistent configuration, reported to the user before any model work."""


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts read from the model config alone (cheap: no weights needed)."""

    name: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float | None

    @property
    def n_heads_total(self) -> int:
        """Query heads in all layers (the size of a detector's score matrix)."""
        return self.n_layers * self.n_heads


@dataclass
class LoadedModel:
    """A causal LM ready for instrumented runs, with what plugins need to know about it."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    info: ModelInfo
    inv_freq: np.ndarray  # [head_dim // 2], the model's own (scaled) RoPE frequencies

    @property
    def device(self) -> Any:
        """The torch device the model's weights are on (inputs must go there)."""
        return self.model.device


@dataclass
class Sample:
    """One tokenised task sample; every condition of a run sees the same list of samples.

    Token spans are half-open ``(start, end)`` indices into ``input_ids``.
    """

    id: str
    input_ids: list[int]  # the full prompt, ready for greedy generation
    answer: str  # the gold answer, scored against the generated text
    answer_ids: list[int]  # gold answer tokens, appended for teacher-forced detection
    context_span: tuple[int, int]  # the context (instruction + haystack), BOS excluded
    query_start: int  # first token of the question; rows from here on read the context
    needle_span: tuple[int, int]  # where the retrievable information sits
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. context length, depth, seed
    # where the gold answer's tokens sit in input_ids (inside the needle), for detectors that
    # check what the model copies (Wu et al.'s retrieval score); None when a task cannot say
    answer_span: tuple[int, int] | None = None


@dataclass
class HeadScores:
    """A detector's result: a score per head and the heads it selects."""

    detector: str
    scores: np.ndarray  # [n_layers, n_heads]
    selected: list[Head]
    extra: dict[str, Any] = field(default_factory=dict)


BASELINE = "baseline"  # the label of the unedited condition that every run evaluates first


@dataclass
class Condition:
    """One evaluated edit: ``role`` is treatment, control, null (an extra random control) or extra;
    ``detector``: the key of the extra detector whose heads it acts on (``per_detector``), None
    for the run's main detector."""

    label: str
    role: str
    intervention: str
    edit: AttentionEdit
    dose: float | None = None
    detector: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready: role, intervention, dose, detector and what the edit changes (``intervention/edits.json``)."""
        return {"role": self.role, "intervention": self.intervention, "dose": self.dose, "detector": self.detector,
                **self.edit.describe()}


@dataclass
class RunContext:
    """What lifecycle hooks see of a run."""

    config: dict[str, Any]
    run_id: str
    model: LoadedModel | None = None
    head_scores: HeadScores | None = None
    detector_scores: dict[str, HeadScores] = field(default_factory=dict)  # extra detectors, by config key
    conditions: list[Condition] = field(default_factory=list)  # what each evaluated condition edits
    outcomes: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> per sample
    metrics: dict[str, float] = field(default_factory=dict)


class Detector(ABC):
    """Scores every (layer, head) and selects retrieval heads."""

    name: ClassVar[str]
    """The name it is registered under: the option in the ``detector`` config group (``+detector=<name>``); results it returns carry it."""
    own_samples: ClassVar[bool] = False
    """True for a detector that makes its own inputs (e.g. repeated random tokens) and ignores the
    task's: the run then neither builds nor logs detection samples for it, announces it as running
    on its own samples, passes it an empty list, and does not run it again per ``detect_lengths``."""

    def validate(self, info: ModelInfo) -> None:
        """Raise :class:`ConfigError` for parameters impossible on this model (no weights yet)."""

    @abstractmethod
    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        """Score all heads on ``samples`` (drawn with a different seed than evaluation; empty for a
        detector with :attr:`own_samples`)."""

    def check_samples(self, samples: list[Sample]) -> None:
        """Raise :class:`ConfigError` when ``samples`` cannot give this detector's rule a score
        (known from the samples alone, before any model work): by default, when there are none."""
        if not samples:
            raise ConfigError(f"detector {self.name!r} has no detection samples: the task built none "
                              "(raise task.detect_samples_per_cell)")

    def why_no_heads(self, result: HeadScores) -> str:
        """Why ``result`` selected no heads and which remedies fit, for the run's error."""
        return f"max score {result.scores.max():.3f}; lower its threshold or set top_k"


class Intervention(ABC):
    """Turns selected heads into an attention edit, and builds its matched random control."""

    name: ClassVar[str]
    """The name it is registered under: the option in the ``intervention`` config group; results it returns carry it."""

    def validate(self, info: ModelInfo) -> None:
        """Raise :class:`ConfigError` for parameters impossible on this model (no weights yet)."""

    def check_lengths(self, lengths: list[int]) -> None:
        """The run's evaluation prompt lengths in tokens, before any model work (and before
        :meth:`prepare`): raise :class:`ConfigError` where they make a parameter impossible (a
        window as long as the context), or keep them (a cache size at the longest context)."""

    def prepare(self, model: LoadedModel, samples: list[Sample]) -> None:
        """Learn what the edit needs from the detection samples (e.g. per-dim utility), once,
        before :meth:`treatment` and :meth:`control`. Most interventions need nothing."""

    def condition_metrics(self, model: LoadedModel, edit: AttentionEdit) -> dict[str, float]:
        """Metrics of one condition this intervention built (its treatment, control or a dose of
        them), logged as ``<metric>/<condition label>``, e.g. ``kv/fraction_kept/control``. Called
        once the condition's samples have run, so it may report what the edit measured there
        (``streaming_heads``: the evicted cache's bytes)."""
        return {}

    def select(self, scores: HeadScores, heads: list[Head]) -> list[Head]:
        """The heads this intervention acts on, from the detector's ``scores`` and its ``heads``
        (its selection, or the top ones at a ``heads`` dose); the default keeps ``heads``. E.g. the
        lowest-scoring heads, as many as selected, for a condition at the same budget."""
        return heads

    @abstractmethod
    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        """The edit under test, applied to ``heads``."""

    @abstractmethod
    def control(
        self, model: LoadedModel, heads: list[Head], rng: np.random.Generator
    ) -> AttentionEdit:
        """The matched random control: same size as the treatment, chosen at random by ``rng``."""


class Task(ABC):
    """Builds seeded samples and scores generated answers.

    ``score_kind`` says what :meth:`score` returns: ``"binary"`` (0 or 1, the default) or
    ``"continuous"`` (anywhere in [0, 1]); a task may set it per instance in ``__init__``. A run
    refuses statistical tests that do not accept it (:attr:`StatTest.accepts`) before any model
    work, and its default tests follow it.
    """

    name: ClassVar[str]
    """The name it is registered under: the option in the ``task`` config group (``task=<name>``); results it returns carry it."""
    max_new_tokens: int = 16
    score_kind: ScoreKind = "binary"

    @abstractmethod
    def build_samples(self, tokenizer: Any, split: Split, seed: int) -> list[Sample]:
        """Deterministic samples for ``split``: the same seed gives the same samples."""

    @abstractmethod
    def score(self, sample: Sample, output: str) -> float:
        """Score one generated answer: 1.0 for correct and 0.0 for wrong, or in between for a
        ``"continuous"`` task."""


class StatTest(ABC):
    """Compares two conditions' per-sample outcomes on the same samples (a paired design).

    ``accepts``: the task score kinds (see :attr:`Task.score_kind`) the test is valid for.
    """

    name: ClassVar[str]
    """The name it is registered under: the key of its results (``<name>/<comparison>/p_value``) and its option in ``stats``; results it returns carry it."""
    accepts: ClassVar[frozenset[str]] = frozenset(SCORE_KINDS)
    """The task score kinds (:data:`SCORE_KINDS`) the test is valid for; a run refuses the others."""

    @abstractmethod
    def compare(self, treatment: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """Named results, each logged as a metric; ``p_value`` (adjusted across the run's
        comparisons) and ``effect_size`` where the test has them."""
