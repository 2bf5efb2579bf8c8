"""Shared shape of the query-dimension interventions (zero_lowfreq, zero_highfreq, ...).

Each zeroes a set of query dimensions in every selected head; only which dimensions differs.
The control zeroes as many random dimensions in the same heads, drawn per head: whole RoPE pairs
when the treatment works on pairs (so treatment and control remove the same number of
frequencies), single dimensions when it reads raw indices.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from framework.interfaces import Intervention, LoadedModel, ModelInfo
from framework.model.attention import AttentionEdit, Head
from framework.model.rope import check_dim_count, check_raw_count, random_pair_dims, random_raw_dims


class QueryDimIntervention(Intervention):
    """Zero ``n_dims`` query dims per selected head (default a quarter of head_dim, the seed's
    32 of 128); subclasses choose them in :meth:`dims`."""

    pairs: ClassVar[bool] = True
    """Whether the dims come as whole RoPE pairs (``n_dims`` even) or as raw indices."""

    def __init__(self, n_dims: int | None = None):
        self.n_dims = n_dims

    def count(self, info: ModelInfo) -> int:
        """How many query dims each selected head loses: ``n_dims``, or a quarter of head_dim."""
        return self.n_dims if self.n_dims is not None else info.head_dim // 4

    def validate(self, info: ModelInfo) -> None:
        (check_dim_count if self.pairs else check_raw_count)(self.count(info), info.head_dim)

    @abstractmethod
    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        """The query dimensions this intervention zeroes in ``head``."""

    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        dims = {h: self.dims(model, h) for h in heads}
        return AttentionEdit.zero_query_dims({h: d for h, d in dims.items() if len(d)}, model.info.head_dim)

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        draw = random_pair_dims if self.pairs else random_raw_dims
        head_dim = model.info.head_dim
        counts = {h: len(self.dims(model, h)) for h in heads}
        return AttentionEdit.zero_query_dims({h: draw(head_dim, n, rng) for h, n in counts.items() if n}, head_dim)
