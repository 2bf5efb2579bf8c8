"""Zero the low-utility query dims of the selected heads (Chiang & Yogatama Table 1): per head,
the dims whose utility u (Eq. 4, the ``utility`` detector's optimisation) is below ``threshold``,
fitted on the run's detection samples in :meth:`prepare`. The count differs per head. Control:
as many random raw dims per head, in the same heads."""

from __future__ import annotations

import numpy as np

from framework.api import Head, LoadedModel, ModelInfo, QueryDimIntervention, Sample, create_plugin, hookimpl


class ZeroLowUtility(QueryDimIntervention):
    pairs = False

    def __init__(self, threshold: float = 0.5, rows: str = "query", steps: int = 200, lr: float = 0.05):
        super().__init__(None)
        self.threshold = threshold
        self.detector = create_plugin("detector", {"name": "utility", "top_k": 1, "rows": rows, "steps": steps, "lr": lr})
        self.utility: np.ndarray | None = None  # [layers, heads, head_dim], set by prepare

    def validate(self, info: ModelInfo) -> None:
        """Counts come from the fitted utility, so there is no dim count to check."""

    def prepare(self, model: LoadedModel, samples: list[Sample]) -> None:
        self.utility = self.detector.detect(model, samples).extra["utility"]

    def dims(self, model: LoadedModel, head: Head) -> np.ndarray:
        if self.utility is None:
            raise RuntimeError("zero_lowutility needs prepare(model, samples) before its edits")
        return np.flatnonzero(self.utility[head] < self.threshold)


@hookimpl
def register_interventions(register):
    register("zero_lowutility", ZeroLowUtility)
