"""The lost-in-the-middle tasks and the closed-book control: file format, spans, metrics, seeding."""

from __future__ import annotations

import gzip
import json

import pytest

from framework.interfaces import ConfigError
from framework.model.generation import greedy_generate
from framework.registry import get_registry
from plugins.tasks.closed_book import ClosedBook
from plugins.tasks.kv_retrieval import KVRetrieval
from plugins.tasks.multidoc_qa import MultiDocQA, best_subspan_em, normalize_answer


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return embedded_model.tokenizer


def _decode(tokenizer, sample, start, end):
    return tokenizer.decode(sample.input_ids[start:end])


def _write_records(path, records):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)


def _record(i: int) -> dict:
    """Four documents, the gold one third (as in a Liu et al. file made with gold_at_2)."""
    ctxs = [{"title": f"Distractor {i}-{j}", "text": f"Filler text number {i}{j}.", "isgold": False} for j in range(4)]
    ctxs.insert(2, {"title": f"Gold {i}", "text": f"The secret word of record {i} is zanzibar{i}.", "isgold": True})
    return {"question": f"What is the secret word of record {i}?", "answers": [f"zanzibar{i}", f"Zanzibar-{i}"],
            "ctxs": ctxs}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_records_are_read_and_gold_is_moved_to_each_position(tokenizer, tmp_path, suffix):
    path = tmp_path / f"qa{suffix}"
    _write_records(path, [_record(i) for i in range(3)])
    task = MultiDocQA(path=str(path), n_documents=3, gold_positions=[1, 3], samples_per_position=3)
    samples = task.build_samples(tokenizer, "eval", seed=0)
    assert len(samples) == 6 and {s.meta["question"] for s in samples} == {_record(i)["question"] for i in range(3)}
    for sample in samples:
        i, position = int(sample.meta["question"].split()[-1][:-1]), sample.meta["gold_position"]
        context = _decode(tokenizer, sample, *sample.context_span)
        needle = _decode(tokenizer, sample, *sample.needle_span)
        assert needle.startswith(f"Document [{position}](Title: Gold {i}) The secret word") and sample.answer in needle
        # the first n_documents - 1 distractors, in file order, around the gold document
        distractors = [line.split(")")[0] for line in context.splitlines() if "Distractor" in line]
        numbers = [2, 3] if position == 1 else [1, 2]
        expected = [f"Document [{n}](Title: Distractor {i}-{j}" for n, j in zip(numbers, [0, 1])]
        assert distractors == expected and f"Distractor {i}-2" not in context
        assert sample.meta["depth"] == (0.0 if position == 1 else 1.0)
        assert task.score(sample, "It is Zanzibar 0") == 0.0
        assert task.score(sample, f"The word is ZANZIBAR-{i}!") == 1.0  # second alias, after normalisation


def test_synthetic_documents_answer_only_from_the_gold_one(tokenizer):
    task = MultiDocQA(samples_per_position=2)
    samples = task.build_samples(tokenizer, "eval", seed=3)
    assert [s.meta["gold_position"] for s in samples] == [1, 10, 20] * 2
    for sample in samples:
        start, end = sample.needle_span
        needle = _decode(tokenizer, sample, start, end)
        assert needle.startswith(f"Document [{sample.meta['gold_position']}](Title: ") and sample.answer in needle
        others = (_decode(tokenizer, sample, sample.context_span[0], start)
                  + _decode(tokenizer, sample, end, sample.query_start))
        assert others.count("Document [") == 19
        assert normalize_answer(sample.answer) not in normalize_answer(others)
        assert _decode(tokenizer, sample, sample.query_start, None).lstrip().startswith("Question: ")
        assert sample.context_span == (1, sample.query_start) and sample.input_ids[0] in tokenizer.all_special_ids
        assert tokenizer.decode(sample.answer_ids) == sample.answer
        assert _decode(tokenizer, sample, *sample.answer_span).strip() == sample.answer
        assert start < sample.answer_span[0] < sample.answer_span[1] <= end
        assert 900 < len(sample.input_ids) < 1600  # 20 short documents fit in ~1-2K tokens


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The Eiffel-Tower!", ["eiffeltower"], 1.0),  # punctuation dropped without a space, article removed
        ("It was built by the Gustave Eiffel company.", ["Gustave Eiffel"], 1.0),
        ("Eiffel", ["Gustave Eiffel"], 0.0),  # the gold must sit inside the prediction, not the reverse
        ("Theatre Royal", ["the Royal"], 1.0),  # 'the' removed as a word only: 'theatre' stays
        ("  PARIS .", ["paris"], 1.0),
        ("about 1,867 people", ["1867"], 1.0),
        ("an apple a  day", ["Apple day"], 1.0),
        ("Berlin", ["Paris", "Lyon"], 0.0),
        ("Lyon", ["Paris", "Lyon"], 1.0),
    ],
)
def test_best_subspan_em_uses_liu_et_al_normalisation(prediction, answers, expected):
    assert best_subspan_em(prediction, answers) == expected


def test_normalize_answer_by_hand():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day; THE end.") == "apple day end"
    assert normalize_answer("theatre") == "theatre"


def test_kv_gold_pair_sits_at_the_requested_position(tokenizer):
    task = KVRetrieval(n_pairs=5, depths=[0.0, 0.5, 1.0], samples_per_position=2)
    samples = task.build_samples(tokenizer, "eval", seed=0)
    assert [s.meta["gold_index"] for s in samples] == [0, 2, 4] * 2
    assert [s.meta["depth"] for s in samples] == [0.0, 0.5, 1.0] * 2
    for sample in samples:
        context = _decode(tokenizer, sample, *sample.context_span)
        data = json.loads(context.split("JSON data:\n")[1])  # the context ends with a valid JSON object
        key = sample.meta["key"]
        assert list(data).index(key) == sample.meta["gold_index"] and data[key] == sample.answer
        assert len(data) == 5 and len(sample.answer) == 36
        needle = _decode(tokenizer, sample, *sample.needle_span)
        assert f'"{key}": "{sample.answer}"' in needle
        assert _decode(tokenizer, sample, *sample.answer_span) == sample.answer
        assert sample.needle_span[0] < sample.answer_span[0] < sample.answer_span[1] < sample.needle_span[1]
        assert tokenizer.decode(sample.input_ids).count(sample.answer) == 1
        assert _decode(tokenizer, sample, sample.query_start, None).startswith(f'\n\nKey: "{key}"')
        assert tokenizer.decode(sample.input_ids).endswith(f'"{key}": "')  # prefill_key
        assert tokenizer.decode(sample.answer_ids) == sample.answer
    sample, value = samples[0], samples[0].answer
    assert task.score(sample, f'{value}"}}') == 1.0
    assert task.score(sample, value[:-1]) == 0.0
    assert task.score(sample, value[:-1] + ("0" if value[-1] != "0" else "1")) == 0.0
    plain = KVRetrieval(n_pairs=5, prefill_key=False).build_samples(tokenizer, "eval", seed=0)[0]
    assert tokenizer.decode(plain.input_ids).endswith("Corresponding value:<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "make",
    [lambda: MultiDocQA(n_documents=4, gold_positions=[1, 4], samples_per_position=2, detect_samples_per_position=2),
     lambda: KVRetrieval(n_pairs=4, samples_per_position=2, detect_samples_per_position=2),
     lambda: ClosedBook(n_samples=5, detect_samples=5)],
    ids=["multidoc_qa", "kv_retrieval", "closed_book"],
)
def test_samples_are_deterministic_per_seed_and_differ_between_splits(tokenizer, make):
    first = make().build_samples(tokenizer, "eval", seed=0)
    again = make().build_samples(tokenizer, "eval", seed=0)
    detect = make().build_samples(tokenizer, "detect", seed=1)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [s.id for s in first] == [s.id for s in again] and len({s.id for s in first}) == len(first)
    asked = lambda samples: {s.meta.get("question", s.answer) for s in samples}  # noqa: E731
    assert not asked(first) & asked(detect)
    assert [s.input_ids for s in make().build_samples(tokenizer, "eval", seed=2)] != [s.input_ids for s in first]


def test_file_problems_are_config_errors(tmp_path):
    bad_gold = _record(0)
    for ctx in bad_gold["ctxs"]:
        ctx["isgold"] = False
    cases = {
        "missing.jsonl": (None, "is not a file"),
        "nogold.jsonl": ([bad_gold], "line 1: needs exactly one document with isgold=true, found 0"),
        "few.jsonl": ([_record(0)], "n_documents=20 needs 19 distractors, the record has 4"),
        "noanswer.jsonl": ([{**_record(0), "answers": []}], "'answers' must be a non-empty list"),
        "broken.jsonl": ("{not json", "is not JSON lines"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, list):
            _write_records(path, content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError, match=message):
            MultiDocQA(path=str(path))
    _write_records(path := tmp_path / "two.jsonl", [_record(0), _record(1)])
    with pytest.raises(ConfigError, match="samples_per_position=3 must be a whole number of at least 1 and at most 2"):
        MultiDocQA(path=str(path), n_documents=3, gold_positions=[1], samples_per_position=3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MultiDocQA(n_documents=5), r"gold_positions=\[1, 10, 20\] must be a non-empty list of distinct"),
        (lambda: MultiDocQA(gold_positions=[0]), r"in \[1, n_documents=20\]"),
        (lambda: MultiDocQA(gold_positions=[2, 2]), "distinct"),
        (lambda: MultiDocQA(n_documents=0), "n_documents=0 must be a whole number of at least 1"),
        (lambda: MultiDocQA(n_documents=1000), "n_documents=1000 .* at most 160"),
        (lambda: MultiDocQA(samples_per_position=0), "samples_per_position=0"),
        (lambda: KVRetrieval(n_pairs=1), "n_pairs=1 must be at least 2"),
        (lambda: KVRetrieval(depths=[1.5]), r"depths=\[1.5\] must be a non-empty list in \[0, 1\]"),
        (lambda: KVRetrieval(n_pairs=2, depths=[0.0, 0.4, 1.0]), "fall on the same pair"),
        (lambda: KVRetrieval(detect_samples_per_position=-1), "detect_samples_per_position=-1"),
        (lambda: ClosedBook(n_samples=21), "n_samples=21 .* at most 20"),
        (lambda: ClosedBook(max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_impossible_parameters_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("name", ["multidoc_qa", "kv_retrieval", "closed_book"])
def test_task_configs_compose_and_register(compose_config, name):
    task = get_registry().create("task", compose_config(f"task={name}")["task"])
    assert task.name == name


def test_closed_book_control_is_answered_from_the_model_weights(embedded_model):
    task = ClosedBook(n_samples=6)
    samples = task.build_samples(embedded_model.tokenizer, "eval", seed=0)
    for sample in samples:  # nothing to retrieve: an empty needle at the question
        assert sample.needle_span == (sample.query_start, sample.query_start) and sample.meta["depth"] == 1.0
        assert sample.answer_span is None
        assert sample.context_span == (1, sample.query_start)
        question = embedded_model.tokenizer.decode(sample.input_ids[sample.query_start:])
        assert question.startswith(f"Question: {sample.meta['question']}\nAnswer:")
    outputs = greedy_generate(embedded_model, samples, task.max_new_tokens)
    accuracy = sum(task.score(s, o) for s, o in zip(samples, outputs)) / len(samples)
    assert accuracy >= 0.8, list(zip([s.answer for s in samples], outputs))
