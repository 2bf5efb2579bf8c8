"""Scale the selected heads' outputs by one factor (0 removes them, 1 leaves them as they are),
a new kind of attention edit written against the public extension point ``HeadEdit``: its
``output`` hook sees each layer's attention output [batch, q_len, heads, head_dim], what
``o_proj`` reads. Control: as many random heads in each layer, scaled the same way. The factor is
a float, so a dose series over it runs as ``dose.param=factor dose.values=[0,0.5]``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from framework.api import (
    AttentionEdit,
    ConfigError,
    Head,
    HeadEdit,
    Intervention,
    LoadedModel,
    ModelInfo,
    hookimpl,
    random_heads_matched_per_layer,
)


class OutputScaling(HeadEdit):
    """Multiply the outputs of ``heads`` by ``factor``."""

    def __init__(self, heads: list[Head], factor: float):
        self._heads, self.factor = sorted(heads), factor

    @property
    def heads(self) -> list[Head]:
        return self._heads

    def output(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        scaled = self.layer_heads(layer)
        if not scaled:
            return output
        factors = torch.ones(output.shape[2], device=output.device, dtype=output.dtype)
        factors[scaled] = self.factor
        return output * factors[:, None]

    def describe(self) -> dict[str, Any]:
        return {"output_scale": {f"{layer}.{head}": self.factor for layer, head in self._heads}}


class OutputScale(Intervention):
    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def validate(self, info: ModelInfo) -> None:
        if self.factor < 0:
            raise ConfigError(f"output_scale factor={self.factor} is impossible: an output scale must be >= 0")

    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        return AttentionEdit(parts=[OutputScaling(heads, self.factor)])

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        return self.treatment(model, random_heads_matched_per_layer(heads, model.info.n_heads, rng))


@hookimpl
def register_interventions(register):
    register("output_scale", OutputScale)
