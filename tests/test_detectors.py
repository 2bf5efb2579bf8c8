"""Detectors against independent computations: the retrieval score on hand-built copy patterns
and on a tiny model's decoding recomputed from eager attentions, the utility optimiser on a
problem with planted dims, qnorm against a row-by-row norm loop, and the instrumentation the
detectors add (decode-step rows, attention inputs) against eager attention and the head outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import MistralConfig, MistralForCausalLM

from framework.interfaces import ConfigError, Sample, Task
from framework.model.attention import RowCapture, attention_probs, attention_rows, instrumented, key_bias, mean_head_outputs
from framework.model.loading import prepare
from framework.registry import get_registry
from plugins.detectors.qnorm import QueryNorm
from plugins.detectors.retrieval_score import RetrievalScore, copy_scores, greedy_top1, word_recall
from plugins.detectors.utility import Utility, _batch, solve_utility
from plugins.tasks.niah import NIAH
from plugins.tasks.passkey import Passkey

A, B = 7, 9  # the only tokens the copying model below can generate
get_registry()  # registration names the plugin classes (``Detector.name``)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def copier():
    """tiny_llama whose unembedding is zero except two opposite rows: it generates only A or B,
    so a prompt full of A and B gives heads many chances to attend to the token they emit."""
    model = tiny_llama()
    head = torch.zeros_like(model.model.lm_head.weight)
    head[A] = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(1))
    head[B] = -head[A]
    model.model.lm_head.weight = torch.nn.Parameter(head)
    return model


def needle_sample(ids: list[int], needle: tuple[int, int], answer: tuple[int, int] | None, name: str = "s") -> Sample:
    return Sample(id=name, input_ids=ids, answer="", answer_ids=[], context_span=(1, len(ids)), query_start=len(ids) - 1,
                  needle_span=needle, answer_span=answer)


def copy_prompt(seed: int = 0, length: int = 40) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.choice([A, B, 50, 60, 70], size=length, p=[0.35, 0.35, 0.1, 0.1, 0.1]).tolist()


# --- retrieval score ---------------------------------------------------------------------------


def test_copy_scores_of_a_hand_built_pattern():
    prompt = [1, 5, 6, 7, 6, 9, 6, 3]  # span (2, 6) holds 6 7 6 9: four tokens
    tokens = [6, 7, 6, 6]
    top1 = np.array([  # [steps, layers=1, heads=4]
        [[2, 3, 6, 2]],  # heads 0, 3 copy pos 2; head 1 attends pos 3 (7) but 6 is generated; head 2: pos 6 is outside
        [[3, 3, 6, 5]],  # head 0 and head 1 copy pos 3 (7); head 3 attends 9 while 7 is generated
        [[4, 2, 1, 9]],  # head 0 copies pos 4, head 1 pos 2; head 3 attends a generated position (9)
        [[2, 1, 6, 2]],  # heads 0 and 3 copy pos 2 again
    ])
    unique = copy_scores(top1, tokens, prompt, (2, 6))
    np.testing.assert_allclose(unique, [[3 / 4, 2 / 4, 0, 1 / 4]])
    every_step = copy_scores(top1, tokens, prompt, (2, 6), unique_positions=False)
    np.testing.assert_allclose(every_step, [[4 / 4, 2 / 4, 0, 2 / 4]])
    # the span end is exclusive and its start inclusive: position 6 counts once the span grows
    np.testing.assert_allclose(copy_scores(top1, tokens, prompt, (2, 7)), [[3 / 5, 2 / 5, 1 / 5, 1 / 5]])
    assert not copy_scores(top1, tokens, prompt, (3, 3)).any()


def test_word_recall_is_rouge1_recall():
    assert word_recall("1234567", " 1234567.") == 1.0
    assert word_recall("the blue key", "A blue door") == pytest.approx(1 / 3)
    assert word_recall("1234567", " 123456") == 0.0


def test_decode_capture_equals_eager_rows(llama):
    prompt = copy_prompt(3, 20)
    tokens, top1 = greedy_top1(llama, prompt, 5)
    eager = copy.deepcopy(llama.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([prompt + tokens[:-1]]), output_attentions=True)
    rows = len(prompt) - 1 + np.arange(len(tokens))  # the query that produced each token
    assert out.logits[0, rows].argmax(-1).tolist() == tokens
    expected = torch.stack([a[0, :, rows].argmax(-1) for a in out.attentions], dim=1).permute(2, 1, 0)  # [steps, layers, heads]
    np.testing.assert_array_equal(top1, expected.numpy())
    seen = []  # a decode capture takes one row per step and ignores prefill passes; the default, the opposite
    for phase, expected_shapes in [("decode", {(1, 4, 1, 22), (1, 4, 1, 23)}), ("prefill", {(1, 4, 2, 21)})]:
        seen.clear()
        with torch.no_grad(), instrumented(llama.model, capture=RowCapture(torch.tensor([0, 5]), lambda l, p: seen.append(p), phase)):
            cache = llama.model(input_ids=torch.tensor([prompt]), use_cache=True).cache
            for token in tokens[:2]:
                cache = llama.model(input_ids=torch.tensor([[token]]), cache=cache).cache
        assert {tuple(p.shape) for p in seen} == expected_shapes


def brute_force_scores(model, prompt: list[int], span: tuple[int, int], steps: int, unique: bool) -> np.ndarray:
    """Generation and per-step argmax from one eager forward over prompt + output, counted in loops."""
    eager = copy.deepcopy(model.model)
    eager.set_attn_implementation("eager")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(eager(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        attentions = eager(input_ids=torch.tensor([ids[:-1]]), output_attentions=True).attentions
    scores = np.zeros((len(attentions), attentions[0].shape[1]))
    for layer, attention in enumerate(attentions):
        for head in range(attention.shape[1]):
            copied = []
            for step in range(steps):
                position = int(attention[0, head, len(prompt) - 1 + step].argmax())
                if span[0] <= position < span[1] and prompt[position] == ids[len(prompt) + step]:
                    copied.append(position)
            scores[layer, head] = len(set(copied) if unique else copied) / (span[1] - span[0])
    return scores


@pytest.mark.parametrize("unique", [True, False])
def test_retrieval_score_end_to_end_matches_brute_force(copier, unique):
    prompt = copy_prompt()
    sample = needle_sample(prompt, needle=(1, len(prompt)), answer=(10, 30))
    for span, used in [("answer", (10, 30)), ("needle", (1, len(prompt)))]:
        detector = RetrievalScore(span=span, min_recall=None, unique_positions=unique, max_new_tokens=8)
        result = detector.detect(copier, [sample])
        expected = brute_force_scores(copier, prompt, used, 8, unique)
        np.testing.assert_allclose(result.scores, expected)
        assert result.scores.max() > 0 and 0 <= result.scores.min() and result.scores.max() <= 1
    fallback = RetrievalScore(min_recall=None, unique_positions=unique, max_new_tokens=8)
    whole = needle_sample(prompt, needle=(1, len(prompt)), answer=None)
    np.testing.assert_allclose(fallback.detect(copier, [whole]).scores, brute_force_scores(copier, prompt, (1, len(prompt)), 8, unique))


class _ByName(Task):
    """A task that marks trials answered by sample id (the copier has no tokenizer)."""

    def build_samples(self, tokenizer, split, seed):
        return []

    def score(self, sample, output):
        return 0.0 if sample.id == "missed" else 1.0


def test_trials_below_min_recall_are_left_out(copier):
    samples = [needle_sample(copy_prompt(s), (1, 41), (5, 35), name) for s, name in [(0, "hit"), (1, "missed"), (2, "hit")]]
    kept = RetrievalScore(min_recall=0.5, task=_ByName(), max_new_tokens=6, threshold=None, top_k=3).detect(copier, samples)
    every = [RetrievalScore(min_recall=None, max_new_tokens=6).detect(copier, [s]).scores for s in samples]
    np.testing.assert_allclose(kept.scores, (every[0] + every[2]) / 2)
    assert not np.allclose(kept.scores, np.mean(every, axis=0))
    assert kept.extra["recall"] == [1.0, 0.0, 1.0] and kept.extra["kept_trials"] == 2 and len(kept.selected) == 3


# --- utility -----------------------------------------------------------------------------------


def planted_problem(rows: list[int], seed: int = 0):
    """Samples of different lengths for 4 query heads on 2 KV heads (GQA), causal: the keys are
    zero in dims 4..7, so those query dims cannot change any score, while dims 0..3 set sharp ones."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for length in rows:
        q = 2 * torch.randn(1, 4, length, 8, generator=g)
        k = 2 * torch.randn(1, 2, length, 8, generator=g)
        k[..., 4:] = 0
        v = torch.randn(1, 2, length, 8, generator=g)
        positions = torch.arange(length)
        parts.append((q, k, v, key_bias(None, positions, length, length)))
    return parts


def test_utility_recovers_planted_dims():
    parts = planted_problem([24, 17, 30])
    batch = _batch(parts)
    # padding is exact: each sample's rows equal its unpadded attention output
    out = attention_rows(*batch[:3], batch[3], 8**-0.5, torch.arange(30))
    for i, (q, k, v, _) in enumerate(parts):
        n = q.shape[2]
        torch.testing.assert_close(out[i, :, :n], attention_rows(q, k, v, None, 8**-0.5, torch.arange(n))[0])
    u = solve_utility(*batch, 8**-0.5)
    assert u.shape == (4, 8)
    assert (u[:, :4] > 0.8).all() and (u[:, 4:] < 0.5).all()
    torch.testing.assert_close(solve_utility(*batch, 8**-0.5), u, atol=0, rtol=0)  # deterministic


def test_attention_inputs_reproduce_head_outputs():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, pad_token_id=0)
    for model in (tiny_llama().model, prepare(MistralForCausalLM(config).eval(), None, "tiny_mistral").model):
        inputs, outputs = {}, {}
        ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), instrumented(model, head_outputs=outputs.__setitem__, inputs=inputs.__setitem__):
            model(input_ids=ids)
        rows = torch.arange(5, 20)
        for layer, x in inputs.items():
            recomputed = attention_rows(x.query, x.key, x.value, x.attention_mask, x.scaling, torch.arange(20), x.softcap)
            torch.testing.assert_close(recomputed.transpose(1, 2), outputs[layer], atol=1e-5, rtol=1e-4)
            bias = key_bias(x.attention_mask, rows, 20, 20)
            torch.testing.assert_close(attention_probs(x.query[:, :, rows], x.key, bias, x.scaling, torch.arange(15)),
                                       attention_probs(x.query, x.key, x.attention_mask, x.scaling, rows))
        assert any(x.attention_mask is not None for x in inputs.values()) == (model.config.model_type == "mistral")


def test_utility_detector_on_a_tiny_model(llama):
    ids = torch.randint(3, 256, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    sample = Sample("s", [1] + ids[:24], "", ids[24:], (1, 20), 20, (5, 10))
    result = Utility(steps=30, top_k=5).detect(llama, [sample])
    utility = result.extra["utility"]
    assert utility.shape == (3, 4, 16) and utility.min() >= 0 and utility.max() <= 1
    assert result.extra["low_utility_dims"][(1, 2)] == [j for j in range(16) if utility[1, 2, j] < 0.5]
    low_frequency = [4, 5, 6, 7, 12, 13, 14, 15]  # rotate_half: pairs 4..7 have the smallest inv_freq
    np.testing.assert_allclose(result.scores, utility[..., low_frequency].mean(-1), rtol=1e-6)
    assert len(result.selected) == 5 and set(result.selected) == {
        (int(i) // 4, int(i) % 4) for i in np.argsort(-result.scores.ravel(), kind="stable")[:5]}
    kept = Utility(steps=30, score="kept").head_scores(utility, np.stack([llama.inv_freq] * 3))
    np.testing.assert_allclose(kept, (utility >= 0.5).sum(-1) / 16)


def test_teacher_forced_detection_passes_keep_no_kv_cache():
    """attn_mass, utility and the mean head outputs read each pass once: a KV cache built there
    would be memory for nothing (16 GiB per pass at 128K on Llama-3.1-8B)."""
    model = tiny_llama()
    caches: list[object] = []
    model.model.register_forward_hook(lambda module, args, output: caches.append(output.get("cache")))
    ids = torch.randint(3, 256, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    sample = Sample("s", [1] + ids[:24], "", ids[24:], (1, 20), 20, (5, 10))
    get_registry().create("detector", {"name": "attn_mass", "threshold": None, "top_k": 2}).detect(model, [sample])
    Utility(steps=2, top_k=2).detect(model, [sample])
    mean_head_outputs(model.model, [ids])
    assert len(caches) == 3 and caches == [None] * 3


# --- qnorm and configs -------------------------------------------------------------------------


def test_qnorm_equals_a_row_norm_loop(llama):
    result = QueryNorm().detect(llama, [])
    per_dim = result.extra["per_dim"]
    for layer, block in enumerate(llama.model.model.layers):
        weight = block.self_attn.q_proj.weight.detach().numpy()
        for head in range(4):
            for dim in range(16):
                assert per_dim[layer, head, dim] == pytest.approx(np.linalg.norm(weight[head * 16 + dim], 1), rel=1e-5)
    np.testing.assert_allclose(result.scores, per_dim.sum(-1), rtol=1e-6)


def test_detector_configs_compose(compose_config):
    registry = get_registry()
    node = compose_config("+detector=retrieval_score")["detector"]
    detector = registry.create("detector", node)
    assert isinstance(detector, RetrievalScore) and isinstance(detector.task, NIAH)
    assert (detector.threshold, detector.span, detector.min_recall, detector.max_new_tokens) == (0.1, "answer", 0.5, 12)
    node = compose_config("task=passkey", "+detector=retrieval_score", "detector.span=needle")["detector"]
    assert isinstance(registry.create("detector", node).task, Passkey)
    utility = registry.create("detector", compose_config("+detector=utility", "detector.rows=all")["detector"])
    assert isinstance(utility, Utility) and (utility.rows, utility.score, utility.top_k, utility.steps) == ("all", "lowfreq", 20, 200)
    qnorm = registry.create("detector", compose_config("+detector=qnorm", "detector.score=lowfreq_share")["detector"])
    assert isinstance(qnorm, QueryNorm) and (qnorm.score, qnorm.top_k) == ("lowfreq_share", 20)
    for name, bad in [("retrieval_score", "detector.span=sentence"), ("retrieval_score", "detector.min_recall=2"),
                      ("utility", "detector.score=mean")]:
        with pytest.raises(ConfigError):
            registry.create("detector", compose_config(f"+detector={name}", bad)["detector"])
