"""Head-aware KV-cache compression (DuoAttention, RazorAttention): the selected heads keep their
full KV, every other head becomes a streaming head that sees only the first ``sink`` keys of its
sample and the last ``recent`` keys before each query (itself included).

* ``granularity: kv_head`` (default): the decision is made per KV head, as a KV cache stores it:
  a KV head stays full if any of its query heads is selected, and then all of its query heads
  are full. ``query_head``: each query head decides alone; a masking-only study, since under GQA
  a KV head still has to be stored whole while any of its query heads reads it: no memory saved.
* ``prefill: windowed``: streaming heads see only sink + recent in the prefill too (StreamingLLM,
  RazorAttention, DuoAttention's chunked prefill after its first chunk); ``full``: the prompt is
  prefilled with full attention and only the generated tokens' steps are restricted, i.e. the
  cache is evicted after the prefill (SnapKV / kvpress style).
* ``keep: selected`` keeps the detected heads; ``none`` keeps no head full (StreamingLLM, the
  ``all_streaming`` condition); ``lowest``: as many of the lowest-scoring heads as were selected
  (the ``lowest_kept`` condition at the same budget).
* ``cache: masked``: the attention pattern is restricted; every head's keys stay in the cache
  (a research setting, for any family). ``evicted``: generation uses a real compressed KV cache
  (:mod:`framework.model.kv_cache`) that keeps only the sink and recent entries of streaming KV
  heads, so memory really falls; same outputs as ``masked`` (tested on every family). It needs
  ``granularity: kv_head``, and a family whose cache is transformers' dynamic cache
  (:data:`EVICTABLE_FAMILIES`).

Sliding-window layers (Gemma-2/3, Mistral with a window) already stream and are left as they
are: only full-attention layers are compressed.

Control: in every layer, as many KV heads (query heads with ``granularity: query_head``) kept
full as the treatment keeps there, drawn at random among all of that layer's, the others
streamed: the same memory as the treatment.

Per condition it reports ``kv/fraction_kept/<condition>``: the fraction of the full KV cache the
edit needs at the run's longest prompt, r + (1 - r)(sink + recent)/L over the compressible layers'
KV heads (sliding layers count as the window they hold either way). With ``query_head`` it counts
KV heads, so a KV head with one full query head counts as full. With ``cache: evicted`` it also
reports what the cache really held after the condition's longest generation (prompt and
generated tokens), per sample, over the full-attention layers: ``kv/bytes`` (measured),
``kv/bytes_formula`` (the same from r and the window) and ``kv/bytes_full`` (no head streamed),
at ``kv/tokens``.
"""

from __future__ import annotations

import numpy as np

from framework.api import (
    AttentionEdit,
    ConfigError,
    Head,
    HeadScores,
    Intervention,
    LoadedModel,
    ModelInfo,
    StreamingWindow,
    hookimpl,
    select_heads,
)

GRANULARITIES = ("kv_head", "query_head")
PREFILLS = ("windowed", "full")
CACHES = ("masked", "evicted")
EVICTABLE_FAMILIES = ("llama", "mistral", "qwen2", "olmo2", "gemma2", "gemma3_text", "gemma3")
"""Families whose KV cache is transformers' dynamic cache, per layer, tested with ``cache: evicted``."""
KEEPS = ("selected", "none", "lowest")


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"streaming_heads {option}={value!r} is unknown; choose one of {', '.join(allowed)}")


def full_attention_layers(model: LoadedModel) -> list[int]:
    """The layers whose KV cache grows with the context (not sliding-window layers)."""
    config = model.model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types is None:
        return [] if getattr(config, "sliding_window", None) else list(range(model.info.n_layers))
    return [layer for layer, kind in enumerate(types) if kind != "sliding_attention"]


class StreamingHeads(Intervention):
    def __init__(self, sink: int = 4, recent: int = 256, granularity: str = "kv_head", prefill: str = "windowed",
                 cache: str = "masked", keep: str = "selected"):
        for option, value, allowed in (("granularity", granularity, GRANULARITIES), ("prefill", prefill, PREFILLS),
                                       ("cache", cache, CACHES), ("keep", keep, KEEPS)):
            _choice(option, value, allowed)
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ConfigError(f"streaming_heads sink={sink!r} is impossible: the number of first keys kept is an int >= 0")
        if isinstance(recent, bool) or not isinstance(recent, int) or recent < 1:
            raise ConfigError(f"streaming_heads recent={recent!r} is impossible: the recent window is an int >= 1 "
                              "(it includes the query itself)")
        if cache == "evicted" and granularity != "kv_head":
            raise ConfigError("streaming_heads cache=evicted needs granularity=kv_head: under GQA a KV head can only be "
                              "evicted when all of its query heads stream (query_head is a masking-only study)")
        self.sink, self.recent = sink, recent
        self.granularity, self.prefill, self.cache, self.keep = granularity, prefill, cache, keep
        self.longest: int | None = None

    def check_lengths(self, lengths: list[int]) -> None:
        shortest = min(lengths)
        if self.sink + self.recent >= shortest:
            raise ConfigError(
                f"streaming_heads sink + recent = {self.sink} + {self.recent} is at or beyond the shortest prompt "
                f"({shortest} tokens): a streaming head would see all of it; lower sink/recent or lengthen the context")
        self.longest = max(lengths)

    def validate(self, info: ModelInfo) -> None:
        if self.cache == "evicted" and info.family not in EVICTABLE_FAMILIES:
            raise ConfigError(f"streaming_heads cache=evicted: the cache of family {info.family!r} ({info.name}) cannot be "
                              f"evicted; families that can: {', '.join(EVICTABLE_FAMILIES)} (or use cache=masked)")
        if self.granularity == "kv_head" and info.n_heads % info.n_kv_heads:
            raise ConfigError(f"streaming_heads granularity=kv_head: {info.n_heads} query heads do not split into "
                              f"{info.n_kv_heads} KV groups")

    def select(self, scores: HeadScores, heads: list[Head]) -> list[Head]:
        if self.keep != "lowest":
            return heads
        return select_heads(-scores.scores, top_k=len(heads))

    def _group(self, model: LoadedModel) -> int:
        """Query heads per decision unit: a KV group, or one query head."""
        return model.info.n_heads // model.info.n_kv_heads if self.granularity == "kv_head" else 1

    def _edit(self, model: LoadedModel, kept_units: set[tuple[int, int]]) -> AttentionEdit:
        """Stream every head of the compressible layers whose unit (KV head or query head) is not kept."""
        group = self._group(model)
        layers = full_attention_layers(model)
        if not layers:
            raise ConfigError(f"streaming_heads: {model.info.name} has no full-attention layer to compress")
        streaming = [(layer, head) for layer in layers for head in range(model.info.n_heads)
                     if (layer, head // group) not in kept_units]
        window = StreamingWindow(streaming, model.info.n_heads, self.sink, self.recent,
                                 prefill=self.prefill == "windowed", evict=self.cache == "evicted")
        return AttentionEdit(parts=[window])

    def kept_units(self, model: LoadedModel, heads: list[Head]) -> set[tuple[int, int]]:
        """The (layer, unit) kept full for ``heads``: their KV heads, or the query heads themselves."""
        if self.keep == "none":
            return set()
        layers, group = set(full_attention_layers(model)), self._group(model)
        return {(layer, head // group) for layer, head in heads if layer in layers}

    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        return self._edit(model, self.kept_units(model, heads))

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        units = model.info.n_heads // self._group(model)
        per_layer: dict[int, int] = {}
        for layer, _ in sorted(self.kept_units(model, heads)):
            per_layer[layer] = per_layer.get(layer, 0) + 1
        drawn = {(layer, int(unit)) for layer, count in per_layer.items()
                 for unit in rng.choice(units, size=count, replace=False)}
        return self._edit(model, drawn)

    def condition_metrics(self, model: LoadedModel, edit: AttentionEdit) -> dict[str, float]:
        metrics = {} if self.longest is None else {"kv/fraction_kept": kv_fraction_kept(model, edit, self.longest)}
        measured = [m for part in edit.parts if isinstance(part, StreamingWindow) for m in part.measured]
        if measured:  # evicted: what the cache really held after the longest generation, per sample
            tokens, held = max(measured)
            metrics.update({"kv/tokens": tokens, "kv/bytes": held, **full_layer_bytes_expected(model, edit, tokens)})
        return metrics


def full_layer_bytes_expected(model: LoadedModel, edit: AttentionEdit, tokens: int) -> dict[str, float]:
    """Per sample, the full-attention layers' KV bytes at ``tokens``: ``kv/bytes_full`` uncompressed
    and ``kv/bytes_formula`` with the edit's streaming KV heads holding min(tokens, sink + recent)
    entries, i.e. r + (1 - r)(sink + recent)/L of the full cache; ``kv/bytes`` (measured) should equal
    the latter."""
    info = model.info
    entry = 2 * info.head_dim * next(model.model.parameters()).element_size()  # a key and a value
    layers = full_attention_layers(model)
    full = len(layers) * info.n_kv_heads * tokens * entry
    kept = full
    for part in edit.parts:
        if isinstance(part, StreamingWindow):
            streamed = sum(len(heads) for heads in part.streaming_kv_heads(info.n_kv_heads).values())
            kept -= streamed * (tokens - min(tokens, part.sink + part.recent)) * entry
    return {"kv/bytes_full": full, "kv/bytes_formula": kept}


def kv_fraction_kept(model: LoadedModel, edit: AttentionEdit, length: int) -> float:
    """The KV cache an edit needs at ``length`` tokens, as a fraction of the full cache: a KV head
    all of whose query heads stream keeps min(length, sink + recent) entries, every other keeps
    ``length``; sliding-window layers keep their window either way."""
    info, config = model.info, model.model.config.get_text_config()
    group = info.n_heads // info.n_kv_heads
    compressible = set(full_attention_layers(model))
    sliding = min(length, getattr(config, "sliding_window", None) or length)
    streaming = {head for part in edit.parts if isinstance(part, StreamingWindow) for head in part.heads}
    window = min((part.sink + part.recent for part in edit.parts if isinstance(part, StreamingWindow)), default=length)
    kept = full = 0
    for layer in range(info.n_layers):
        for kv_head in range(info.n_kv_heads):
            size = length if layer in compressible else sliding
            full += size
            streamed = all((layer, kv_head * group + g) in streaming for g in range(group))
            kept += min(size, window) if streamed else size
    return kept / full


@hookimpl
def register_interventions(register):
    register("streaming_heads", StreamingHeads)
