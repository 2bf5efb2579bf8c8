"""Mask the last ``n_dims`` raw query dimensions (Chiang & Yogatama's ``[-n:]``, Table 2), in the
paper's reading: dimension order by index, not by RoPE pair. Under rotate_half these are the second
halves of the lowest-frequency pairs. Control: as many random raw dims per head."""

from __future__ import annotations

import numpy as np

from framework.api import Head, LoadedModel, QueryDimIntervention, hookimpl, last_raw_dims


class MaskLastDims(QueryDimIntervention):
    pairs = False

    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        return last_raw_dims(self.count(model.info), model.info.head_dim)


@hookimpl
def register_interventions(register):
    register("mask_last_dims", MaskLastDims)
