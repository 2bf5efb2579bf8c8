"""Prompt framing with exact token spans, sample construction and answer scoring, for tasks.

Prompts are assembled from separately tokenised pieces inside the model's chat frame, so every
span of a :class:`~framework.interfaces.Sample` is exact by construction rather than found again
by searching the decoded text. :class:`PositionedTask` is the paired design of Liu et al. (2024):
each record is shown once with its gold item at every requested slot, so recall by depth compares
the same questions and only the position changes. Public through :mod:`framework.api`.
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from functools import cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from framework.interfaces import ConfigError, Sample, Split, Task


def encode(tokenizer: Any, text: str) -> list[int]:
    """``text`` as token ids, without special tokens (pieces are joined inside :func:`chat_frame`)."""
    return tokenizer.encode(text, add_special_tokens=False)


def chat_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after the user message in the model's chat template (empty, and a
    newline, for base models without one), ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return [], encode(tokenizer, "\n")
    marker = "\u2063MESSAGE\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(marker)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token and before.startswith(tokenizer.bos_token) else []
    if bos:
        before = before[len(tokenizer.bos_token):]
    return bos + encode(tokenizer, before), encode(tokenizer, after)


def token_span(tokenizer: Any, text: str, ids: list[int], start: int, end: int) -> tuple[int, int] | None:
    """The tokens of ``ids`` (``text`` encoded) that cover characters [start, end) of ``text``,
    from the tokenizer's offsets; None where it has none or encodes ``text`` differently."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return None
    if list(encoded["input_ids"]) != list(ids):
        return None
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else None


def chat_sample(
    tokenizer: Any, instruction: str, items: Sequence[str], gold: int | None, question: str, answer: str,
    meta: dict[str, Any], answer_prefix: str = "",
) -> Sample:
    """A Sample whose user message is ``instruction + items + question``, followed by the
    assistant's ``answer_prefix``; the answer (``answer_ids``) continues the prompt directly.

    The context span runs from after the first token (when it is a special token: the attention
    sink) to the question; the needle span is ``items[gold]``, or an empty span at the question when
    ``gold`` is None (nothing in the context is needed to answer). ``answer_span`` covers the
    answer's first verbatim occurrence in the gold item (None where it has none).
    """
    prefix, suffix = chat_frame(tokenizer)
    ids = prefix + encode(tokenizer, instruction)
    spans, answer_span = [], None
    for index, item in enumerate(items):
        piece = encode(tokenizer, item)
        at = item.find(answer) if index == gold else -1
        local = token_span(tokenizer, item, piece, at, at + len(answer)) if at >= 0 else None
        if local:  # the answer's own tokens, for detectors that check what is copied
            answer_span = (len(ids) + local[0], len(ids) + local[1])
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    query_start = len(ids)
    ids += encode(tokenizer, question) + suffix + encode(tokenizer, answer_prefix)
    first = 1 if ids and ids[0] in tokenizer.all_special_ids else 0
    return Sample(
        id="",
        input_ids=ids,
        answer=answer,
        answer_ids=encode(tokenizer, answer),
        context_span=(first, query_start),
        query_start=query_start,
        needle_span=spans[gold] if gold is not None else (query_start, query_start),
        meta={"tokens": len(ids), **meta},
        answer_span=answer_span,
    )


@cache
def _rouge1():
    from rouge_score import rouge_scorer  # imported by the first run that scores words

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def word_recall(answer: str, output: str) -> float:
    """Share of the answer's words found in the output: ROUGE-1 recall, stemmed, with the
    ``rouge-score`` package, as Wu et al. score needle retrieval. In [0, 1], so a task scoring
    with it is ``score_kind = "continuous"``."""
    return float(_rouge1().score(answer, output)["rouge1"].recall)


def is_whole(value: Any) -> bool:
    """A whole number (bools excluded: `true` in a config is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value: int, maximum: int | None = None) -> int:
    """``value`` as an int in [1, maximum], else a ConfigError naming the parameter."""
    if not is_whole(value) or value < 1 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name}={value!r} must be a whole number of at least 1{bound}")
    return int(value)


class PositionedTask(Task):
    """Records x gold slots: subclasses draw records and render one record with its gold at a slot."""

    def __init__(self, samples_per_position: int, detect_samples_per_position: int, max_new_tokens: int):
        self.samples_per_position = check_count("samples_per_position", samples_per_position)
        self.detect_samples_per_position = check_count("detect_samples_per_position", detect_samples_per_position)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)

    n_slots: int  # number of items in the list; depth = slot / (n_slots - 1)
    slots: list[int]  # 0-based gold slots to evaluate

    @abstractmethod
    def records(self, rng: np.random.Generator, count: int) -> list[Any]:
        """``count`` seeded records."""

    @abstractmethod
    def render(self, tokenizer: Any, record: Any, slot: int) -> Sample:
        """``record`` rendered with its gold item at 0-based ``slot``."""

    def build_samples(self, tokenizer: Any, split: Split, seed: int) -> list[Sample]:
        count = self.samples_per_position if split == "eval" else self.detect_samples_per_position
        samples = []
        for index, record in enumerate(self.records(np.random.default_rng(seed), count)):
            for slot in self.slots:
                sample = self.render(tokenizer, record, slot)
                sample.id = f"{split}-P{slot + 1}-{index}"
                depth = slot / (self.n_slots - 1) if self.n_slots > 1 else 0.0
                sample.meta.update(split=split, seed=seed, index=index, gold_position=slot + 1, depth=depth)
                samples.append(sample)
        return samples


# --- your own text files: a haystack and Wu et al.'s needles ----------------------------------
NEEDLE_KEYS = ("needle", "question", "real_needle")


def read_haystack(path: str) -> list[str]:
    """For ``task.haystack=<path>``: the sentences of a text file or of a folder's .txt files (sorted by name), each ending in a space."""
    location = Path(path).expanduser()
    if location.is_dir():
        files = sorted(location.glob("*.txt"))
        if not files:
            raise ConfigError(f"task.haystack={path!r} is a folder without .txt files")
    elif location.is_file():
        files = [location]
    else:
        raise ConfigError(f"task.haystack={path!r} is neither a built-in haystack (sentences, noise) nor an existing "
                          ".txt file or folder of .txt files")
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    sentences = [s.strip() + " " for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    if len(sentences) < 2:
        raise ConfigError(f"task.haystack={path!r} holds {len(sentences)} sentence(s); a haystack needs text to cut")
    return sentences


def read_needles(path: str) -> list[dict[str, str]]:
    """Needles from a JSONL file in Wu et al.'s format (``needle``, ``question``, ``real_needle``)."""
    location = Path(path).expanduser()
    if not location.is_file():
        raise ConfigError(f"task.needles={path!r} is not a file (JSONL lines with {', '.join(NEEDLE_KEYS)})")
    needles = []
    for number, line in enumerate(location.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"task.needles={path!r}, line {number}: not JSON ({error.msg})") from None
        missing = [k for k in NEEDLE_KEYS if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise ConfigError(f"task.needles={path!r}, line {number}: needs the text field(s) {', '.join(missing)}")
        needles.append({k: record[k].strip() for k in NEEDLE_KEYS})
    if not needles:
        raise ConfigError(f"task.needles={path!r} holds no needle")
    return needles
