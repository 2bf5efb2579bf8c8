"""Needle in a haystack (RULER-style "special magic number"), built offline.

A grid of context lengths (in tokens, whole prompt) x needle depths; each cell gets
``samples_per_cell`` samples. Every sample has its own key word and seven-digit value, so the
answer cannot come from anywhere but the needle. The haystack is either seeded, varied
generated sentences (``sentences``), RULER's repeated noise text (``noise``) or the user's text
(a path: see :func:`framework.api.read_haystack`). Scoring is exact match of the value as a whole
number in the greedy output. With ``needles=<path>`` (Wu et al.'s JSONL) the needles are the
user's sentences, placed in Wu et al.'s prompt, and answers score ROUGE-1 recall of
``real_needle`` (``score_kind = "continuous"``).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np

from framework.api import (
    ConfigError,
    Sample,
    Split,
    Task,
    chat_frame,
    hookimpl,
    read_haystack,
    read_needles,
    token_span,
    word_recall,
)

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SUBJECTS = ["The old miller", "A quiet river", "The village baker", "Every autumn wind", "The tall lighthouse",
             "A wandering fox", "The school teacher", "The harbour bell", "A distant train", "The orchard keeper",
             "The night watchman", "A small sailboat", "The county library", "A patient gardener", "The copper kettle"]
_VERBS = ["watched", "remembered", "carried", "painted", "followed", "described", "repaired", "counted",
          "visited", "ignored", "measured", "collected", "admired", "crossed", "explained"]
_OBJECTS = ["the morning fog", "a basket of apples", "the stone bridge", "an empty market", "the long road home",
            "a faded map", "the northern hills", "a crowd of gulls", "the evening lanterns", "a pile of letters",
            "the winter fields", "a broken fence", "the narrow canal", "a row of chestnut trees", "the quiet square"]
_ENDINGS = ["before the rain began", "while the town slept", "without saying a word", "as it did every year",
            "long after sunset", "under a pale sky", "for no particular reason", "with great care",
            "on the way to the coast", "in the spring of that year"]
_KEYS = ["amber", "falcon", "harvest", "juniper", "lantern", "meadow", "nickel", "orchid", "pepper", "quartz",
         "raven", "saffron", "thistle", "velvet", "willow", "zephyr", "cobalt", "ember", "glacier", "horizon",
         "ivory", "jasmine", "kestrel", "lotus", "marble", "nectar", "onyx", "pebble", "cedar", "dune"]


class NeedleTask(Task):
    """Base of the needle tasks: subclasses change only the texts."""

    instruction = ("A special magic number is hidden within the following text. "
                   "Make sure to memorize it. I will quiz you about the number afterwards.\n")
    needle = " One of the special magic numbers for {key} is: {value}. "
    question = "\nWhat is the special magic number for {key} mentioned in the provided text?"
    answer_prefix = "The special magic number for {key} mentioned in the provided text is"

    def __init__(
        self,
        context_lengths: list[int] = (256, 384),
        depths: list[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        samples_per_cell: int = 4,
        detect_samples_per_cell: int = 1,
        haystack: str = "sentences",
        max_new_tokens: int = 12,
        needles: str | None = None,
    ):
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ConfigError(f"depths={list(depths)} must lie in [0, 1] (fraction of the haystack)")
        if samples_per_cell < 1 or detect_samples_per_cell < 1:
            raise ConfigError("samples_per_cell and detect_samples_per_cell must be at least 1")
        self.context_lengths = [int(n) for n in context_lengths]
        self.depths = [float(d) for d in depths]
        self.samples_per_cell = samples_per_cell
        self.detect_samples_per_cell = detect_samples_per_cell
        self.haystack = haystack
        self.max_new_tokens = max_new_tokens
        self._text = None if haystack in ("sentences", "noise") else read_haystack(haystack)
        self._needles = read_needles(needles) if needles else None
        if self._needles:  # Wu et al.'s prompt around their needle sentences, scored by ROUGE-1 recall
            self.instruction = "This is a very long story book: <book> "
            self.needle = " {needle} "
            self.question = " </book>.\nBased on the content of the book, Question: {question}"
            self.answer_prefix = "Answer:"
            self.score_kind = "continuous"

    # --- texts -------------------------------------------------------------------------------
    def _filler_sentences(self, rng: np.random.Generator, count: int) -> list[str]:
        if self.haystack == "noise":
            return [_NOISE + " "] * count
        return [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}. "
            for _ in range(count)
        ]

    def _filler(self, rng: np.random.Generator) -> Iterator[str]:
        """Haystack sentences in order: consecutive ones of the user's text from a seeded start,
        else the generated ones, drawn eight at a time."""
        if self._text is not None:
            start = int(rng.integers(len(self._text)))
            while True:
                yield self._text[start % len(self._text)]
                start += 1
        while True:
            yield from self._filler_sentences(rng, 8)

    def _needle_fields(self, rng: np.random.Generator) -> dict[str, str]:
        if self._needles:
            return dict(self._needles[int(rng.integers(len(self._needles)))])
        return {"key": str(rng.choice(_KEYS)), "value": str(rng.integers(1_000_000, 10_000_000))}

    # --- building ------------------------------------------------------------------------------
    def build_samples(self, tokenizer: Any, split: Split, seed: int) -> list[Sample]:
        per_cell = self.samples_per_cell if split == "eval" else self.detect_samples_per_cell
        rng = np.random.default_rng(seed)
        samples = []
        for length in self.context_lengths:
            for depth in self.depths:
                for index in range(per_cell):
                    sample = self._build_one(tokenizer, rng, length, depth)
                    sample.id = f"{split}-L{length}-D{depth:g}-{index}"
                    sample.meta.update(split=split, seed=seed, index=index)
                    samples.append(sample)
        return samples

    def _build_one(self, tokenizer: Any, rng: np.random.Generator, length: int, depth: float) -> Sample:
        fields = self._needle_fields(rng)

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        prefix, suffix = chat_frame(tokenizer)
        head = prefix + encode(self.instruction)
        needle = encode(self.needle.format(**fields))
        tail = encode(self.question.format(**fields)) + suffix + encode(self.answer_prefix.format(**fields))
        budget = length - len(head) - len(needle) - len(tail)
        if budget < 16:
            raise ConfigError(f"context length {length} leaves no room for a haystack (needs > {length - budget + 16})")
        filler: list[list[int]] = []
        sentences = self._filler(rng)
        while sum(map(len, filler)) < budget:
            filler.append(encode(next(sentences)))
        haystack = [t for sentence in filler for t in sentence][:budget]
        # insert at the sentence boundary nearest to the requested depth
        boundaries = np.cumsum([0] + [len(s) for s in filler])
        boundaries = boundaries[boundaries <= budget]
        cut = int(boundaries[np.argmin(np.abs(boundaries - depth * budget))])
        ids = head + haystack[:cut] + needle + haystack[cut:] + tail
        needle_start = len(head) + cut
        query_start = needle_start + len(needle) + len(haystack) - cut
        first = 1 if ids and ids[0] in tokenizer.all_special_ids else 0
        answer, value_span = fields.get("value", fields.get("real_needle")), None
        if "value" in fields:  # the value's own tokens; a sentence needle has its whole span instead
            value_at = len(self.needle.split("{value}")[0].format(**fields))  # first occurrence of the value
            value_span = token_span(tokenizer, self.needle.format(**fields), needle, value_at, value_at + len(answer))
        return Sample(
            id="",
            input_ids=ids,
            answer=answer,
            answer_ids=encode(" " + answer),
            context_span=(first, query_start),
            query_start=query_start,
            needle_span=(needle_start, needle_start + len(needle)),
            meta={"context_length": length, "depth": depth, "tokens": len(ids), **fields},
            answer_span=(needle_start + value_span[0], needle_start + value_span[1]) if value_span else None,
        )

    def score(self, sample: Sample, output: str) -> float:
        if self._needles:
            return word_recall(sample.answer, output)
        return float(re.search(rf"(?<!\d){re.escape(sample.answer)}(?!\d)", output) is not None)


class NIAH(NeedleTask):
    """RULER-style single needle: a key word and a seven-digit magic number."""


@hookimpl
def register_tasks(register):
    register("niah", NIAH)
