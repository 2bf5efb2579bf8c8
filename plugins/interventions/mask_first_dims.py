"""Mask the first ``n_dims`` raw query dimensions (Chiang & Yogatama's ``[:n]``, Table 2), in the
paper's reading: dimension order by index, not by RoPE pair. Under rotate_half these are the first
halves of the highest-frequency pairs. Control: as many random raw dims per head."""

from __future__ import annotations

import numpy as np

from framework.api import Head, LoadedModel, QueryDimIntervention, first_raw_dims, hookimpl


class MaskFirstDims(QueryDimIntervention):
    pairs = False

    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        return first_raw_dims(self.count(model.info), model.info.head_dim)


@hookimpl
def register_interventions(register):
    register("mask_first_dims", MaskFirstDims)
