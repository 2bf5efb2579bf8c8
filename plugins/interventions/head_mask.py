"""Mask the selected heads: their output is zeroed before o_proj, so they contribute nothing to
the layer (seed 000 claim 1, Wu et al.'s pruning). Control: as many random heads in each layer as
were selected there, drawn from that layer's other heads."""

from __future__ import annotations

import numpy as np

from framework import hookimpl
from framework.attention import AttentionEdit, Head
from framework.heads import random_heads_matched_per_layer
from framework.interfaces import Intervention, LoadedModel


class HeadMask(Intervention):
    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        return AttentionEdit(zeroed_heads=set(heads))

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        return AttentionEdit(zeroed_heads=set(random_heads_matched_per_layer(heads, model.info.n_heads, rng)))


@hookimpl
def register_interventions(register):
    register("head_mask", HeadMask)
