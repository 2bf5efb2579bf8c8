"""Scale the selected heads' queries by one factor: every attention logit of the head is
multiplied by it, so a factor below 1 flattens the head's attention (a higher temperature) and 0
makes it uniform. Control: as many random heads in each layer, scaled the same way."""

from __future__ import annotations

import numpy as np

from framework.api import (
    AttentionEdit,
    ConfigError,
    Head,
    Intervention,
    LoadedModel,
    ModelInfo,
    hookimpl,
    random_heads_matched_per_layer,
)


class QueryScale(Intervention):
    def __init__(self, factor: float = 0.25):
        self.factor = factor

    def validate(self, info: ModelInfo) -> None:
        if self.factor < 0:
            raise ConfigError(f"factor={self.factor} is impossible: a query scale must be >= 0")

    def scaled(self, heads: list[Head], head_dim: int) -> AttentionEdit:
        return AttentionEdit(query_scale={h: np.full(head_dim, self.factor, dtype=np.float32) for h in heads})

    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        return self.scaled(heads, model.info.head_dim)

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        return self.scaled(random_heads_matched_per_layer(heads, model.info.n_heads, rng), model.info.head_dim)


@hookimpl
def register_interventions(register):
    register("query_scale", QueryScale)
