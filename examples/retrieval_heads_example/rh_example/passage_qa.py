"""Needle retrieval from your own files, scored as Wu et al. (2025) score it: a haystack cut from
a passage file, a needle sentence from a JSONL file inserted at each depth, its question asked at
the end, and the score the ROUGE-1 recall of the real needle (the answer's words found in the
output), a number in [0, 1]: ``score_kind = "continuous"``.

Each JSONL line is ``{"needle": ..., "question": ..., "real_needle": ...}``, where
``real_needle`` is the part of the needle that answers the question. The lines are split in two
fixed halves (even lines for ``eval``, odd ones for ``detect``), so detection never sees an
evaluation needle; the seed picks needles within a half and where the haystack starts. Built
with the public prompt helpers, so every span is exact: the needle sentence is ``needle_span``
and the real needle's tokens are ``answer_span`` (what ``retrieval_score`` checks copies of).
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from framework.api import (
    ConfigError,
    Sample,
    Split,
    Task,
    chat_frame,
    chat_sample,
    check_count,
    encode,
    hookimpl,
    word_recall,
)

DATA = files("rh_example") / "data"
INSTRUCTION = "Read the following text carefully. I will ask you about one detail afterwards.\n\n"
ANSWER_PREFIX = "The answer is:"


def read_needles(path: str | Path) -> list[dict[str, str]]:
    """The needles of a JSONL file, each checked for its three keys."""
    needles = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"needle", "question", "real_needle"} - set(record)
        if missing:
            raise ConfigError(f"questions file {path} line {number} lacks {sorted(missing)}")
        if record["real_needle"] not in record["needle"]:
            raise ConfigError(f"questions file {path} line {number}: real_needle is not part of the needle")
        needles.append(record)
    return needles


class PassageQA(Task):
    score_kind = "continuous"  # ROUGE-1 recall lies anywhere in [0, 1]

    def __init__(
        self,
        passage: str | None = None,
        questions: str | None = None,
        context_lengths: list[int] = (256, 384),
        depths: list[float] = (0.2, 0.5, 0.8),
        samples_per_cell: int = 2,
        detect_samples_per_cell: int = 1,
        max_new_tokens: int = 24,
    ):
        passage_text = Path(passage).read_text() if passage else (DATA / "passage.txt").read_text()
        self.sentences = [s + " " for s in re.split(r"(?<=[.!?])\s+", passage_text.strip()) if s]
        self.needles = read_needles(questions or DATA / "needles.jsonl")
        if len(self.needles) < 2:
            raise ConfigError("the questions file needs at least two needles: one half for eval, one for detect")
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ConfigError(f"depths={list(depths)} must lie in [0, 1] (fraction of the haystack)")
        self.context_lengths = [check_count("context_lengths", n) for n in context_lengths]
        self.depths = [float(d) for d in depths]
        self.samples_per_cell = check_count("samples_per_cell", samples_per_cell)
        self.detect_samples_per_cell = check_count("detect_samples_per_cell", detect_samples_per_cell)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)

    def build_samples(self, tokenizer: Any, split: Split, seed: int) -> list[Sample]:
        rng = np.random.default_rng(seed)
        pool = self.needles[0::2] if split == "eval" else self.needles[1::2]
        per_cell = self.samples_per_cell if split == "eval" else self.detect_samples_per_cell
        samples = []
        for length in self.context_lengths:
            for depth in self.depths:
                for index in range(per_cell):
                    sample = self.render(tokenizer, pool[int(rng.integers(len(pool)))], length, depth, rng)
                    sample.id = f"{split}-L{length}-D{depth:g}-{index}"
                    sample.meta.update(split=split, seed=seed, index=index)
                    samples.append(sample)
        return samples

    def render(self, tokenizer: Any, needle: dict[str, str], length: int, depth: float, rng: np.random.Generator) -> Sample:
        """One prompt of ``length`` tokens at most: passage sentences from a seeded start, the
        needle between the sentences nearest to ``depth``."""
        prefix, suffix = chat_frame(tokenizer)
        question = "\n" + needle["question"]
        fixed = len(prefix) + len(suffix) + sum(len(encode(tokenizer, t)) for t in
                                                (INSTRUCTION, " " + needle["needle"] + " ", question, ANSWER_PREFIX))
        start, haystack, used = int(rng.integers(len(self.sentences))), [], 0
        while True:
            sentence = self.sentences[(start + len(haystack)) % len(self.sentences)]
            size = len(encode(tokenizer, sentence))
            if fixed + used + size > length:
                break
            haystack.append(sentence)
            used += size
        if not haystack:
            raise ConfigError(f"context length {length} leaves no room for a haystack (needs more than {fixed})")
        at = int(round(depth * len(haystack)))
        items = haystack[:at] + [" " + needle["needle"] + " "] + haystack[at:]
        meta = {"context_length": length, "depth": depth, "question": needle["question"]}
        # the answer with its leading space, tokenised as it appears inside the needle
        return chat_sample(tokenizer, INSTRUCTION, items, at, question, " " + needle["real_needle"], meta, ANSWER_PREFIX)

    def score(self, sample: Sample, output: str) -> float:
        return word_recall(sample.answer, output)


@hookimpl
def register_tasks(register):
    register("passage_qa", PassageQA)
