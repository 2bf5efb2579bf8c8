"""Synthetic JSON key-value retrieval (Liu et al. 2024, ``kv_retrieval.prompt``), built offline.

A JSON object of ``n_pairs`` UUID keys -> UUID values; the query asks for one key's value. UUIDs are
drawn from the seeded rng (not ``uuid4``), so samples are reproducible. As in Liu et al., the gold
pair is moved to each requested position (``depths``: fractions of the list, 0 = first pair,
1 = last) while the other pairs keep their order. Pure retrieval with no semantic cue, and the
needle is exactly one pair. Scoring: the exact value appears in the output.

``prefill_key`` (default on) starts the assistant's answer with ``"<key>": "``, a JSON continuation:
a small chat model then copies the value instead of chatting about the JSON (the embedded 135M
model scores 0 without it, even with 2 pairs). Set it off for Liu et al.'s prompt exactly.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from framework.api import ConfigError, PositionedTask, Sample, chat_sample, check_count, hookimpl

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


class KVRetrieval(PositionedTask):
    """Each record is ``n_pairs`` distinct pairs, the first the gold one, shown at every depth."""

    def __init__(
        self,
        n_pairs: int = 4,
        depths: list[float] = (0.0, 0.5, 1.0),
        samples_per_position: int = 10,
        detect_samples_per_position: int = 2,
        prefill_key: bool = True,
        max_new_tokens: int = 40,
    ):
        super().__init__(samples_per_position, detect_samples_per_position, max_new_tokens)
        self.n_slots = check_count("n_pairs", n_pairs)
        if self.n_slots < 2:
            raise ConfigError(f"n_pairs={n_pairs} must be at least 2 (Liu et al.'s minimum: one gold, one distractor)")
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ConfigError(f"depths={list(depths)} must be a non-empty list in [0, 1] (fraction of the pairs)")
        self.slots = [int(d * (self.n_slots - 1) + 0.5) for d in depths]  # nearest pair, halves up
        if len(set(self.slots)) < len(self.slots):
            raise ConfigError(f"depths={list(depths)} fall on the same pair more than once with n_pairs={n_pairs} "
                              f"(pair indices {self.slots})")
        self.prefill_key = bool(prefill_key)

    def records(self, rng: np.random.Generator, count: int) -> list[list[tuple[str, str]]]:
        # 122 random bits per UUID: a repeated key is practically impossible
        return [[(_uuid(rng), _uuid(rng)) for _ in range(self.n_slots)] for _ in range(count)]

    def render(self, tokenizer: Any, record: list[tuple[str, str]], slot: int) -> Sample:
        (key, value), pairs = record[0], record[1:]
        pairs.insert(slot, (key, value))
        last = len(pairs) - 1
        items = [("{" if i == 0 else " ") + f'"{k}": "{v}"' + ("}" if i == last else ",\n")
                 for i, (k, v) in enumerate(pairs)]
        question = f'\n\nKey: "{key}"\nCorresponding value:'
        meta = {"key": key, "gold_index": slot, "n_pairs": self.n_slots}
        prefix = f'"{key}": "' if self.prefill_key else ""
        return chat_sample(tokenizer, INSTRUCTION, items, slot, question, value, meta, answer_prefix=prefix)

    def score(self, sample: Sample, output: str) -> float:
        return float(sample.answer in output)


@hookimpl
def register_tasks(register):
    register("kv_retrieval", KVRetrieval)
