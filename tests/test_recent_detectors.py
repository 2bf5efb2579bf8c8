"""The detectors of recent papers (induction, echo, qrhead, duo_gates, retrieval_score's topk_mass)
and the scores pooled per KV head, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from framework.api import ConfigError, Sample, create_plugin
from framework.model.loading import prepare
from framework.repeats import repeated_random_tokens, target_mask
from framework.runner.detection import kv_head_scores
from plugins.detectors.duo_gates import passkey_sample, streaming_bias
from plugins.detectors.retrieval_score import topk_mass
from tests.conftest import tiny_llama


def eager_attentions(loaded, ids: list[int]) -> list[np.ndarray]:
    """Every layer's attention [heads, queries, keys] from transformers' eager implementation,
    on a copy of the model's weights."""
    eager = LlamaForCausalLM(loaded.model.config.__class__(**{**loaded.model.config.to_dict(),
                                                              "_attn_implementation": "eager"})).eval()
    eager.load_state_dict(loaded.model.state_dict())
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    return [a[0].numpy() for a in out.attentions]


def test_kv_head_scores_pool_each_query_group():
    scores = np.random.default_rng(0).random((3, 6))
    pooled = kv_head_scores(scores, 2)
    for layer in range(3):
        for kv in range(2):
            group = [scores[layer, h] for h in range(6) if h // 3 == kv]
            assert pooled["max"][layer, kv] == max(group) and pooled["mean"][layer, kv] == pytest.approx(np.mean(group))
    with pytest.raises(ValueError, match="4 KV groups"):
        kv_head_scores(scores, 4)


def test_repeated_tokens_and_their_targets():
    tokens = repeated_random_tokens(50, 5, 3, 2, seed=1, exclude={0, 1, 2})
    assert tokens.shape == (2, 15) and not np.isin(tokens, [0, 1, 2]).any()
    assert len(set(tokens[0, :5])) == 5 and (tokens[:, :5] == tokens[:, 5:10]).all()
    echo, induction = target_mask(5, 3, 0, start=1), target_mask(5, 3, 1, start=1)
    # row 0 is position 6 (copy 1): its earlier occurrence is position 1; row 5 (position 11, copy 2): 6 and 1
    assert np.flatnonzero(echo[0]).tolist() == [1] and np.flatnonzero(echo[5]).tolist() == [1, 6]
    assert np.flatnonzero(induction[0]).tolist() == [2] and np.flatnonzero(induction[5]).tolist() == [2, 7]
    with pytest.raises(ConfigError, match="length=60"):
        repeated_random_tokens(50, 60, 2, 1, seed=0)


def echo_model(length: int) -> object:
    """One layer, two heads; head 0 is built to attend to the previous occurrence of its token:
    the query and key carry a random code of the token in RoPE pairs that barely rotate (8..15),
    and pair 0 (frequency 1) adds -cos(distance), which is lowest for the token itself and
    highest at a distance of ``length`` (22 ~ 7 pi)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    codes = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    with torch.no_grad():
        embedding = torch.zeros(64, 64)
        embedding[:, 0], embedding[:, 1:17] = 1.0, codes
        model.model.embed_tokens.weight.copy_(embedding)
        attention = model.model.layers[0].self_attn
        scale = math.sqrt(2 / 64)  # undoes the RMS norm of [1, code]: x = embedding / scale
        match, position = math.sqrt(30 * math.sqrt(32)) * scale, math.sqrt(10 * math.sqrt(32)) * scale  # logits 30 and 10
        for projection, sign in ((attention.q_proj, 1.0), (attention.k_proj, -1.0)):
            projection.weight[:32].zero_()
            for i in range(8):  # the code into both halves of pairs 8..15 (dims 8..15 and 24..31)
                projection.weight[8 + i, 1 + i] = match
                projection.weight[24 + i, 9 + i] = match
            projection.weight[0, 0] = position * (1.0 if projection is attention.q_proj else sign)
    return prepare(model, None, "echo_model")


def test_echo_scores_highest_on_the_head_built_to_attend_to_the_previous_occurrence():
    loaded = echo_model(22)
    echo = create_plugin("detector", {"name": "echo", "length": 22, "repeats": 2, "n_sequences": 3, "top_k": 1})
    induction = create_plugin("detector", {"name": "induction", "length": 22, "repeats": 2, "n_sequences": 3, "top_k": 1})
    found = echo.detect(loaded, [])
    assert found.selected == [(0, 0)] and found.scores[0, 0] > 0.9 > found.scores[0, 1]
    assert induction.detect(loaded, []).scores[0, 0] < 0.1


@pytest.mark.parametrize("name,offset", [("echo", 0), ("induction", 1)])
def test_previous_occurrence_scores_equal_the_eager_attention_at_the_targets(name, offset):
    loaded = tiny_llama(seed=3)
    detector = create_plugin("detector", {"name": name, "length": 6, "repeats": 3, "n_sequences": 2, "seed": 5})
    found = detector.detect(loaded, [])
    tokens = repeated_random_tokens(256, 6, 3, 2, seed=5, exclude={0, 1, 2})
    expected = np.zeros((3, 4))
    for row in tokens:
        ids = [1] + row.tolist()
        for layer, attention in enumerate(eager_attentions(loaded, ids)):
            for head in range(4):
                mass = []
                for p in range(7, 19):  # copies 2 and 3 (position 0 is BOS)
                    copy = (p - 1) // 6
                    mass.append(sum(attention[head, p, p - k * 6 + offset] for k in range(1, copy + 1)))
                expected[layer, head] += np.mean(mass) / 2
    np.testing.assert_allclose(found.scores, expected, atol=1e-5)
    assert detector.own_samples and found.extra["tokens_per_sequence"] == 19


def test_topk_mass_matches_a_hand_computation():
    row = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.6, 0.1, 0.1, 0.1, 0.1]])
    # keys sit at positions 10..14; span (12, 14) holds positions 12 and 13, k = 2.
    # head 0: its 2 largest are 0.4 (position 11, outside) and 0.3 (13, inside): 0.3 / 2
    # head 1: 0.6 (10, outside) and the first 0.1 by topk's order; at most one 0.1 inside: <= 0.1 / 2
    got = topk_mass(row, 10, (12, 14))
    assert got[0].item() == pytest.approx(0.15)
    values, index = row[1].topk(2)
    inside = sum(v.item() for v, i in zip(values, index) if 12 <= i.item() + 10 < 14)
    assert got[1].item() == pytest.approx(inside / 2)


def test_retrieval_score_topk_mass_runs_and_refuses_unknown_modes():
    loaded = tiny_llama(seed=1)
    prompt = list(range(3, 40))
    sample = Sample("s", prompt, "x", [5], (1, 37), 30, (10, 14), answer_span=(11, 13))
    detector = create_plugin("detector", {"name": "retrieval_score", "mode": "topk_mass", "min_recall": None,
                                          "threshold": None, "top_k": 3, "max_new_tokens": 3, "task": None})
    found = detector.detect(loaded, [sample])
    assert found.scores.shape == (3, 4) and (found.scores >= 0).all() and (found.scores <= 3 + 1e-9).all()
    with pytest.raises(ConfigError, match="mode='top2'"):
        create_plugin("detector", {"name": "retrieval_score", "mode": "top2", "task": None})


def test_qrhead_matches_a_direct_eager_computation():
    loaded = tiny_llama(seed=2)
    rng = np.random.default_rng(0)
    samples = [Sample(f"s{i}", rng.integers(3, 256, size=40).tolist(), "x", [5], (1, 30), 30, (8 + i, 20 + i))
               for i in range(2)]
    found = create_plugin("detector", {"name": "qrhead", "top_k": 2}).detect(loaded, samples)
    expected = np.zeros((3, 4))
    for sample in samples:
        start, end = sample.needle_span
        for layer, attention in enumerate(eager_attentions(loaded, sample.input_ids)):
            for head in range(4):
                per_token = attention[head, 30:40].mean(axis=0)[start:end]
                keep = per_token > per_token.mean() - 2 * per_token.std(ddof=1)
                expected[layer, head] += per_token[keep].sum() / len(samples)
    np.testing.assert_allclose(found.scores, expected, atol=1e-5)


def test_streaming_bias_keeps_sink_and_recent_keys():
    bias = streaming_bias(torch.arange(10), 10, sink_size=2, recent_size=3)
    for row in range(10):
        for key in range(10):
            allowed = key < 2 or row - 3 < key
            assert (bias[row, key] == 0) == allowed  # causality is the mask's business, not the bias's


def duo(**overrides):
    node = {"name": "duo_gates", "lr": 0.05, "reg_weight": 0.05, "n_passkeys": 2, "passkey_words": 2, "n_samples": 1,
            "seed": 0, **overrides}
    return create_plugin("detector", node)


def test_duo_gates_fall_to_zero_where_streaming_changes_nothing():
    loaded = tiny_llama(seed=0)
    detector = duo(steps=12, lr=0.12, sink_size=4, recent_size=200, context_tokens=40)
    ids, _ = passkey_sample(None, 256, 40, 2, 2, np.random.default_rng(0))
    assert len(ids) < 4 + 200  # every row sees all its keys in streaming attention too
    found = detector.detect(loaded, [])
    assert found.extra["gates"].max() < 0.2 and found.selected == []
    loss = found.extra["curves"]["loss"]
    assert loss[-1] < 0.5 * loss[0]
    assert max(found.extra["curves"]["distill_loss"]) < 1e-8  # the gated model is the full model here


def test_duo_gates_loss_falls_where_streaming_loses_keys():
    loaded = tiny_llama(seed=0)
    found = duo(steps=8, sink_size=2, recent_size=8, context_tokens=60).detect(loaded, [])
    curves = found.extra["curves"]
    assert max(curves["distill_loss"]) > 0  # streaming differs from full attention
    assert curves["loss"][-1] < curves["loss"][0]
    assert found.scores.shape == (3, 4) and (found.scores[:, 0] == found.scores[:, 1]).all()  # one gate per KV head


def test_qrhead_reads_the_gold_document_of_multidoc_qa(compose_config):
    from framework.model.loading import load_tokenizer

    config = compose_config("task=multidoc_qa")
    tokenizer = load_tokenizer(config["model"])
    sample = create_plugin("task", config["task"]).build_samples(tokenizer, "detect", 1)[0]
    gold = tokenizer.decode(sample.input_ids[sample.needle_span[0]:sample.needle_span[1]])
    assert sample.answer in gold  # the span qrhead sums over is the document that answers the question
    assert sample.context_span[0] < sample.needle_span[0] < sample.needle_span[1] <= sample.query_start
