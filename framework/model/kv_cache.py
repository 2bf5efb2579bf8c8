"""A KV cache that really evicts: streaming KV heads keep only their sink and recent entries.

DuoAttention and RazorAttention keep the full KV only for retrieval heads; every other KV head
keeps the first ``sink`` tokens of its sample and the last ``recent`` ones. :class:`StreamingLayer`
is a transformers cache layer that stores a full-attention layer that way: after the prefill
(computed on every head's full keys, windowed or not) the attention engine calls
:meth:`StreamingLayer.evict`, which keeps the full keys of the kept KV heads and, for the
streaming KV heads, only the sink entries (each sample's first real tokens, so left padding is
respected) and the last ``recent`` entries. Each decode step then appends to the kept keys and
slides the recent entries; the attention engine reads the streaming heads' keys from
:meth:`StreamingLayer.streaming_state`. Sliding-window layers keep their own cache layers.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class StreamingLayer(DynamicLayer):
    """One full-attention layer's cache with its ``streaming`` KV heads evicted after the prefill."""

    def __init__(self, streaming: list[int], n_kv_heads: int, sink: int, recent: int):
        super().__init__()
        self.streaming = sorted(streaming)
        self.kept = [h for h in range(n_kv_heads) if h not in set(self.streaming)]
        self.sink, self.recent = sink, recent
        self.evicted, self.seen = False, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Before eviction: as a dynamic layer (every head's keys). After: the new token's kept
        heads' key and value appended, its streaming heads' to the recent entries (the oldest
        dropped); returns the kept heads' keys and values."""
        if not self.evicted:
            return super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[2] != 1:
            raise RuntimeError("an evicted streaming cache takes one token per forward pass (greedy decoding)")
        self.keys = torch.cat([self.keys, key_states[:, self.kept]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, self.kept]], dim=-2)
        self.recent_keys = torch.cat([self.recent_keys, key_states[:, self.streaming]], dim=-2)[:, :, -self.recent:]
        self.recent_values = torch.cat([self.recent_values, value_states[:, self.streaming]], dim=-2)[:, :, -self.recent:]
        self.seen += 1
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen if self.evicted else super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def evict(self, pad: torch.Tensor) -> None:
        """Drop the streaming KV heads' entries but each sample's first ``sink`` real ones (``pad``
        [batch]: its left padding) and the last ``recent``."""
        length = self.keys.shape[2]
        first = pad[:, None].to(self.keys.device) + torch.arange(self.sink, device=self.keys.device)
        self.sink_real = first < length  # [batch, sink]: a sample shorter than sink has fewer
        self.sink_index = first.clamp(max=length - 1)
        self.pad = pad.to(self.keys.device)
        keys, values = self.keys[:, self.streaming], self.values[:, self.streaming]
        batch = torch.arange(keys.shape[0], device=keys.device)[:, None]
        self.sink_keys = keys[batch, :, self.sink_index].transpose(1, 2).contiguous()
        self.sink_values = values[batch, :, self.sink_index].transpose(1, 2).contiguous()
        self.recent_keys = keys[:, :, -self.recent:].contiguous()
        self.recent_values = values[:, :, -self.recent:].contiguous()
        self.keys = self.keys[:, self.kept].contiguous()
        self.values = self.values[:, self.kept].contiguous()
        self.seen, self.evicted = length, True

    def streaming_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The streaming heads' keys and values [batch, streaming, sink + recent', dim] and which
        entries a query may see [batch, sink + recent']: real tokens, each once (a sink entry
        still inside the recent span is seen there)."""
        start = self.seen - self.recent_keys.shape[2]  # key index of the oldest recent entry
        recent_index = torch.arange(start, self.seen, device=self.pad.device)
        allowed = torch.cat([self.sink_real & (self.sink_index < start), recent_index[None, :] >= self.pad[:, None]], dim=1)
        return (torch.cat([self.sink_keys, self.recent_keys], dim=2), torch.cat([self.sink_values, self.recent_values], dim=2),
                allowed)

    def nbytes(self) -> int:
        """Bytes of the keys and values it holds."""
        held = [self.keys, self.values] + ([self.sink_keys, self.sink_values, self.recent_keys, self.recent_values]
                                          if self.evicted else [])
        return sum(t.numel() * t.element_size() for t in held)


def streaming_cache(model: torch.nn.Module, streaming_kv: dict[int, list[int]], sink: int, recent: int) -> DynamicCache:
    """A dynamic cache for ``model`` whose layers in ``streaming_kv`` (layer -> streaming KV heads)
    are :class:`StreamingLayer`; the other layers are transformers' own (sliding ones included)."""
    config = model.config.get_text_config()
    cache = DynamicCache(config=model.config)
    for layer, heads in streaming_kv.items():
        if type(cache.layers[layer]) is not DynamicLayer:
            raise ValueError(f"layer {layer} is a {type(cache.layers[layer]).__name__}, not a full-attention layer: "
                             "only full-attention layers can be evicted")
        cache.layers[layer] = StreamingLayer(heads, config.num_key_value_heads, sink, recent)
    return cache


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes of every key and value a cache holds."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, StreamingLayer):
            total += layer.nbytes()
        elif layer.is_initialized:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def full_layer_bytes(cache: DynamicCache) -> tuple[int, int, int]:
    """What a finished generation's full-attention layers hold: (batch, tokens, bytes per sample): the bytes of their keys and values (evicted or not) and the tokens of the
    longest pass (left padding included). Sliding-window layers are left out: they hold their
    window whichever heads are kept."""
    layers = [layer for layer in cache.layers if type(layer) in (DynamicLayer, StreamingLayer) and layer.is_initialized]
    if not layers:
        return 0, 0, 0
    batch = layers[0].keys.shape[0]
    held = sum(layer.nbytes() if isinstance(layer, StreamingLayer) else
               layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in layers)
    return batch, max(layer.get_seq_length() for layer in layers), held // batch
