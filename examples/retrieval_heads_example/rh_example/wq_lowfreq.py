"""A weight-only detector: the heads whose query projection W_q puts the largest share of its
weight on the lowest-frequency RoPE dimensions, the ones Chiang & Yogatama (2025) find carry
long-distance retrieval. It reads no samples, so detection costs no forward pass."""

from __future__ import annotations

import numpy as np

from framework.api import (
    Detector,
    HeadScores,
    LoadedModel,
    ModelInfo,
    Sample,
    check_dim_count,
    check_selection,
    hookimpl,
    layer_inv_freq,
    lowest_frequency_dims,
    select_heads,
)


class WqLowFreq(Detector):
    def __init__(self, n_dims: int | None = None, top_k: int = 10):
        self.n_dims = n_dims  # None: a quarter of head_dim
        self.top_k = top_k

    def dims_for(self, info: ModelInfo) -> int:
        return self.n_dims if self.n_dims is not None else info.head_dim // 4

    def validate(self, info: ModelInfo) -> None:
        check_dim_count(self.dims_for(info), info.head_dim)
        check_selection(None, self.top_k, info)

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        info, inv_freq = model.info, layer_inv_freq(model.model)
        # every attention block with a q_proj, in layer order: [n_heads * head_dim, hidden]
        weights = [m.q_proj.weight for m in model.model.modules() if hasattr(m, "q_proj")]
        scores = np.zeros((info.n_layers, info.n_heads))
        for layer, weight in enumerate(weights):
            norms = weight.detach().float().reshape(info.n_heads, info.head_dim, -1).norm(dim=-1).cpu().numpy()
            low = lowest_frequency_dims(inv_freq[layer], self.dims_for(info))
            scores[layer] = norms[:, low].sum(-1) / norms.sum(-1)
        return HeadScores(self.name, scores, select_heads(scores, top_k=self.top_k))


@hookimpl
def register_detectors(register):
    register("wq_lowfreq", WqLowFreq)
