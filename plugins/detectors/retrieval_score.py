"""Wu et al. (2025) retrieval score: how often a head copies the needle into the output.

Each detection sample is one needle trial, decoded greedily with the KV cache. At every decode
step each head's top-1 attended position is read from the pass that produces the token (one
query row per step, :class:`framework.model.attention.RowCapture` with ``phase="decode"``); the head
copies when that position lies inside the span and holds the token just generated. As in Wu et
al.'s ``Retrieval_Head`` code, the prompt's last token is fed as the first decode step, so every
generated token is scored, and a trial counts only when its answer recall is high enough
(``min_recall``; the code keeps trials with ROUGE-1 recall > 50%).

Counting (``unique_positions``): the paper defines the score as |g_h ∩ k| / |k|, the share of
needle tokens the head copied, a set, so each needle position counts once per trial (default;
the score then lies in [0, 1]). The released code adds 1/|k| at every copying step instead, so
a position copied twice counts twice: ``unique_positions: false`` reproduces that.

Mode (``mode``): ``top1_copy`` (default) is Wu et al.'s copy test above. ``topk_mass`` is HeadKV's
retrieval-reasoning score (FYYFU/HeadKV, ``Important_Head/retrieval_head_detection_r2.py``,
``retrieval_calculate``): at every decode step each head's k most attended positions are taken,
k the span's token length, and the attention weights of those inside the span are added, divided
by k; no token has to match. A trial's score is the sum over its steps; trials are kept by the
same recall rule (HeadKV: F1 > 50 %, with its QA F1 as the task's score here) and averaged.

Span (``span``): Wu et al. use the needle sentence, which their models copy whole; our NIAH
answer copies only the value, so the default is the answer's tokens (``Sample.answer_span``,
falling back to ``needle_span`` for tasks without one); ``needle`` takes the whole needle. The
score is normalised by the span's token length. Scores are averaged over the kept trials.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from framework.api import (
    ConfigError,
    Detector,
    HeadScores,
    LoadedModel,
    ModelInfo,
    RowCapture,
    Sample,
    Task,
    check_selection,
    create_plugin,
    hookimpl,
    instrumented,
    select_heads,
    track,
    word_recall,
)

log = logging.getLogger(__name__)
SPANS = ("answer", "needle")
MODES = ("top1_copy", "topk_mass")
RowReduce = Callable[[torch.Tensor, int], torch.Tensor]  # (row [heads, keys], its first key's position) -> [heads]


def copy_scores(
    top1: np.ndarray, tokens: Sequence[int], prompt: Sequence[int], span: tuple[int, int], unique_positions: bool = True
) -> np.ndarray:
    """One trial's [layers, heads] retrieval score.

    ``top1[step, layer, head]`` is the position the head attends most when producing
    ``tokens[step]``; ``prompt`` the input ids; ``span`` the half-open span that counts.
    """
    start, end = span
    top1 = np.asarray(top1)
    if end <= start:  # nothing to copy (e.g. a closed-book sample)
        return np.zeros(top1.shape[1:])
    prompt = np.asarray(prompt)
    inside = (top1 >= start) & (top1 < end)
    attended = prompt[np.where(inside, top1, start)]  # any in-range index where outside
    copied = inside & (attended == np.asarray(tokens)[:, None, None])
    if not unique_positions:
        return copied.sum(axis=0) / (end - start)
    hit = np.zeros((*top1.shape[1:], end - start), dtype=bool)
    step, layer, head = np.nonzero(copied)
    hit[layer, head, top1[step, layer, head] - start] = True
    return hit.sum(axis=-1) / (end - start)


def top1_position(row: torch.Tensor, first: int) -> torch.Tensor:
    """Each head's most attended absolute position, from its attention ``row`` [heads, keys]
    whose first key sits at position ``first``."""
    return row.argmax(dim=-1) + first


def topk_mass(row: torch.Tensor, first: int, span: tuple[int, int]) -> torch.Tensor:
    """HeadKV's step score per head: of the k = len(span) most attended keys, the attention
    weight of those inside ``span``, summed and divided by k (``row`` [heads, keys] as in
    :func:`top1_position`)."""
    k = span[1] - span[0]
    values, index = row.float().topk(min(k, row.shape[-1]), dim=-1)
    position = index + first
    return (values * ((position >= span[0]) & (position < span[1]))).sum(-1) / k


def greedy_rows(model: LoadedModel, input_ids: Sequence[int], max_new_tokens: int,
                reduce: RowReduce = top1_position) -> tuple[list[int], np.ndarray]:
    """Greedy tokens (stopping after an end-of-sequence token) and, per token, every head's
    ``reduce`` of its attention row in the pass that produced it: [steps, layers, heads] (by
    default the top-1 attended position).

    Positions are absolute: a sliding-window layer's cache holds only the latest keys, so its
    row's index j is the key at position ``query + 1 - len(row) + j`` (0 offset on full layers)."""
    reduced = torch.zeros(model.info.n_layers, model.info.n_heads, dtype=torch.float64, device=model.device)
    query = [len(input_ids) - 1]  # the position of the token fed in the current decode step

    def sink(layer: int, probs: torch.Tensor) -> None:
        reduced[layer] = reduce(probs[0, :, 0], query[0] + 1 - probs.shape[-1]).double()

    stop = model.model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    tokens: list[int] = []
    steps: list[np.ndarray] = []
    capture = RowCapture(torch.zeros(1, dtype=torch.long), sink, phase="decode")
    with torch.inference_mode(), instrumented(model.model, capture=capture):
        prefill = model.model(input_ids=torch.tensor([list(input_ids[:-1])], device=model.device), use_cache=True, logits_to_keep=1)
        cache, token = prefill.cache, input_ids[-1]
        for _ in range(max_new_tokens):
            out = model.model(input_ids=torch.tensor([[token]], device=model.device), cache=cache, use_cache=True)
            cache, token = out.cache, int(out.logits[0, -1].argmax())
            tokens.append(token)
            steps.append(reduced.cpu().numpy().copy())
            query[0] += 1
            if token in stop:
                break
    return tokens, np.stack(steps)


def greedy_top1(model: LoadedModel, input_ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and every head's top-1 attended absolute position per token [steps, layers, heads]."""
    tokens, top1 = greedy_rows(model, input_ids, max_new_tokens)
    return tokens, top1.astype(np.int64)


class RetrievalScore(Detector):
    def __init__(
        self,
        threshold: float | None = 0.1,
        top_k: int | None = None,
        span: str = "answer",
        min_recall: float | None = 0.5,
        unique_positions: bool = True,
        max_new_tokens: int | None = None,
        task: Task | Mapping[str, Any] | None = None,
        mode: str = "top1_copy",
    ):
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is unknown; choose one of {MODES}")
        if span not in SPANS:
            raise ConfigError(f"span={span!r} is unknown; choose one of {SPANS}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1 (or null: the task's)")
        if min_recall is not None and not 0.0 <= min_recall <= 1.0:
            raise ConfigError(f"min_recall={min_recall} must lie in [0, 1] (or be null: every trial counts)")
        self.threshold = threshold
        self.top_k = top_k
        self.span = span
        self.mode = mode
        self.min_recall = min_recall
        self.unique_positions = unique_positions
        # the run's task (its score() is the recall; its max_new_tokens the decode length)
        self.task = create_plugin("task", task) if isinstance(task, Mapping) else task
        self.max_new_tokens = max_new_tokens or (self.task.max_new_tokens if self.task else Task.max_new_tokens)

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def check_samples(self, samples: list[Sample]) -> None:
        super().check_samples(samples)
        if not any(self._span(s)[1] > self._span(s)[0] for s in samples):
            raise ConfigError(f"retrieval_score has nothing to score: none of the {len(samples)} detection samples has a "
                              f"needle (span={self.span!r} is empty in all of them); choose a needle task (niah, passkey)")

    def why_no_heads(self, result: HeadScores) -> str:
        kept, trials, recall = result.extra["kept_trials"], result.extra["trials"], result.extra["recall"]
        if kept:
            return f"{super().why_no_heads(result)} ({kept} of {trials} trials kept)"
        return (f"no trial retrieved the needle: {kept} of {trials} detection trials reached min_recall={self.min_recall} "
                f"(the best trial's recall was {max(recall):.2f}), so every score is 0 and neither a lower threshold nor "
                "top_k gives meaningful heads; use more detection samples (task.detect_samples_per_cell), a lower "
                "detector.min_recall, or shorter contexts")

    def recall(self, sample: Sample, output: str) -> float:
        """The task's score of the output, or the answer's word recall without a task."""
        return self.task.score(sample, output) if self.task else word_recall(sample.answer, output)

    def _span(self, sample: Sample) -> tuple[int, int]:
        return sample.answer_span if self.span == "answer" and sample.answer_span else sample.needle_span

    def trial(self, model: LoadedModel, sample: Sample) -> tuple[np.ndarray, str]:
        """One needle trial: [layers, heads] scores and the generated text."""
        span = self._span(sample)
        if self.mode == "topk_mass" and span[1] > span[0]:
            tokens, mass = greedy_rows(model, sample.input_ids, self.max_new_tokens, lambda row, first: topk_mass(row, first, span))
            scores = mass.sum(axis=0)
        else:
            tokens, top1 = greedy_top1(model, sample.input_ids, self.max_new_tokens)
            scores = copy_scores(top1, tokens, sample.input_ids, span, self.unique_positions)
        output = model.tokenizer.decode(tokens, skip_special_tokens=True) if model.tokenizer else ""
        return scores, output

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        trials = [self.trial(model, s) for s in track(samples)]
        recall = [self.recall(s, output) for s, (_, output) in zip(samples, trials)]
        kept = [i for i, r in enumerate(recall) if self.min_recall is None or r >= self.min_recall]
        if kept:
            scores = np.mean([trials[i][0] for i in kept], axis=0)
        else:
            log.warning("retrieval_score: no trial reached min_recall=%s; every score is 0", self.min_recall)
            scores = np.zeros((model.info.n_layers, model.info.n_heads))
        extra = {"trials": len(samples), "kept_trials": len(kept), "recall": recall, "outputs": [o for _, o in trials]}
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k), extra)


@hookimpl
def register_detectors(register):
    register("retrieval_score", RetrievalScore)
