"""benchmarks/gpu_memory_model.py's formulas against what tiny random-weight models really allocate:
parameters, the KV cache after a prefill, the attention masks a pass builds, and captured rows."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Olmo2Config, Qwen2Config

from framework.model import masks as mask_rules
from framework.model.attention import RowCapture, attention_probs, instrumented

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_memory_model", ROOT / "benchmarks" / "gpu_memory_model.py")
memory_model = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = memory_model  # dataclasses look their module up by name
_spec.loader.exec_module(memory_model)

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256)
TINY = {  # GQA everywhere; head_dim other than hidden / heads where the config class takes one
    "llama": lambda: LlamaConfig(**SHAPE, head_dim=24),
    "mistral": lambda: MistralConfig(**SHAPE, head_dim=24, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPE),
    "olmo2": lambda: Olmo2Config(**SHAPE),
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=32, sliding_window=8, tie_word_embeddings=True),
}
PROMPT = 20  # longer than Gemma-2's tiny sliding window


def tiny_model(family: str) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    config = TINY[family]()
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval(), memory_model.Architecture.from_config(config)


def prompt(batch: int = 1, length: int = PROMPT) -> torch.Tensor:
    return torch.randint(4, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(TINY))
def test_parameter_counts_match_the_real_model(family):
    model, arch = tiny_model(family)
    real = sum(p.numel() for p in model.parameters())
    assert memory_model.meta_parameter_count(TINY[family]()) == real
    assert memory_model.parameter_formula(arch) == real


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kv_cache_formula_matches_the_cache_after_a_prefill(family):
    model, arch = tiny_model(family)
    with torch.inference_mode():
        cache = model(input_ids=prompt(batch=2), use_cache=True, logits_to_keep=1).cache
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert len(storages) == 2 * arch.layers
    assert sum(storages.values()) == memory_model.kv_cache_bytes(arch, PROMPT, batch=2, dtype_bytes=2)


@pytest.mark.parametrize("rules", [False, True])
@pytest.mark.parametrize(("family", "padded"), [("llama", False), ("llama", True), ("gemma2", False)])
def test_mask_formula_matches_the_masks_a_pass_builds(family, padded, rules, monkeypatch):
    if rules:  # the pass as long passes run it: masks kept as rules, none built whole
        monkeypatch.setattr(mask_rules, "DENSE_LIMIT", 0)
    model, arch = tiny_model(family)
    batch = 2 if padded else 1
    attention_mask = torch.ones(batch, PROMPT, dtype=torch.long)
    if padded:
        attention_mask[0, :3] = 0  # left padding
    masks: dict[int, int] = {}
    explicit = []

    def sink(layer, inputs):
        if inputs.attention_mask is not None:
            explicit.append(layer)
            if not isinstance(inputs.attention_mask, mask_rules.RuleMask):
                storage = inputs.attention_mask.untyped_storage()
                masks[storage.data_ptr()] = storage.nbytes()

    with torch.inference_mode(), instrumented(model, inputs=sink):
        model(input_ids=prompt(batch), attention_mask=attention_mask, logits_to_keep=1)
    assert memory_model.explicit_mask_needed(arch, PROMPT, padded) == bool(explicit)
    assert sum(masks.values()) == memory_model.resident_mask_bytes(arch, PROMPT, batch, padded)
    assert bool(masks) == (bool(explicit) and not rules)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_captured_rows_formula_matches_a_prefill_and_a_decode_capture(family):
    model, arch = tiny_model(family)
    ids = prompt()
    rows = torch.arange(PROMPT - 5, PROMPT)
    prefill_sizes, decode_sizes = [], []
    with torch.inference_mode():
        with instrumented(model, capture=RowCapture(rows, lambda layer, p: prefill_sizes.append(p.nbytes))):
            model(input_ids=ids, logits_to_keep=1)
        capture = RowCapture(torch.zeros(1, dtype=torch.long), lambda layer, p: decode_sizes.append(p.nbytes), phase="decode")
        with instrumented(model, capture=capture):  # as retrieval_score: prefill all but the last token, then one step
            cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).cache
            model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
    assert prefill_sizes == [memory_model.captured_rows_bytes(arch.heads, len(rows), PROMPT)] * arch.layers
    # a decode step's sliding-window layer sees only its window: the cached window - 1 keys and the new one
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * arch.layers
    keys = [min(PROMPT, arch.sliding_window) if kind == "sliding_attention" else PROMPT for kind in layer_types]
    assert decode_sizes == [memory_model.captured_rows_bytes(arch.heads, 1, n) for n in keys]


def test_captured_rows_formula_matches_attention_probs_for_a_batch():
    batch, heads, kv_heads, length, head_dim = 3, 8, 2, 40, 16
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(batch, heads, length, head_dim, generator=generator, dtype=torch.bfloat16)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=torch.bfloat16)
    rows = torch.tensor([3, 17, 39])
    probs = attention_probs(query, key, None, head_dim**-0.5, rows)
    assert probs.nbytes == memory_model.captured_rows_bytes(heads, len(rows), length, batch)



class _CastShapes(TorchDispatchMode):
    """Records the shape of every dtype cast (``aten._to_copy``) run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_bfloat16_rows_cast_the_key_one_kv_head_at_a_time():
    batch, heads, kv_heads, length, head_dim = 2, 6, 3, 33, 8
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(batch, heads, length, head_dim, generator=generator).to(torch.bfloat16)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(torch.bfloat16)
    rows = torch.tensor([0, 20, 32])
    with _CastShapes() as casts:
        probs = attention_probs(query, key, None, head_dim**-0.5, rows)
    # the layer's key is never copied whole in float32: one cast per KV head
    assert [shape for shape in casts.shapes if shape[-2:] == (length, head_dim)] == [(batch, length, head_dim)] * kv_heads
    # independent reference: the key repeated per query head, all in float32, causal rows
    full_key = key.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = query[:, :, rows].float() @ full_key.transpose(-1, -2) * head_dim**-0.5
    scores = scores.masked_fill(torch.arange(length)[None, :] > rows[:, None], float("-inf"))
    torch.testing.assert_close(probs, torch.softmax(scores, dim=-1))

def test_hub_models_are_the_ones_configured():
    configured = {path.stem: yaml.safe_load(path.read_text())["hub_id"] for path in (ROOT / "conf" / "model").glob("*.yaml")}
    for name, (hub_id, config) in memory_model.hub_configs().items():
        assert configured[name] == hub_id
