"""Query-norm importance (Chiang & Yogatama 2025, Fig. 2a): the L1 norm of each row of W_q.

Row ``j`` of a head's block of ``q_proj.weight`` produces query dimension ``j``, so its L1 norm
is a weight-only proxy for how much that dimension can contribute to q.k. The per-dimension
norms are kept as ``extra["per_dim"]`` [layers, heads, head_dim]; the head score is their sum,
or the share of the lowest-frequency half of the RoPE pairs when ``score="lowfreq_share"``.
No forward pass is needed.
"""

from __future__ import annotations

import numpy as np

from framework.api import (
    ConfigError,
    Detector,
    HeadScores,
    LoadedModel,
    ModelInfo,
    Sample,
    check_selection,
    hookimpl,
    lowest_frequency_dims,
    select_heads,
)

SCORES = ("total", "lowfreq_share")


def query_row_norms(model: LoadedModel) -> np.ndarray:
    """[layers, heads, head_dim] L1 norms of the W_q rows."""
    info = model.info
    norms = []
    for layer in model.model.model.layers:
        weight = layer.self_attn.q_proj.weight.detach().float()
        norms.append(weight.abs().sum(dim=1).reshape(info.n_heads, info.head_dim).cpu().numpy())
    return np.stack(norms)


class QueryNorm(Detector):
    def __init__(self, score: str = "total", threshold: float | None = None, top_k: int | None = 20):
        if score not in SCORES:
            raise ConfigError(f"score={score!r} is unknown; choose one of {SCORES}")
        self.score = score
        self.threshold = threshold
        self.top_k = top_k

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        per_dim = query_row_norms(model)
        scores = per_dim.sum(-1)
        if self.score == "lowfreq_share":
            low = lowest_frequency_dims(model.inv_freq, model.info.head_dim // 2)
            scores = per_dim[..., low].sum(-1) / scores
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k), {"per_dim": per_dim})


@hookimpl
def register_detectors(register):
    register("qnorm", QueryNorm)
