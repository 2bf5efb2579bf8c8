"""Multi-document QA in the lost-in-the-middle format (Liu et al. 2024; Chiang & Yogatama 2025, App. B).

Records are ``{"question", "answers", "ctxs": [{"title", "text", "isgold"}, ...]}``, read from a
user-provided ``.jsonl`` / ``.jsonl.gz`` file (``path``) or, with no path, generated offline: invented
institutes with a founder, a year and a city, one gold document and distractors of the same shape
about other invented institutes, so the question is answerable only from the gold document. As
Liu et al. do, the gold document is taken out and re-inserted at each requested position among the
first ``n_documents - 1`` distractors (kept in their order). The prompt is Liu et al.'s ``qa.prompt``
inside the model's chat template; scoring is their ``best_subspan_em``.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np

from framework.api import ConfigError, PositionedTask, Sample, chat_sample, check_count, hookimpl, is_whole

INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
               "(some of which might be irrelevant).\n\n")

_ONSETS = ["Bal", "Cor", "Dun", "Elm", "Fal", "Gar", "Hol", "Ist", "Jar", "Kel", "Lor", "Mor", "Nev", "Orl", "Pel",
           "Quar", "Ros", "Sel", "Tav", "Ulv", "Var", "Wes", "Yor", "Zel", "Brin", "Cald", "Dre", "Fen", "Grim", "Hart"]
_ENDINGS = ["ford", "mere", "wick", "avia", "oria", "dale", "stead", "holm", "ara", "ent", "ion", "usk", "ath",
            "eny", "ovar", "iel"]
_WORDS = [onset + ending for onset in _ONSETS for ending in _ENDINGS]  # invented place and family names
_FIRST_NAMES = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin",
                "Leon", "Mira", "Nils", "Olga", "Paul", "Rosa", "Simon", "Tessa", "Victor"]
_KINDS = ["Institute", "Academy", "Society", "College", "Laboratory", "Museum", "Foundation", "School"]
_FIELDS = ["Marine Botany", "Applied Acoustics", "Glass Chemistry", "Alpine Medicine", "Textile History",
           "Coastal Geology", "Urban Ecology", "Clockwork Engineering", "Folk Music", "Rare Languages",
           "Cartography", "Bee Keeping", "Lighthouse Design", "River Navigation", "Weather Science"]
_ACTIVITIES = ["runs a small public library", "hosts an annual lecture series", "keeps a collection of old maps",
               "publishes a quarterly journal", "trains about forty students a year", "maintains a walled garden",
               "organises a summer field school", "restores historic instruments"]
_QUESTIONS = {"founder": "Who founded the {entity}?", "year": "In what year was the {entity} founded?",
              "city": "In which city is the {entity} based?"}
_PUNCTUATION = frozenset(string.punctuation)
_MAX_SYNTHETIC_DOCUMENTS = len(_WORDS) // 3  # each document uses three distinct invented words


def normalize_answer(text: str) -> str:
    """SQuAD normalisation as in Liu et al.: lowercase, drop punctuation, articles, extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def best_subspan_em(prediction: str, ground_truths: list[str]) -> float:
    """1.0 if any normalised gold answer is a substring of the normalised prediction (Liu et al.)."""
    prediction = normalize_answer(prediction)
    return float(any(normalize_answer(truth) in prediction for truth in ground_truths))


def _synthetic_record(rng: np.random.Generator, n_documents: int) -> dict[str, Any]:
    """One record: ``n_documents`` invented institutes, the first gold; redrawn until the answer
    and the entity the question names occur in the gold document only."""
    while True:
        words = rng.choice(_WORDS, size=3 * n_documents, replace=False).tolist()
        years = rng.choice(np.arange(1700, 2000), size=n_documents, replace=False).tolist()
        ctxs, facts = [], []
        for i in range(n_documents):
            entity = f"{words[3 * i]} {rng.choice(_KINDS)} of {rng.choice(_FIELDS)}"
            fact = {"entity": entity, "founder": f"{rng.choice(_FIRST_NAMES)} {words[3 * i + 1]}",
                    "year": str(years[i]), "city": words[3 * i + 2]}
            text = (f"The {entity} was founded by {fact['founder']} in {fact['year']}. It is based in the city of "
                    f"{fact['city']}, where it {rng.choice(_ACTIVITIES)}.")
            ctxs.append({"title": entity, "text": text, "isgold": i == 0})
            facts.append(fact)
        relation = str(rng.choice(list(_QUESTIONS)))
        gold = facts[0]
        others = [normalize_answer(f"{c['title']} {c['text']}") for c in ctxs[1:]]
        if not any(normalize_answer(gold[key]) in other for key in (relation, "entity") for other in others):
            question = _QUESTIONS[relation].format(entity=gold["entity"])
            return {"question": question, "answers": [gold[relation]], "ctxs": ctxs, "relation": relation}


def _split_record(record: Any, n_documents: int, where: str) -> dict[str, Any]:
    """Check one lost-in-the-middle record; keep its gold document and first distractors apart."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise ConfigError(f"{where}: a record needs a string 'question'")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"{where}: 'answers' must be a non-empty list of strings")
    ctxs = record.get("ctxs")
    if not isinstance(ctxs, list) or not all(isinstance(c, dict) and {"title", "text"} <= c.keys() for c in ctxs):
        raise ConfigError(f"{where}: 'ctxs' must be a list of documents with 'title' and 'text'")
    gold = [c for c in ctxs if c.get("isgold") is True]
    distractors = [c for c in ctxs if c.get("isgold") is not True]
    if len(gold) != 1:
        raise ConfigError(f"{where}: needs exactly one document with isgold=true, found {len(gold)}")
    if len(distractors) < n_documents - 1:
        raise ConfigError(f"{where}: n_documents={n_documents} needs {n_documents - 1} distractors, "
                          f"the record has {len(distractors)}")
    return {**record, "gold": gold[0], "distractors": distractors[: n_documents - 1]}


def read_records(path: str | Path, n_documents: int) -> list[dict[str, Any]]:
    """All records of a ``.jsonl`` or ``.jsonl.gz`` file in the lost-in-the-middle format."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"path={str(path)!r} is not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        try:
            records = [(number, json.loads(line)) for number, line in enumerate(lines, 1) if line.strip()]
        except json.JSONDecodeError as error:
            raise ConfigError(f"path={str(path)!r} is not JSON lines: {error}") from None
    if not records:
        raise ConfigError(f"path={str(path)!r} holds no records")
    return [_split_record(record, n_documents, f"path={str(path)!r} line {number}") for number, record in records]


class MultiDocQA(PositionedTask):
    """Lost-in-the-middle multi-document QA; gold positions are 1-based as in the paper's figures."""

    def __init__(
        self,
        path: str | None = None,
        n_documents: int = 20,
        gold_positions: list[int] = (1, 10, 20),
        samples_per_position: int = 10,
        detect_samples_per_position: int = 2,
        max_new_tokens: int = 24,
    ):
        super().__init__(samples_per_position, detect_samples_per_position, max_new_tokens)
        self.n_slots = check_count("n_documents", n_documents, None if path else _MAX_SYNTHETIC_DOCUMENTS)
        if (not gold_positions or len(set(gold_positions)) < len(gold_positions)
                or any(not is_whole(p) or not 1 <= p <= n_documents for p in gold_positions)):
            raise ConfigError(f"gold_positions={list(gold_positions)} must be a non-empty list of distinct whole "
                              f"numbers in [1, n_documents={n_documents}]")
        self.slots = [int(p) - 1 for p in gold_positions]
        self.file_records = read_records(path, self.n_slots) if path else None
        if self.file_records is not None:  # records are drawn without replacement
            check_count("samples_per_position", samples_per_position, len(self.file_records))
            check_count("detect_samples_per_position", detect_samples_per_position, len(self.file_records))

    def records(self, rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
        if self.file_records is None:
            return [_split_record(_synthetic_record(rng, self.n_slots), self.n_slots, "synthetic")
                    for _ in range(count)]
        return [self.file_records[i] for i in rng.choice(len(self.file_records), size=count, replace=False)]

    def render(self, tokenizer: Any, record: dict[str, Any], slot: int) -> Sample:
        documents = list(record["distractors"])
        documents.insert(slot, record["gold"])
        items = [f"Document [{i}](Title: {d['title']}) {d['text']}\n" for i, d in enumerate(documents, 1)]
        question = f"\nQuestion: {record['question']}\nAnswer:"
        meta = {"question": record["question"], "answers": record["answers"], "n_documents": self.n_slots}
        if "relation" in record:
            meta["relation"] = record["relation"]
        return chat_sample(tokenizer, INSTRUCTION, items, slot, question, record["answers"][0], meta)

    def score(self, sample: Sample, output: str) -> float:
        return best_subspan_em(output, sample.meta.get("answers", [sample.answer]))


@hookimpl
def register_tasks(register):
    register("multidoc_qa", MultiDocQA)
