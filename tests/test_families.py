"""The instrumentation is exact on every model family, checked against independent computations.

Each family is a tiny random-weight model built from its config class, with GQA, and with a
sliding window shorter than the test sequence where the family has one. The references are
the same weights run with ``attn_implementation="eager"`` (``output_attentions=True``), forward
hooks on ``o_proj`` / ``v_proj`` / the pre-RoPE query and key modules, and RoPE recomputed by
hand with ``rotate_half``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from framework.model import attention, rope  # noqa: E402
from framework.model.attention import AttentionEdit, RowCapture, instrumented, mean_head_outputs  # noqa: E402

SEQ, WINDOW, HEAD_DIM, N_HEADS, N_KV = 40, 8, 16, 4, 2
COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=N_HEADS,
    num_key_value_heads=N_KV, head_dim=HEAD_DIM, max_position_embeddings=512, initializer_range=0.3,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
ALTERNATING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # short original context, so scaling bites at SEQ


@dataclass(frozen=True)
class Family:
    config_cls: type
    model_cls: type
    extra: dict[str, Any] = field(default_factory=dict)
    pre_rope: tuple[str, str] = ("q_proj", "k_proj")  # the modules whose outputs RoPE rotates
    heads_first: bool = False  # pre-RoPE module output is [b, heads, s, d] rather than [b, s, heads * d]


FAMILIES = {
    "llama2": Family(LlamaConfig, LlamaForCausalLM),
    "llama31": Family(LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LLAMA3)),
    "qwen2": Family(Qwen2Config, Qwen2ForCausalLM),
    "olmo2": Family(Olmo2Config, Olmo2ForCausalLM, pre_rope=("q_norm", "k_norm")),
    "gemma2": Family(Gemma2Config, Gemma2ForCausalLM, dict(
        ALTERNATING, query_pre_attn_scalar=32, attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
    "gemma3": Family(Gemma3TextConfig, Gemma3ForCausalLM, dict(ALTERNATING, query_pre_attn_scalar=32),
                     pre_rope=("q_norm", "k_norm"), heads_first=True),
    "mistral": Family(MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
}
NAMES = list(FAMILIES)


@lru_cache(maxsize=None)
def _build(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.model_cls(family.config_cls(**COMMON, **family.extra)).eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention.install(model)
    return model, eager


def build(name: str, fresh: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(instrumented model, eager copy with the same weights); ``fresh`` for a private copy."""
    model, eager = _build(name)
    return (copy.deepcopy(model), eager) if fresh else (model, eager)


def tokens(n: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


def window(model: torch.nn.Module, layer: int) -> int | None:
    """The layer's sliding window, read from the config (None: full causal attention)."""
    config = model.config
    types = getattr(config, "layer_types", None)
    if getattr(config, "sliding_window", None) is None or (types and types[layer] != "sliding_attention"):
        return None
    return config.sliding_window


def allowed(model: torch.nn.Module, layer: int, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[len(q_pos), n_keys] bool: causal, within the layer's window (written out by hand)."""
    k = torch.arange(n_keys)[None, :]
    q = q_pos[:, None]
    ok = k <= q
    if window(model, layer) is not None:
        ok &= k > q - window(model, layer)
    return ok


class Recorder:
    """Forward hooks keeping the inputs (``pre=True``) or outputs of named submodules per layer."""

    def __init__(self, model: torch.nn.Module, name: str, pre: bool = False):
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i, layer in enumerate(layers(model)):
            module = getattr(layer.self_attn, name)
            if pre:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, i=i: self._keep(i, a[0])))
            else:
                self.handles.append(module.register_forward_hook(lambda m, a, out, i=i: self._keep(i, out)))

    def _keep(self, layer: int, tensor: torch.Tensor) -> None:
        self.seen.setdefault(layer, []).append(tensor.detach().clone())

    def __getitem__(self, layer: int) -> torch.Tensor:
        """Everything seen at this layer, concatenated along the sequence."""
        return torch.cat(self.seen[layer], dim=-2 if self.seen[layer][0].dim() == 4 else 1)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def per_head(flat: torch.Tensor) -> torch.Tensor:
    """[b, s, heads * d] -> [b, s, heads, d]."""
    return flat.view(*flat.shape[:2], -1, HEAD_DIM)


def run(model: torch.nn.Module, ids: torch.Tensor, edit: AttentionEdit | None = None,
        capture: RowCapture | None = None, record: tuple[str, ...] = (), pre: bool = True):
    """Logits of an instrumented forward, and recorders of the named modules' inputs/outputs."""
    recorders = {name: Recorder(model, name, pre=pre) for name in record}
    try:
        with torch.no_grad(), instrumented(model, edit, capture):
            logits = model(input_ids=ids).logits
    finally:
        for recorder in recorders.values():
            recorder.close()
    return logits, recorders


def capture_all(rows: torch.Tensor) -> tuple[RowCapture, dict[int, torch.Tensor]]:
    seen: dict[int, torch.Tensor] = {}
    return RowCapture(rows, lambda layer, probs: seen.__setitem__(layer, probs.detach())), seen


# --- (a) logits, (b) captured rows ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_eager_and_sdpa(name, monkeypatch):
    monkeypatch.setattr(attention, "_ROW_CHUNK", 7)  # the soft-capping path must be exact across chunks
    model, eager = build(name)
    ids = tokens()
    with torch.no_grad():
        reference = eager(input_ids=ids).logits
        plain = model(input_ids=ids).logits  # outside a block: the registered function, no plan
    logits, _ = run(model, ids)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(plain, reference, atol=2e-5, rtol=1e-4)
    if model.config.model_type != "gemma2":  # SDPA refuses soft-capping
        sdpa = copy.deepcopy(eager)
        sdpa.set_attn_implementation("sdpa")
        with torch.no_grad():
            torch.testing.assert_close(sdpa(input_ids=ids).logits, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_captured_rows_equal_eager_attention_rows(name):
    model, eager = build(name)
    ids = tokens()
    rows = torch.tensor([0, 3, WINDOW, 17, SEQ - 1])  # rows past the window see it cut
    capture, seen = capture_all(rows)
    run(model, ids, capture=capture)
    with torch.no_grad():
        full = eager(input_ids=ids, output_attentions=True).attentions
    assert sorted(seen) == list(range(len(full)))
    for layer, probs in seen.items():
        assert probs.shape == (1, N_HEADS, len(rows), SEQ)
        torch.testing.assert_close(probs, full[layer][:, :, rows].float(), atol=1e-5, rtol=1e-4)
    assert any(window(model, l) for l in seen) == (name in ("gemma2", "gemma3", "mistral"))


# --- (c) head masks -------------------------------------------------------------------------------


def uniform_by_hand(model: torch.nn.Module, values: torch.Tensor, layer: int, head: int, q_pos: torch.Tensor) -> torch.Tensor:
    """Mean of the head's value vectors over the keys each query may attend to: [len(q_pos), d]."""
    v = per_head(values)[0, :, head // (N_HEADS // N_KV)]  # [keys, d] of the head's KV head
    weights = allowed(model, layer, q_pos, v.shape[0]).float()
    return (weights @ v) / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("mode", ["zero", "mean", "uniform"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_masked_head_changes_only_that_head(name, layer, mode):
    model, _ = build(name)
    ids, head = tokens(), 2
    means = {(layer, head): torch.linspace(-1, 1, HEAD_DIM)} if mode == "mean" else None
    edit = AttentionEdit.mask_heads([(layer, head)], mode, mean_outputs=means)
    base_logits, base = run(model, ids, record=("o_proj",))
    logits, masked = run(model, ids, edit, record=("o_proj",))
    _, values = run(model, ids, record=("v_proj",), pre=False)
    for l in range(layer):
        torch.testing.assert_close(masked["o_proj"][l], base["o_proj"][l], atol=0, rtol=0)
    before, after = per_head(base["o_proj"][layer]), per_head(masked["o_proj"][layer])
    others = [h for h in range(N_HEADS) if h != head]
    torch.testing.assert_close(after[:, :, others], before[:, :, others], atol=1e-6, rtol=1e-5)
    expected = {
        "zero": torch.zeros(SEQ, HEAD_DIM),
        "mean": torch.linspace(-1, 1, HEAD_DIM).expand(SEQ, HEAD_DIM),
        "uniform": lambda: uniform_by_hand(model, values["v_proj"][layer], layer, head, torch.arange(SEQ)),
    }[mode]
    expected = expected() if callable(expected) else expected
    torch.testing.assert_close(after[0, :, head], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before[0, :, head], expected, atol=1e-3)  # the mask did something
    assert not torch.allclose(logits, base_logits, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_uniform_decode_step_by_hand(name):
    """Decode phase only: the prefill is untouched; the new token's head output is the mean of
    every value it may see, cached ones included (the window cuts them on sliding layers)."""
    model, _ = build(name)
    ids, layer, head = tokens(), 0, 1
    edit = AttentionEdit.mask_heads([(layer, head)], "uniform", phase="decode")
    probe = Recorder(model, "v_proj"), Recorder(model, "o_proj", pre=True)
    try:
        with torch.no_grad():
            clean = model(input_ids=ids, use_cache=True)
            with instrumented(model, edit):
                prefill = model(input_ids=ids, use_cache=True)
                model(input_ids=tokens(1, seed=5), cache=prefill.cache)
    finally:
        for recorder in probe:
            recorder.close()
    torch.testing.assert_close(prefill.logits, clean.logits, atol=0, rtol=0)
    values = torch.cat([probe[0].seen[layer][1], probe[0].seen[layer][2]], dim=1)  # edited run's prefill + step
    step = per_head(probe[1].seen[layer][2])[0, 0, head]
    torch.testing.assert_close(step, uniform_by_hand(model, values, layer, head, torch.tensor([SEQ]))[0],
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_mean_head_outputs_average_what_o_proj_reads(name):
    model, eager = build(name)
    sequences = [tokens(n, seed=n).tolist()[0] for n in (12, 30, 21)]
    means = mean_head_outputs(model, sequences)
    assert sorted(means) == [(l, h) for l in range(2) for h in range(N_HEADS)]
    seen = Recorder(eager, "o_proj", pre=True)  # the eager copy: independent of the instrumentation
    with torch.no_grad():
        for ids in sequences:
            eager(input_ids=torch.tensor([ids]))
    seen.close()
    for (layer, head), mean in means.items():
        torch.testing.assert_close(torch.from_numpy(mean), per_head(seen[layer])[0, :, head].mean(0), atol=1e-5, rtol=1e-4)
    # and the mean mode writes exactly that vector
    _, masked = run(model, tokens(), AttentionEdit.mask_heads([(1, 3)], "mean", mean_outputs=means), record=("o_proj",))
    torch.testing.assert_close(per_head(masked["o_proj"][1])[0, :, 3], torch.from_numpy(means[(1, 3)]).expand(SEQ, -1))


# --- (d) RoPE frequency pairs ------------------------------------------------------------------


def expected_inv_freq(model: torch.nn.Module, layer: int) -> np.ndarray:
    """The layer's RoPE frequencies from its config, formulas written out (llama3 included)."""
    config = model.config
    params = config.rope_parameters
    if "full_attention" in params:  # per-layer-type RoPE (Gemma-3)
        params = params[config.layer_types[layer]]
    freq = 1.0 / params["rope_theta"] ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    if params["rope_type"] == "llama3":
        factor, low, high, original = (params[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        wavelength = 2 * np.pi / freq
        smooth = np.clip((original / wavelength - low) / (high - low), 0, 1)
        freq = np.where(wavelength < original / high, freq,
                        np.where(wavelength > original / low, freq / factor, (1 - smooth) * freq / factor + smooth * freq))
    return freq


@pytest.mark.parametrize("name", NAMES)
def test_layer_frequencies_are_the_models_own(name):
    model, _ = build(name)
    per_layer = rope.layer_inv_freq(model)
    assert per_layer.shape == (2, HEAD_DIM // 2)
    rotary = model.model.rotary_emb
    for layer in range(2):
        np.testing.assert_allclose(per_layer[layer], expected_inv_freq(model, layer), rtol=1e-5)
        own = getattr(rotary, f"{model.config.layer_types[layer]}_inv_freq", None) if name == "gemma3" else rotary.inv_freq
        np.testing.assert_array_equal(per_layer[layer], own.numpy())
    if name == "gemma3":  # local and global layers really differ; the global ones are the model's default
        assert not np.allclose(per_layer[0], per_layer[1])
        np.testing.assert_array_equal(rope.model_inv_freq(model), per_layer[1])
    if name == "llama31":  # the scaling is in there
        assert not np.allclose(per_layer[0], 1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))


def rotate(x: torch.Tensor, inv_freq: np.ndarray) -> torch.Tensor:
    """rotate_half RoPE of x [b, heads, s, d] at positions 0 .. s-1, by hand."""
    angles = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * torch.from_numpy(inv_freq).double()[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def scores_by_hand(model: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, inv_freq: np.ndarray,
                   scale: torch.Tensor) -> torch.Tensor:
    """Softmax rows [b, heads, s, s] from pre-RoPE q [b, heads, s, d] and k [b, kv, s, d]; ``scale``
    [heads, d] is applied to q BEFORE the rotation (it must commute with it)."""
    module = layers(model)[layer].self_attn
    q = rotate(q * scale[None, :, None, :], inv_freq)
    k = rotate(k, inv_freq).repeat_interleave(N_HEADS // N_KV, dim=1)
    scores = q @ k.transpose(-1, -2) * module.scaling
    if getattr(model.config, "attn_logit_softcapping", None):
        cap = model.config.attn_logit_softcapping
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed(model, layer, torch.arange(q.shape[2]), k.shape[2]), float("-inf"))
    return scores.softmax(-1)


def pre_rope(recorder: Recorder, family: Family, layer: int) -> torch.Tensor:
    x = recorder[layer]
    return x if family.heads_first else per_head(x).transpose(1, 2)


@pytest.mark.parametrize("name", NAMES)
def test_frequency_pair_masks_by_hand(name):
    """Zero pair j of head 0 and scale pairs of head 1 by real values (both via rope.pair_scale);
    the captured rows equal scores recomputed with rotate_half RoPE at the layer's own
    frequencies, the scale applied before rotation. This holds only if the pair dims share a
    rotation (rotate_half layout) and the frequencies are right per layer."""
    model, _ = build(name)
    family, ids, j = FAMILIES[name], tokens(), HEAD_DIM // 2 - 1
    keep = np.ones(HEAD_DIM // 2, dtype=bool)
    keep[j] = False
    real = np.linspace(0.2, 1.5, HEAD_DIM // 2).astype(np.float32)
    scale = torch.ones(N_HEADS, HEAD_DIM)
    scale[0], scale[1] = torch.from_numpy(rope.pair_scale(keep)).float(), torch.from_numpy(rope.pair_scale(real))
    edit = AttentionEdit(query_scale={(l, h): scale[h] for l in range(2) for h in (0, 1)})
    capture, seen = capture_all(torch.arange(SEQ))
    _, recorded = run(model, ids, edit, capture, record=family.pre_rope, pre=False)
    per_layer = rope.layer_inv_freq(model)
    for layer in range(2):
        q, k = (pre_rope(recorded[m], family, layer) for m in family.pre_rope)
        by_hand = scores_by_hand(model, layer, q, k, per_layer[layer], scale)
        torch.testing.assert_close(seen[layer], by_hand, atol=1e-5, rtol=1e-4)
        if name == "gemma3":  # the other layer type's frequencies would not do
            assert not torch.allclose(seen[layer], scores_by_hand(model, layer, q, k, per_layer[1 - layer], scale), atol=1e-3)


def set_pair_frequency(model: torch.nn.Module, pair: int, value: float) -> None:
    """Change the rotation frequency of one pair in every rotary buffer the model uses."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name.endswith("inv_freq") and "original" not in name:
                buffer[pair] = value


@pytest.mark.parametrize("name", NAMES)
def test_zeroed_pair_removes_its_frequency(name):
    """With pair j zeroed in the query (rope.pair_dims), q.k no longer depends on inv_freq[j]:
    changing that frequency leaves the edited head's scores, and with every head edited the whole
    model, unchanged, while unedited scores do change."""
    model, _ = build(name)
    changed, _ = build(name, fresh=True)
    j, head = 2, 1
    dims = rope.pair_dims([j], HEAD_DIM)
    assert dims.tolist() == [j, j + HEAD_DIM // 2]
    set_pair_frequency(changed, j, 0.77)
    ids, rows = tokens(), torch.arange(SEQ)

    def layer0_rows(m: torch.nn.Module, edit: AttentionEdit) -> torch.Tensor:
        capture, seen = capture_all(rows)
        run(m, ids, edit, capture)
        return seen[0][0]

    one_head = AttentionEdit.zero_query_dims({(0, head): dims}, HEAD_DIM)
    before, after = layer0_rows(model, one_head), layer0_rows(changed, one_head)
    torch.testing.assert_close(after[head], before[head], atol=1e-6, rtol=1e-5)
    others = [h for h in range(N_HEADS) if h != head]
    assert (after[others] - before[others]).abs().max() > 1e-2

    every_head = AttentionEdit.zero_query_dims({(l, h): dims for l in range(2) for h in range(N_HEADS)}, HEAD_DIM)
    torch.testing.assert_close(run(changed, ids, every_head)[0], run(model, ids, every_head)[0], atol=1e-5, rtol=1e-4)
    assert (run(changed, ids)[0] - run(model, ids)[0]).abs().max() > 1e-2


# --- gradients through real-valued masks ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_real_valued_pair_mask_is_differentiable(name):
    """A learnable per-pair mask (the utility score's u) gets exact gradients through logits and
    captured rows, over several forward passes in one block (checked against central finite
    differences)."""
    model = build(name, fresh=True)[0].double()
    ids, layer, head = tokens(24), 1, 2
    direction = torch.linspace(-1, 1, HEAD_DIM // 2, dtype=torch.float64)

    def loss(u: torch.Tensor) -> torch.Tensor:
        edit = AttentionEdit(query_scale={(layer, head): rope.pair_scale(u)})
        seen: list[torch.Tensor] = []
        capture = RowCapture(torch.arange(10, 24), lambda l, p: seen.append(p[0, head]) if l == layer else None)
        with instrumented(model, edit, capture):
            first = model(input_ids=ids).logits
            second = model(input_ids=ids.flip(1)).logits
        return first.square().mean() + second.square().mean() + seen[0].square().sum() + seen[1].square().sum()

    u = torch.full((HEAD_DIM // 2,), 0.6, dtype=torch.float64, requires_grad=True)
    loss(u).backward()
    assert u.grad is not None and torch.isfinite(u.grad).all() and u.grad.abs().max() > 0
    eps = 1e-3  # the families' RMSNorms compute in float32 even in a float64 model: FD is good to ~1e-3
    with torch.no_grad():
        numeric = (loss(u + eps * direction) - loss(u - eps * direction)) / (2 * eps)
    torch.testing.assert_close(u.grad @ direction, numeric, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_retrieval_score_reads_absolute_positions_on_every_layer(name):
    """Wu et al.'s top-1 attended position per head at each greedy decode step, against the eager
    copy's attention rows over the whole sequence: equal on full and sliding-window layers alike
    (a sliding layer's cache holds only its window, so its rows are shorter than the sequence)."""
    from framework.model.loading import prepare
    from plugins.detectors.retrieval_score import greedy_top1

    model, eager = build(name, fresh=True)
    model.generation_config.eos_token_id = None  # decode every step
    prompt = tokens().tolist()[0]
    generated, top1 = greedy_top1(prepare(model, None, name), prompt, max_new_tokens=4)
    sequence = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        rows = eager(input_ids=sequence, output_attentions=True).attentions  # per layer [1, heads, seq, seq]
    for step in range(len(generated)):
        expected = np.stack([a[0, :, SEQ - 1 + step].argmax(-1).numpy() for a in rows])
        np.testing.assert_array_equal(top1[step], expected)
    if window(model, 0) is not None:  # the window's keys only: positions outside it never come out
        assert (top1[:, 0] > SEQ - 1 - WINDOW).all()
