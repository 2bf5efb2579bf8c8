"""Zero the lowest-frequency RoPE dimensions of the query in the selected heads (seed 000,
claim 4). The ``n_dims / 2`` pairs with the smallest inv_freq of the head's own layer are removed
(layers can differ: Gemma-3's sliding-window layers have their own RoPE base), both halves of each
pair (rotate_half layout). Control: the same number of dims, as random RoPE pairs drawn per head,
in the same heads."""

from __future__ import annotations

import numpy as np

from framework import hookimpl
from framework.attention import AttentionEdit, Head
from framework.interfaces import Intervention, LoadedModel, ModelInfo
from framework.rope import check_dim_count, layer_inv_freq, lowest_frequency_dims, random_pair_dims


class ZeroLowFreq(Intervention):
    def __init__(self, n_dims: int | None = None):
        self.n_dims = n_dims  # None: a quarter of head_dim (the seed's 32 of 128)

    def dims_for(self, info: ModelInfo) -> int:
        return self.n_dims if self.n_dims is not None else info.head_dim // 4

    def validate(self, info: ModelInfo) -> None:
        check_dim_count(self.dims_for(info), info.head_dim)

    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        inv_freq, n_dims = layer_inv_freq(model.model), self.dims_for(model.info)
        dims = {head: lowest_frequency_dims(inv_freq[head[0]], n_dims) for head in heads}
        return AttentionEdit.zero_query_dims(dims, model.info.head_dim)

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        n_dims, head_dim = self.dims_for(model.info), model.info.head_dim
        return AttentionEdit.zero_query_dims({h: random_pair_dims(head_dim, n_dims, rng) for h in heads}, head_dim)


@hookimpl
def register_interventions(register):
    register("zero_lowfreq", ZeroLowFreq)
