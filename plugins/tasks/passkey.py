"""Passkey retrieval (Mohtashami & Jaggi; as in RULER and LongLoRA): a five-digit pass key hidden
in repeated noise text (or the user's, ``haystack=<path>``), asked for at the end. Same grid,
seeding and scoring as ``niah``."""

from __future__ import annotations

import numpy as np

from framework.api import ConfigError, hookimpl
from plugins.tasks.niah import NeedleTask


class Passkey(NeedleTask):
    instruction = ("There is an important info hidden inside a lot of irrelevant text. "
                   "Find it and memorize it. I will quiz you about the important information there.\n")
    needle = " The pass key is {value}. Remember it. {value} is the pass key. "
    question = "\nWhat is the pass key?"
    answer_prefix = "The pass key is"

    def __init__(self, haystack: str = "noise", **kwargs):
        if kwargs.get("needles"):
            raise ConfigError("passkey's needle is its pass key; sentence needles (task.needles) belong to task=niah")
        super().__init__(haystack=haystack, **kwargs)

    def _needle_fields(self, rng: np.random.Generator) -> dict[str, str]:
        return {"value": str(rng.integers(10_000, 100_000))}


@hookimpl
def register_tasks(register):
    register("passkey", Passkey)
