"""Chiang & Yogatama (2025, Sec. 5.3) attention-mass indicator.

Per head: the attention weight that the question/answer tokens put on the context (instruction
and haystack, the first token excluded as the attention sink), summed over context keys, averaged
over those query rows and over samples. Heads above 0.5 are retrieval heads in the paper; top-k
selection is offered too. The answer is teacher-forced (gold answer appended), as the paper feeds
the question followed by the model's answer.
"""

from __future__ import annotations

import numpy as np
import torch

from framework.api import (
    Detector,
    HeadScores,
    LoadedModel,
    ModelInfo,
    RowCapture,
    Sample,
    check_selection,
    hookimpl,
    instrumented,
    select_heads,
    track,
)


class AttentionMass(Detector):
    def __init__(self, threshold: float | None = 0.5, top_k: int | None = None, include_answer: bool = True):
        self.threshold = threshold
        self.top_k = top_k
        self.include_answer = include_answer

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def sample_scores(self, model: LoadedModel, sample: Sample) -> np.ndarray:
        """[layers, heads] attention mass on the context for one sample."""
        ids = sample.input_ids + (sample.answer_ids if self.include_answer else [])
        start, end = sample.context_span
        mass = np.zeros((model.info.n_layers, model.info.n_heads))

        def sink(layer: int, probs: torch.Tensor) -> None:
            mass[layer] = probs[0, :, :, start:end].sum(-1).mean(-1).cpu().numpy()

        rows = torch.arange(sample.query_start, len(ids), device=model.device)
        with torch.inference_mode(), instrumented(model.model, capture=RowCapture(rows, sink)):
            model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
        return mass

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        scores = np.mean([self.sample_scores(model, s) for s in track(samples)], axis=0)
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k))


@hookimpl
def register_detectors(register):
    register("attn_mass", AttentionMass)
