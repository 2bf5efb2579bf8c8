"""Needle tasks on the embedded tokenizer: exact lengths, spans, seeding and scoring."""

from __future__ import annotations

import pytest

from framework.interfaces import ConfigError
from plugins.tasks.niah import NIAH
from plugins.tasks.passkey import Passkey


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return embedded_model.tokenizer


@pytest.mark.parametrize("task_class", [NIAH, Passkey])
def test_samples_have_exact_lengths_and_correct_spans(tokenizer, task_class):
    task = task_class(context_lengths=[200, 300], depths=[0.0, 0.5, 1.0], samples_per_cell=2)
    samples = task.build_samples(tokenizer, "eval", seed=7)
    assert len(samples) == 2 * 3 * 2
    for sample in samples:
        assert len(sample.input_ids) == sample.meta["context_length"]
        needle = tokenizer.decode(sample.input_ids[slice(*sample.needle_span)])
        assert sample.answer in needle
        assert sample.answer not in tokenizer.decode(sample.input_ids[: sample.needle_span[0]])
        assert sample.answer not in tokenizer.decode(sample.input_ids[sample.needle_span[1] :])
        question = tokenizer.decode(sample.input_ids[sample.query_start :])
        assert question.lstrip().startswith("What is the")
        assert sample.context_span == (1, sample.query_start)  # the chat template's first token is the sink
        assert sample.input_ids[0] in tokenizer.all_special_ids
        assert tokenizer.decode(sample.answer_ids).strip() == sample.answer


def test_needle_moves_with_depth(tokenizer):
    task = NIAH(context_lengths=[400], depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples_per_cell=1)
    starts = [s.needle_span[0] for s in task.build_samples(tokenizer, "eval", seed=0)]
    assert starts == sorted(starts) and starts[0] < starts[-1] - 200


def test_seeds_make_samples_reproducible_and_splits_different(tokenizer):
    task = NIAH(context_lengths=[200], depths=[0.5], samples_per_cell=3, detect_samples_per_cell=3)
    first = task.build_samples(tokenizer, "eval", seed=1)
    again = task.build_samples(tokenizer, "eval", seed=1)
    other = task.build_samples(tokenizer, "detect", seed=2)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert not {s.answer for s in first} & {s.answer for s in other}
    assert len({s.answer for s in first}) == 3


def test_score_is_exact_match_of_the_whole_value():
    task = NIAH()
    sample = type("S", (), {"answer": "1234567"})()
    assert task.score(sample, " 1234567.") == 1.0
    assert task.score(sample, "It is 1234567") == 1.0
    assert task.score(sample, " 12345678") == 0.0
    assert task.score(sample, " 1234566") == 0.0


def test_impossible_task_parameters_are_refused(tokenizer):
    with pytest.raises(ConfigError, match=r"depths=\[1.5\] must lie in \[0, 1\]"):
        NIAH(depths=[1.5])
    with pytest.raises(ConfigError, match="haystack='essays' is neither a built-in haystack"):
        NIAH(haystack="essays")
    with pytest.raises(ConfigError, match="context length 60 leaves no room"):
        NIAH(context_lengths=[60]).build_samples(tokenizer, "eval", seed=0)
