"""Zero the highest-frequency RoPE dimensions of the query in the selected heads: the
``n_dims / 2`` pairs with the largest inv_freq of the head's own layer, both halves (Chiang &
Yogatama: these are the dims RoPE leaves under-used). Control: as many random pairs per head."""

from __future__ import annotations

import numpy as np

from framework.api import (
    Head,
    LoadedModel,
    QueryDimIntervention,
    highest_frequency_dims,
    hookimpl,
    layer_inv_freq,
)


class ZeroHighFreq(QueryDimIntervention):
    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        return highest_frequency_dims(layer_inv_freq(model.model)[head[0]], self.count(model.info))


@hookimpl
def register_interventions(register):
    register("zero_highfreq", ZeroHighFreq)
