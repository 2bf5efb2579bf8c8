"""Zero the lowest-frequency RoPE dimensions of the query in the selected heads (seed 000,
claim 4). The ``n_dims / 2`` pairs with the smallest inv_freq of the head's own layer are removed
(layers can differ: Gemma-3's sliding-window layers have their own RoPE base), both halves of each
pair (rotate_half layout). Control: as many random RoPE pairs per head, in the same heads."""

from __future__ import annotations

import numpy as np

from framework.api import (
    Head,
    LoadedModel,
    QueryDimIntervention,
    hookimpl,
    layer_inv_freq,
    lowest_frequency_dims,
)


class ZeroLowFreq(QueryDimIntervention):
    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        return lowest_frequency_dims(layer_inv_freq(model.model)[head[0]], self.count(model.info))


@hookimpl
def register_interventions(register):
    register("zero_lowfreq", ZeroLowFreq)
