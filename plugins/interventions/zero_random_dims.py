"""Zero ``n_dims`` random query dimensions, as whole RoPE pairs drawn per head with ``seed``
(seed 000's random-dims condition, as a treatment of its own). Control: another random draw."""

from __future__ import annotations

import numpy as np

from framework.api import Head, LoadedModel, QueryDimIntervention, hookimpl, random_pair_dims


class ZeroRandomDims(QueryDimIntervention):
    def __init__(self, n_dims: int | None = None, seed: int = 0):
        super().__init__(n_dims)
        self.seed = seed

    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *head])  # per head, and the same on every call
        return random_pair_dims(model.info.head_dim, self.count(model.info), rng)


@hookimpl
def register_interventions(register):
    register("zero_random_dims", ZeroRandomDims)
