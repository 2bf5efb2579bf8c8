"""Streaming heads (plugins/interventions/streaming_heads.py, framework.model.attention.StreamingWindow)
on tiny models of every family: a streamed head attends exactly to its sink + recent keys (by
hand in eager torch, float64), the SDPA window path equals the manual bias path in prefill and
greedy decoding, left padding changes no sample, and the intervention's bookkeeping (KV groups,
matched control, KV fraction, bad input) is checked against direct counts."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from framework.api import AttentionEdit, ConfigError, HeadEdit, StreamingWindow, instrumented, prepare
from framework.model import attention
from plugins.interventions.streaming_heads import StreamingHeads, full_attention_layers, kv_fraction_kept
from tests.test_families import COMMON, N_HEADS, N_KV, NAMES, build, window

SINK, RECENT, SEQ = 3, 6, 30


class ForceManual(HeadEdit):
    """A zero bias: the layer takes the manual path, where the window is a bias like any other."""

    heads = [(0, 0)]

    def bias(self, layer, rows, key_length, where):
        return torch.zeros(1, 1, len(rows), key_length)


@lru_cache(maxsize=None)
def family(name: str) -> torch.nn.Module:
    """The family's tiny model; Mistral's without its sliding window, which tests_families gives every
    layer (a sliding cache drops keys, so such layers have nothing left to stream)."""
    if name != "mistral":
        return build(name)[0]
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)).eval()
    attention.install(model)
    return model


def streamed(model) -> list[tuple[int, int]]:
    """Every head of the full-attention layers except query head 0, so KV group 0 is split
    between a full and a streaming head."""
    layers = full_attention_layers(prepare(model, None, "tiny"))
    assert layers
    return [(layer, h) for layer in layers for h in range(1, N_HEADS)]


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.randint(3, 256, (n,), generator=g)])
                       for n in lengths])
    mask = torch.stack([torch.cat([torch.zeros(width - n), torch.ones(n)]).long() for n in lengths])
    return ids, mask


def hand_outputs(inputs: attention.AttentionInputs, heads: list[int], pads: list[int], softcap,
                 sliding: int | None) -> torch.Tensor:
    """[batch, heads, q, dim] float64: softmax over exactly the sink + recent keys of each real row
    (and within the layer's sliding window, if it has one)."""
    q, k, v = (t.double() for t in (inputs.query, inputs.key, inputs.value))
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], len(heads), q.shape[2], v.shape[-1], dtype=torch.float64)
    offset = k.shape[2] - q.shape[2]
    for b, pad in enumerate(pads):
        for i in range(q.shape[2]):
            query_pos = offset + i - pad
            if query_pos < 0:
                continue
            keys = [j for j in range(pad, offset + i + 1) if ((j - pad) < SINK or query_pos - (j - pad) < RECENT)
                    and (sliding is None or offset + i - j < sliding)]
            for n, h in enumerate(heads):
                scores = k[b, h // group, keys] @ q[b, h, i] * inputs.scaling
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                out[b, n, i] = torch.softmax(scores, 0) @ v[b, h // group, keys]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_streamed_heads_attend_to_sink_and_recent_keys_only(name):
    model = family(name)
    heads = streamed(model)
    edit = AttentionEdit(parts=[StreamingWindow(heads, N_HEADS, SINK, RECENT)])
    ids, mask = padded_batch([SEQ, SEQ - 7])
    seen_inputs, seen_outputs = {}, {}
    with torch.no_grad(), instrumented(model, edit, inputs=lambda l, x: seen_inputs.setdefault(l, x),
                                       head_outputs=lambda l, o: seen_outputs.setdefault(l, o)):
        model(input_ids=ids, attention_mask=mask)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    for layer in {l for l, _ in heads}:
        layer_heads = [h for l, h in heads if l == layer]
        expected = hand_outputs(seen_inputs[layer], layer_heads, [0, 7], softcap, window(model, layer))
        got = seen_outputs[layer].transpose(1, 2)[:, layer_heads].double()
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1, :, 7:], expected[1, :, 7:], atol=1e-5, rtol=1e-4)


def greedy(model, ids, mask, edit, steps=4):
    with torch.no_grad(), instrumented(model, edit):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("prefill", ["both", "decode"])
@pytest.mark.parametrize("name", NAMES)
def test_window_path_equals_manual_path_and_padding_changes_nothing(name, prefill, monkeypatch):
    monkeypatch.setattr(attention, "_ROW_CHUNK", 8)  # several query chunks, windows across their edges
    model = family(name)
    window = StreamingWindow(streamed(model), N_HEADS, SINK, RECENT)
    fast = AttentionEdit(parts=[window], phase=prefill)
    manual = AttentionEdit(parts=[window, ForceManual()], phase=prefill)
    ids, mask = padded_batch([SEQ, SEQ - 9])
    tokens, logits = greedy(model, ids, mask, fast)
    manual_tokens, manual_logits = greedy(model, ids, mask, manual)
    torch.testing.assert_close(logits, manual_logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, manual_tokens)
    alone_tokens, alone_logits = greedy(model, ids[1:, 9:], mask[1:, 9:], fast)
    torch.testing.assert_close(logits[1:], alone_logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens[1:, 9:], alone_tokens)
    unedited = greedy(model, ids, mask, None)[1]
    assert (logits - unedited).abs().max() > 1e-3  # the window is long past at SEQ: it must bite


def test_attention_pass_reads_padding_and_positions():
    model, _ = build("llama2")
    passes = []

    class Spy(HeadEdit):
        heads = [(0, 0)]

        def bias(self, layer, rows, key_length, where):
            if layer == 0:
                passes.append((where, where.query_positions(rows), where.key_positions()))
            return None

    ids, mask = padded_batch([10, 6])
    greedy(model, ids, mask, AttentionEdit(parts=[Spy()]), steps=2)
    (prefill, q_pos, k_pos), (decode, dq, dk) = passes[0], passes[1]
    assert prefill.pad.tolist() == [0, 4] and decode.pad.tolist() == [0, 4]
    assert q_pos[1].tolist() == list(range(-4, 6)) and k_pos[0].tolist() == list(range(10))
    assert decode.decode and decode.key_length == 11 and dq.tolist() == [[10], [6]] and dk[1, -1].item() == 6


# --- the intervention -----------------------------------------------------------------------------


def loaded(name="llama2"):
    return prepare(build(name)[0], None, name)


def test_kv_head_granularity_keeps_whole_groups_and_control_matches_per_layer():
    model = loaded()
    group = N_HEADS // N_KV
    plugin = StreamingHeads(sink=SINK, recent=RECENT)
    selected = [(0, 1), (1, 0), (1, 3)]  # layer 0: KV head 0; layer 1: KV heads 0 and 1
    window = plugin.treatment(model, selected).parts[0]
    assert window.heads == [(0, h) for h in range(group, N_HEADS)]
    control = plugin.control(model, selected, np.random.default_rng(0)).parts[0]
    for layer, kept in ((0, 1), (1, 2)):
        streaming = [h for l, h in control.heads if l == layer]
        assert len(streaming) == (N_KV - kept) * group and all(h // group in {s // group for s in streaming}
                                                              for h in streaming)
    query_level = StreamingHeads(sink=SINK, recent=RECENT, granularity="query_head").treatment(model, selected)
    assert query_level.parts[0].heads == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert StreamingHeads(sink=SINK, recent=RECENT, keep="none").treatment(model, selected).parts[0].heads == [
        (l, h) for l in range(2) for h in range(N_HEADS)]


@pytest.mark.parametrize("name", ["llama2", "gemma3"])
def test_kv_fraction_kept_counts_cache_entries(name):
    model = loaded(name)
    plugin = StreamingHeads(sink=SINK, recent=RECENT)
    plugin.check_lengths([20, 40])
    edit = plugin.treatment(model, [(l, 0) for l in full_attention_layers(model)])
    fraction = plugin.condition_metrics(model, edit)["kv/fraction_kept"]
    if name == "llama2":  # one of two KV heads per layer kept: r = 1/2
        assert fraction == pytest.approx(0.5 + 0.5 * (SINK + RECENT) / 40)
    else:  # layer 0 slides (window 8, kept either way), layer 1 full: half its KV heads streamed
        assert fraction == pytest.approx((2 * 8 + 40 + (SINK + RECENT)) / (2 * 8 + 2 * 40))
    assert kv_fraction_kept(model, AttentionEdit(), 40) == 1.0


@pytest.mark.parametrize("options, message", [
    (dict(sink=-1), "sink=-1"), (dict(recent=0), "recent=0"), (dict(granularity="layer"), "granularity='layer'"),
    (dict(cache="paged"), "cache='paged'"), (dict(prefill="none"), "prefill='none'"), (dict(keep="all"), "keep='all'"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        StreamingHeads(**options)
    assert "\n" not in str(error.value)


def test_window_as_long_as_the_context_is_refused():
    with pytest.raises(ConfigError, match="shortest prompt"):
        StreamingHeads(sink=4, recent=256).check_lengths([260, 1024])


# --- the evicting cache ---------------------------------------------------------------------------


def evictable(model) -> list[tuple[int, int]]:
    """KV group 1 of every full-attention layer streams, and in the last one group 0 too (no KV head kept)."""
    layers = full_attention_layers(prepare(model, None, "tiny"))
    group = N_HEADS // N_KV
    return [(l, h) for l in layers for h in range(N_HEADS) if h >= group or l == layers[-1]]


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_evicted_cache_gives_the_masked_outputs(name, prefill):
    model = family(name)
    heads = evictable(model)
    masked = AttentionEdit(parts=[StreamingWindow(heads, N_HEADS, SINK, RECENT, prefill=prefill)])
    evicted = AttentionEdit(parts=[StreamingWindow(heads, N_HEADS, SINK, RECENT, prefill=prefill, evict=True)])
    ids, mask = padded_batch([SEQ, 5])  # the short one's sink leaves the recent span while decoding
    tokens, logits = greedy(model, ids, mask, masked, steps=8)
    with evicted.kv_cache(model) as cache:
        with torch.no_grad(), instrumented(model, evicted):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache=cache,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert all(layer.evicted for layer in cache.layers if hasattr(layer, "evict"))
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(out.sequences, tokens)


@pytest.mark.parametrize("name", NAMES)
def test_evicted_bytes_follow_the_formula(name):
    from framework.model.kv_cache import cache_nbytes
    from transformers import DynamicCache

    model = family(name)
    heads = evictable(model)
    edit = AttentionEdit(parts=[StreamingWindow(heads, N_HEADS, SINK, RECENT, evict=True)])
    ids = torch.randint(3, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=full, use_cache=True)
        with edit.kv_cache(model) as cache, instrumented(model, edit):
            model(input_ids=ids, cache=cache, use_cache=True)
            measured = cache_nbytes(cache)
    streaming_kv = len(heads) // (N_HEADS // N_KV)
    per_entry = 2 * model.config.head_dim * 4  # key and value, float32, batch 1
    assert measured == cache_nbytes(full) - streaming_kv * per_entry * (SEQ - SINK - RECENT)
    loaded = prepare(model, None, name)
    layers = full_attention_layers(loaded)
    plugin = StreamingHeads(sink=SINK, recent=RECENT, cache="evicted")
    plugin.check_lengths([SEQ])
    treatment = plugin.treatment(loaded, [(l, 0) for l in layers[:-1]])  # the same KV heads kept as above
    assert treatment.parts[0].heads == heads
    fraction = plugin.condition_metrics(loaded, treatment)["kv/fraction_kept"]
    if len(layers) == loaded.info.n_layers:  # no sliding layer: the intervention's accounting is the cache's
        r = (len(layers) * N_KV - streaming_kv) / (len(layers) * N_KV)
        assert fraction == pytest.approx(measured / cache_nbytes(full)) == pytest.approx(r + (1 - r) * (SINK + RECENT) / SEQ)


def test_a_window_beyond_the_task_lengths_is_refused_when_the_run_is_planned(compose_config):
    from framework.model.loading import model_info
    from framework.registry import get_registry
    from framework.runner.conditions import Plan

    config = compose_config("+detector=attn_mass", "+intervention=streaming_heads", "task.context_lengths=[256,1024]")
    with pytest.raises(ConfigError, match=r"sink \+ recent = 4 \+ 256 is at or beyond the shortest prompt \(256 tokens\)"):
        Plan.from_config(config, get_registry(), model_info(config["model"]))
