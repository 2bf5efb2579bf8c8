"""The attention layer's API: edits and their phases, the RoPE helpers, and the two interventions
built on them. Exactness per model family is in ``test_families.py``."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from framework.interfaces import ConfigError  # noqa: E402
from framework.model import attention, rope  # noqa: E402
from framework.model.attention import AttentionEdit, RowCapture, instrumented  # noqa: E402
from framework.model.loading import prepare  # noqa: E402
from framework.registry import get_registry  # noqa: E402
from plugins.interventions.head_mask import HeadMask  # noqa: E402
from plugins.interventions.zero_lowfreq import ZeroLowFreq  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.3,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return prepare(LlamaForCausalLM(LlamaConfig(**TINY)), None, "tiny_llama")


@pytest.fixture(scope="module")
def gemma3():
    torch.manual_seed(0)
    config = Gemma3TextConfig(**TINY, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return prepare(Gemma3ForCausalLM(config), None, "tiny_gemma3")


def ids(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


# --- AttentionEdit --------------------------------------------------------------------------------


def test_edit_constructors_and_validation():
    edit = AttentionEdit.mask_heads([(0, 1), (2, 3)], "uniform", phase="decode")
    assert edit.head_masks == {(0, 1): "uniform", (2, 3): "uniform"} and edit.phase == "decode"
    means = {(0, 1): np.ones(16), (5, 5): np.zeros(16)}
    assert set(AttentionEdit.mask_heads([(0, 1)], "mean", mean_outputs=means).mean_outputs) == {(0, 1)}
    with pytest.raises(ValueError, match="no mean output"):
        AttentionEdit.mask_heads([(0, 1)], "mean")
    with pytest.raises(ValueError, match="mask mode"):
        AttentionEdit(head_masks={(0, 0): "random"})
    with pytest.raises(ValueError, match="phase"):
        AttentionEdit(phase="generate")
    assert [AttentionEdit(phase=p).applies_to(n) for p in ("prefill", "decode", "both") for n in (1, 7)] == [
        False, True, True, False, True, True]


def test_describe_is_json_ready():
    edit = AttentionEdit.zero_query_dims({(1, 2): [0, 8]}, head_dim=16)
    edit.head_masks = {(0, 0): "zero"}
    described = json.loads(json.dumps(edit.describe()))
    assert described == {"phase": "both", "head_masks": {"0.0": "zero"}, "query_dims": {"1.2": [0, 8]}}


def test_vectors_of_the_wrong_length_are_refused(llama):
    with pytest.raises(ValueError, match=r"shape \(16,\)"), instrumented(llama.model, AttentionEdit(query_scale={(0, 0): np.ones(8)})):
        llama.model(input_ids=ids())


def test_describe_accepts_tensors_that_need_gradients():
    u = torch.tensor([1.0, 0.5, 1.0, 0.0], requires_grad=True)
    assert AttentionEdit(query_scale={(0, 0): u}).describe()["query_dims"] == {"0.0": [1, 3]}


def test_boolean_query_scale_keeps_the_true_dims(llama):
    keep = np.ones(16, dtype=bool)
    keep[[3, 11]] = False
    captured = []
    capture = RowCapture(torch.arange(20), lambda layer, p: captured.append(p))
    with torch.no_grad():
        for edit in (AttentionEdit(query_scale={(0, 2): keep}),
                     AttentionEdit(query_scale={(0, 2): torch.from_numpy(keep)}),
                     AttentionEdit.zero_query_dims({(0, 2): [3, 11]}, 16)):
            with instrumented(llama.model, edit, capture):
                llama.model(input_ids=ids())
    n_layers = llama.info.n_layers
    first, second, third = captured[:n_layers], captured[n_layers:2 * n_layers], captured[2 * n_layers:]
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(a, c, atol=0, rtol=0)
        torch.testing.assert_close(b, c, atol=0, rtol=0)


def _active_edit(model):
    plan = attention._active.get().get(id(model))
    return None if plan is None else plan.edit


def test_instrumented_blocks_nest_and_restore(llama):
    inner, outer = AttentionEdit.mask_heads([(0, 0)]), AttentionEdit.mask_heads([(1, 1)])
    with instrumented(llama.model, outer):
        with instrumented(llama.model, inner):
            assert _active_edit(llama.model) is inner
        assert _active_edit(llama.model) is outer
    assert _active_edit(llama.model) is None
    assert llama.model.config._attn_implementation == attention.ATTN_IMPLEMENTATION  # never eager


def _last_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits[:, -1]


def test_two_models_in_one_process_keep_their_own_edits(llama):
    """Each model sees only the edit of its own block, also when the blocks nest, and a deep
    copy of a model is a model of its own."""
    import copy

    other = copy.deepcopy(llama.model)
    input_ids = ids()
    plain = _last_logits(llama.model, input_ids)
    masked_alone = None
    with instrumented(llama.model, AttentionEdit.mask_heads([(l, h) for l in range(3) for h in range(4)])):
        masked_alone = _last_logits(llama.model, input_ids)
    assert not torch.allclose(masked_alone, plain)  # the edit is strong enough to be seen

    with instrumented(llama.model, AttentionEdit.mask_heads([(l, h) for l in range(3) for h in range(4)])):
        with instrumented(other, AttentionEdit()):  # the copy, unedited, inside the original's block
            torch.testing.assert_close(_last_logits(other, input_ids), plain, atol=0, rtol=0)
            torch.testing.assert_close(_last_logits(llama.model, input_ids), masked_alone, atol=0, rtol=0)
        torch.testing.assert_close(_last_logits(other, input_ids), plain, atol=0, rtol=0)  # outside its own block


def test_threads_do_not_share_instrumented_blocks(llama):
    """A block open in one thread does not edit the same model's passes in another thread."""
    import threading

    input_ids = ids()
    plain = _last_logits(llama.model, input_ids)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def hold_block_open():
        with instrumented(llama.model, AttentionEdit.mask_heads([(l, h) for l in range(3) for h in range(4)])):
            seen["inside"] = _last_logits(llama.model, input_ids)
            entered.set()
            release.wait(timeout=30)

    worker = threading.Thread(target=hold_block_open)
    worker.start()
    assert entered.wait(timeout=30)
    seen["other thread"] = _last_logits(llama.model, input_ids)
    release.set()
    worker.join()
    assert not torch.allclose(seen["inside"], plain)
    torch.testing.assert_close(seen["other thread"], plain, atol=0, rtol=0)


# --- phases ---------------------------------------------------------------------------------------


def prefill_then_step(model, prefill_edit, step_edit):
    """Logits of a 20-token prefill and of one cached decode step, each under its own edit."""
    with torch.no_grad():
        with instrumented(model, prefill_edit):
            prefill = model(input_ids=ids(), use_cache=True)
        with instrumented(model, step_edit):
            step = model(input_ids=ids(1, seed=9), cache=prefill.cache)
    return prefill.logits, step.logits


@pytest.mark.parametrize("mode", ["zero", "uniform", "mean"])
def test_phase_selects_prefill_or_decode_passes(llama, mode):
    heads = [(0, 1), (1, 3)]
    means = {h: np.full(16, 0.5, dtype=np.float32) for h in heads} if mode == "mean" else None

    def edit(phase):
        return AttentionEdit.mask_heads(heads, mode, phase, means)

    clean = prefill_then_step(llama.model, None, None)
    masked_prefill = prefill_then_step(llama.model, edit("both"), None)
    masked_step = prefill_then_step(llama.model, None, edit("both"))
    # one edit over both passes gives exactly what applying it to the selected pass only gives
    for phase, expected in [("prefill", masked_prefill), ("decode", masked_step)]:
        got = prefill_then_step(llama.model, edit(phase), edit(phase))
        torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)
    assert not torch.allclose(masked_prefill[0], clean[0]) and not torch.allclose(masked_step[1], clean[1])
    torch.testing.assert_close(masked_step[0], clean[0], atol=0, rtol=0)


# --- RoPE helpers ---------------------------------------------------------------------------------


def test_frequency_pair_reading():
    inv_freq = 1.0 / 10000 ** (np.arange(0, 16, 2) / 16)  # descending: pair 7 is the lowest
    assert rope.pair_dims([0, 7], 16).tolist() == [0, 7, 8, 15]
    assert rope.lowest_frequency_dims(inv_freq, 4).tolist() == [6, 7, 14, 15]
    assert rope.highest_frequency_dims(inv_freq, 4).tolist() == [0, 1, 8, 9]
    assert rope.lowest_frequency_dims(inv_freq[::-1].copy(), 2).tolist() == [0, 8]  # by value, not position
    dims = rope.random_pair_dims(16, 6, np.random.default_rng(0))
    assert len(dims) == 6 and set((dims % 8).tolist()) == set((dims[:3] % 8).tolist())
    with pytest.raises(ConfigError):
        rope.lowest_frequency_dims(inv_freq, 3)
    with pytest.raises(ConfigError):
        rope.highest_frequency_dims(inv_freq, 18)


def test_pair_scale_numpy_and_differentiable_torch():
    assert rope.pair_scale(np.array([True, False])).tolist() == [True, False, True, False]
    u = torch.tensor([0.2, 0.9], requires_grad=True)
    scale = rope.pair_scale(u)
    (scale * torch.arange(4.0)).sum().backward()
    assert scale.tolist() == pytest.approx([0.2, 0.9, 0.2, 0.9]) and u.grad.tolist() == [2.0, 4.0]


def test_raw_index_reading():
    assert rope.first_raw_dims(3, 16).tolist() == [0, 1, 2]
    assert rope.last_raw_dims(3, 16).tolist() == [13, 14, 15]
    with pytest.raises(ConfigError):
        rope.first_raw_dims(0, 16)
    with pytest.raises(ConfigError):
        rope.last_raw_dims(17, 16)


def test_frequencies_per_layer_and_global(gemma3, llama):
    per_layer = rope.layer_inv_freq(gemma3.model)
    rotary = gemma3.model.model.rotary_emb
    np.testing.assert_array_equal(per_layer[[0, 2]], np.stack([rotary.sliding_attention_inv_freq.numpy()] * 2))
    np.testing.assert_array_equal(per_layer[1], rotary.full_attention_inv_freq.numpy())
    np.testing.assert_array_equal(gemma3.inv_freq, per_layer[1])  # prepare() works on Gemma-3, global freqs
    np.testing.assert_array_equal(rope.layer_inv_freq(llama.model), np.stack([llama.inv_freq] * 3))
    with pytest.raises(ConfigError, match="rotary"):
        rope.model_inv_freq(torch.nn.Linear(2, 2))


# --- interventions ---------------------------------------------------------------------------------


def test_head_mask_config_defaults_and_parameters(compose_config):
    registry = get_registry()
    plugin = registry.create("intervention", compose_config("+intervention=head_mask")["intervention"])
    assert isinstance(plugin, HeadMask) and (plugin.mode, plugin.phase) == ("zero", "both")
    node = compose_config("+intervention=head_mask", "intervention.mode=uniform", "intervention.phase=decode")
    plugin = registry.create("intervention", node["intervention"])
    assert (plugin.mode, plugin.phase) == ("uniform", "decode")
    with pytest.raises(ConfigError, match="mode"):
        HeadMask(mode="random")
    with pytest.raises(ConfigError, match="phase"):
        HeadMask(phase="always")


@pytest.mark.parametrize("mode", ["zero", "mean", "uniform"])
def test_head_mask_treatment_and_control_share_mode_and_phase(llama, mode):
    plugin = HeadMask(mode=mode, phase="prefill", mean_sequences=2)
    heads = [(0, 0), (0, 1), (2, 3)]
    treatment = plugin.treatment(llama, heads)
    control = plugin.control(llama, heads, np.random.default_rng(0))
    assert treatment.head_masks == {h: mode for h in heads} and treatment.phase == "prefill"
    assert set(control.head_masks.values()) == {mode} and control.phase == "prefill"
    assert sorted(l for l, _ in control.head_masks) == [0, 0, 2] and not set(control.head_masks) & set(heads)
    if mode == "mean":
        assert set(treatment.mean_outputs) == set(heads) and set(control.mean_outputs) == set(control.head_masks)
        assert all(v.shape == (16,) for v in treatment.mean_outputs.values())


def test_head_mask_means_come_from_fixed_reference_text(llama):
    class CharTokenizer:
        def __call__(self, text):
            return {"input_ids": [1] + [3 + ord(c) % 250 for c in text]}

    tokenized = type(llama)(llama.model, CharTokenizer(), llama.info, llama.inv_freq)
    plugin = HeadMask(mode="mean", mean_sequences=3)
    sequences = plugin.reference_sequences(tokenized)
    assert len(sequences) == 3 and sequences == HeadMask(mode="mean", mean_sequences=3).reference_sequences(tokenized)
    assert len({tuple(s) for s in sequences}) == 3 and all(s[0] == 1 for s in sequences)
    expected = attention.mean_head_outputs(llama.model, sequences, [(1, 2)])
    np.testing.assert_array_equal(plugin.treatment(tokenized, [(1, 2)]).mean_outputs[(1, 2)], expected[(1, 2)])
    assert len(plugin.reference_sequences(llama)) == 3  # no tokenizer: seeded random ids


def test_zero_lowfreq_uses_each_layers_frequencies(gemma3):
    plugin = ZeroLowFreq(n_dims=4)
    edit = plugin.treatment(gemma3, [(0, 1), (1, 2)])
    per_layer = rope.layer_inv_freq(gemma3.model)
    for (layer, head), scale in edit.query_scale.items():
        assert np.flatnonzero(scale == 0).tolist() == rope.lowest_frequency_dims(per_layer[layer], 4).tolist()
    with torch.no_grad(), instrumented(gemma3.model, edit):
        assert torch.isfinite(gemma3.model(input_ids=ids(30)).logits).all()
