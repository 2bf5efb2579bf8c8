"""Closed-book QA: a control task that needs no long-range retrieval.

Wu et al. find that tasks answered from the model's intrinsic knowledge suffer little when
retrieval heads are pruned; an intervention that hurts ``niah`` but not this task is specific to
retrieval. Questions are common facts from a small built-in list (chosen so that even the
embedded 135M model mostly knows them), asked with Liu et al.'s ``closedbook_qa.prompt`` after a
one-line instruction, inside the chat template; scoring is ``best_subspan_em`` over aliases.

Spans: nothing in the prompt holds the answer, so ``needle_span`` is empty at the question and
``context_span`` is the prompt before the question (chat preamble and instruction, sink excluded);
``meta["depth"]`` is 1.0 because the only relevant text, the question, ends the prompt. The list
is split in two fixed halves (even entries for ``eval``, odd for ``detect``) so detection never
sees an evaluation question; the seed picks and orders questions within a half.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from framework.api import Sample, Split, Task, chat_sample, check_count, hookimpl
from plugins.tasks.multidoc_qa import best_subspan_em

INSTRUCTION = "Answer the question from your own knowledge, in a few words.\n\n"

FACTS: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of England?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Greece?", ["Athens"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Ireland?", ["Dublin"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What color is snow?", ["white"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many hours are in a day?", ["twenty-four", "24"]),
    ("What is the largest planet in the solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What planet do we live on?", ["Earth"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci"]),
    ("Who developed the theory of relativity?", ["Einstein"]),
    ("What is the chemical symbol for water?", ["H2O"]),
    ("What is the boiling point of water in degrees Celsius?", ["100"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What do bees make?", ["honey"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What currency is used in Japan?", ["yen"]),
    ("What is the largest animal on Earth?", ["blue whale"]),
    ("What is the longest river in the world?", ["Nile"]),
    ("Who was the first president of the United States?", ["George Washington"]),
    ("What animal is known as the king of the jungle?", ["lion"]),
    ("What language is spoken in France?", ["French"]),
    ("What is the capital of the United States?", ["Washington"]),
]


class ClosedBook(Task):
    """Short closed-book questions; ``n_samples`` from the eval half, ``detect_samples`` from the other."""

    def __init__(self, n_samples: int = 20, detect_samples: int = 8, max_new_tokens: int = 16):
        half = len(FACTS) // 2
        self.n_samples = check_count("n_samples", n_samples, half)
        self.detect_samples = check_count("detect_samples", detect_samples, half)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)

    def build_samples(self, tokenizer: Any, split: Split, seed: int) -> list[Sample]:
        pool = FACTS[0::2] if split == "eval" else FACTS[1::2]
        count = self.n_samples if split == "eval" else self.detect_samples
        samples = []
        for index, choice in enumerate(np.random.default_rng(seed).permutation(len(pool))[:count]):
            question, answers = pool[choice]
            meta = {"question": question, "answers": answers, "depth": 1.0, "split": split, "seed": seed,
                    "index": index}
            sample = chat_sample(tokenizer, INSTRUCTION, [], None, f"Question: {question}\nAnswer:", answers[0], meta)
            sample.id = f"{split}-{index}"
            samples.append(sample)
        return samples

    def score(self, sample: Sample, output: str) -> float:
        return best_subspan_em(output, sample.meta["answers"])


@hookimpl
def register_tasks(register):
    register("closed_book", ClosedBook)
