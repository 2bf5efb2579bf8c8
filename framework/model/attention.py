"""Attention instrumentation: the one place where the framework reads and edits attention.

The model runs with a registered transformers attention function (``ATTN_IMPLEMENTATION``)
that sees every layer's query, key and value after RoPE (and after QK-norm where a family has
it), key and value at KV-head count. Outside an :func:`instrumented` block it is plain SDPA.
Inside one it can

* scale query dimensions per head before the scores are computed (zeroing RoPE pairs or raw
  dimensions; real-valued and differentiable scales are allowed),
* mask heads: zero a head's output, replace it by the head's mean output, or make its
  attention uniform over the keys it may attend to (Wu et al.), in prefill, decode or both,
* capture softmax rows for chosen query positions only: memory O(rows x length) per layer,
  while the layer's output is still computed by SDPA; in prefill passes, decode steps (the one
  query row of each generated token, e.g. for Wu et al.'s top-1 copy test) or both,
* hand every layer's attention inputs (post-RoPE query, key, value, mask, scaling) to a
  callback, so that per-head problems such as Chiang & Yogatama's utility mask can be solved
  on captured tensors without running the model again (:class:`AttentionInputs`),
* hand every layer's per-head outputs to a callback (what ``o_proj`` reads), e.g. to average
  them for mean-ablation (:func:`mean_head_outputs`),
* apply new kinds of edit: a :class:`HeadEdit` subclass changes a head's query, keys, attention
  pattern (an additive logit bias) or output; head masks and query scaling are such subclasses.

No built-in edit builds a heads x length^2 matrix: uniform attention is a zeroed query (every
allowed key then scores 0, so softmax is exactly uniform over the causal / sliding-window mask),
and only logit soft-capping (Gemma-2), which SDPA lacks, and edits' logit biases take a manual
path chunked over query rows. On every path a row whose every key is masked (a left-pad row of a
padded batch) attends to nothing, as in SDPA, so padding never changes a real row.
Detectors and interventions go through this module; none of them patches model internals.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, get_args

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from framework.model.masks import RuleMask, chunked_sdpa, rule_mask

Head = tuple[int, int]
"""A query head as (layer, head), both counted from 0: how detectors select and edits address heads."""
MaskMode = Literal["zero", "mean", "uniform"]
Phase = Literal["prefill", "decode", "both"]
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
"""How a masked head's output is replaced: ``zero``, its ``mean`` output over the detection
samples, or ``uniform`` attention over the keys (:class:`HeadMasking`)."""
PHASES: tuple[str, ...] = get_args(Phase)
"""The passes an edit acts in: the ``prefill`` of the prompt, each ``decode`` step, or ``both``."""
Vector = np.ndarray | torch.Tensor  # one value per head dimension
ATTN_IMPLEMENTATION = "retrieval_heads"
_ROW_CHUNK = 256  # query rows per chunk on the chunked paths (manual, streaming, long masks)


@dataclass(frozen=True)
class AttentionPass:
    """What one layer's forward pass is, for edits whose pattern depends on positions
    (:meth:`HeadEdit.bias`, :class:`StreamingWindow`).

    Keys are indexed over the pass (cached keys first); query row ``i`` is key
    ``key_length - query_length + i``. Batches are left-padded: sample ``b``'s first real key is
    key ``pad[b]``, so a key's position in its own sample is its index minus ``pad[b]`` (negative
    on padding). In a prefill ``pad`` is read from the mask (a real key is seen at least by its own
    query; a pad key by none), in a decode step from the position ids (the new token is the last
    key; generation derives positions from the padding) or, without them, from the mask's row.
    """

    layer: int
    query_length: int
    key_length: int
    attention_mask: torch.Tensor | None  # SDPA convention, None = causal
    position_ids: torch.Tensor | None  # [batch or 1, query_length], as the model passed them
    batch: int

    @classmethod
    def of(cls, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
           position_ids: torch.Tensor | None) -> AttentionPass:
        """The pass of a layer's query [batch, heads, q_len, dim] and key [batch, kv_heads, k_len, dim]."""
        q_len, k_len = query.shape[2], key.shape[2]
        if attention_mask is None and q_len > 1:
            k_len = q_len  # SDPA crops a causal prefill's keys to the query length
        return cls(layer, q_len, k_len, attention_mask, position_ids, query.shape[0])

    @functools.cached_property
    def pad(self) -> torch.Tensor:
        """[batch] left-pad keys per sample (computed on first use)."""
        given = self.attention_mask if self.attention_mask is not None else self.position_ids
        device = given.device if given is not None else None
        if self.query_length == 1 and self.position_ids is not None:
            last = self.position_ids[:, -1].to(device=device, dtype=torch.long)
            return (self.key_length - 1 - last).expand(self.batch)
        if self.attention_mask is None:
            return torch.zeros(self.batch, dtype=torch.long, device=device)
        if isinstance(self.attention_mask, RuleMask):
            return self.attention_mask.pad.expand(self.batch)
        seen = self.attention_mask[:, 0, :, : self.key_length]
        seen = seen if seen.dtype == torch.bool else seen > float("-inf")
        return (~seen.any(dim=1)).sum(dim=1).expand(self.batch)

    @property
    def decode(self) -> bool:
        """Whether this is a one-token decode step."""
        return self.query_length == 1

    def query_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """[batch, len(rows)]: each query row's position in its own sample (negative on padding)."""
        return (self.key_length - self.query_length + rows)[None, :] - self.pad[:, None]

    def key_positions(self, keys: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, keys]: each key's position in its own sample (negative on padding); ``keys``:
        key indices, all of the pass by default (or [batch, n] per sample)."""
        if keys is None:
            keys = torch.arange(self.key_length, device=self.pad.device)
        return (keys if keys.dim() == 2 else keys[None, :]) - self.pad[:, None]


class HeadEdit(ABC):
    """One kind of attention edit on some heads: the extension point for new kinds of edit.

    A subclass overrides any of the hooks below; inside an :func:`instrumented` block each hook
    receives one layer's tensors and returns them, edited for its own heads only. Head masks
    (:class:`HeadMasking`) and query scaling, e.g. zeroed RoPE dimensions (:class:`QueryScaling`),
    are ordinary subclasses. Hooks run in the passes the enclosing :class:`AttentionEdit`'s
    ``phase`` selects, in the order of its parts; tensors are on the model's device and dtype, and
    gradients flow through them.

    * :meth:`query`: query [batch, heads, q_len, head_dim] after RoPE and QK-norm;
    * :meth:`key`: key [batch, kv_heads, k_len, head_dim] after RoPE, cached keys included; under
      GQA one KV head serves ``heads // kv_heads`` query heads, so a key edit acts on all of them;
    * :meth:`bias`: an additive bias on a head's attention logits (after scaling and soft-capping),
      i.e. a new attention pattern; layers where an edit returns one take the chunked manual path
      (memory O(chunk x length)); captured rows include the bias, the tensors handed to an
      ``inputs`` callback (:class:`AttentionInputs`) do not; what a left-pad row sees, and what
      a bias may return for it: see :meth:`bias`;
    * :meth:`output`: the attention output [batch, q_len, heads, head_dim], what ``o_proj`` reads.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """An edit written before :meth:`bias` took ``where`` (``bias(self, layer, rows,
        key_length)``) keeps working: it is called without it, with a DeprecationWarning that
        says how to move on."""
        super().__init_subclass__(**kwargs)
        bias = cls.__dict__.get("bias")
        if bias is None or len(inspect.signature(bias).parameters) != 4:
            return
        warnings.warn(f"{cls.__module__}.{cls.__qualname__}.bias(layer, rows, key_length) takes no `where`: add a "
                      "fourth parameter `where` (an AttentionPass: padding and positions of the pass); it is called "
                      "without it for now", DeprecationWarning, stacklevel=2)

        @functools.wraps(bias)
        def bias_without_where(self, layer: int, rows: torch.Tensor, key_length: int, where: AttentionPass):
            return bias(self, layer, rows, key_length)

        cls.bias = bias_without_where

    @property
    @abstractmethod
    def heads(self) -> list[Head]:
        """Every (layer, head) this edit changes."""

    def layer_heads(self, layer: int) -> list[int]:
        """The heads of ``layer`` this edit changes."""
        return sorted(h for l, h in self.heads if l == layer)

    def query(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """This layer's query [batch, heads, q_len, head_dim] after RoPE (and QK-norm), returned
        edited for this edit's heads; the default returns it unchanged."""
        return query

    def key(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """This layer's key [batch, kv_heads, k_len, head_dim] after RoPE, cached keys included,
        returned edited; under GQA an edit of one KV head reaches every query head it serves."""
        return key

    def bias(self, layer: int, rows: torch.Tensor, key_length: int, where: AttentionPass) -> torch.Tensor | None:
        """Additive logit bias for query ``rows`` of this pass, broadcastable to
        [batch, heads, len(rows), key_length] (0 leaves a head as it is; -inf removes a key), or
        None where this layer's pattern is unchanged.

        Indices count positions of the pass: in a prefill ``rows`` are query positions (in chunks),
        in a decode step ``rows`` is ``[0]``, the new token, which is the last key. ``where``
        (:class:`AttentionPass`) says what the pass is: its query and key lengths, each sample's
        left padding, the position of every query row and key in its own sample, the mask and the
        position ids; with it a bias can be written in sample positions (say, the first four real
        tokens of each padded row) without any state from the other hooks. Batches are
        left-padded, so a sample's real tokens are the last ones of the pass and its first keys
        and rows may be padding; the bias is added to the mask, so pad keys stay masked whatever
        it says. A pad row has every key masked: it attends to nothing (probabilities 0, head
        output 0) and no real token reads it, so for pad rows, as for every row, the bias may
        return any finite value or -inf, never NaN or +inf. A bias relative to the query (a
        function of query minus key position) means the same in every sample of a batch; one at
        absolute key indices (say, the first four keys) falls on padding in shorter samples.
        A real row whose bias removes every key it may see also attends to nothing."""
        return None

    def output(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """This layer's attention output [batch, q_len, heads, head_dim], what ``o_proj`` reads,
        returned edited for this edit's heads; the default returns it unchanged."""
        return output

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, merged into :meth:`AttentionEdit.describe` (logged per condition)."""
        return {type(self).__name__: [f"{layer}.{head}" for layer, head in self.heads]}


def per_head(layer: int, like: torch.Tensor, values: dict[int, Vector | float], default: float) -> torch.Tensor:
    """[heads, head_dim] on ``like``'s device and dtype: ``values[head]`` (a ``head_dim`` vector or a
    number) where given, else ``default``; ``like`` is a query [batch, heads, q_len, head_dim]."""
    n_heads, head_dim = like.shape[1], like.shape[3]

    def vector(value: Vector | float) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(np.asarray(value), device=like.device)
        if value.dim() and value.shape != (head_dim,):
            raise ValueError(f"layer {layer}: per-head vectors need shape ({head_dim},), got {tuple(value.shape)}")
        return value.to(device=like.device, dtype=like.dtype).expand(head_dim)

    return torch.stack([vector(values.get(h, default)) for h in range(n_heads)])


class _LayerCache:
    """Per-layer tensors of an edit, built on first use; ones that need gradients are rebuilt on
    every call, so that each forward pass gets its own autograd graph."""

    def __init__(self) -> None:
        self._tensors: dict[int, Any] = {}

    def get(self, layer: int, build: Callable[[], Any]) -> Any:
        if layer in self._tensors:
            return self._tensors[layer]
        built = build()
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (built if isinstance(built, tuple) else (built,))):
            self._tensors[layer] = built
        return built


class QueryScaling(HeadEdit):
    """Multiply each listed head's query (after RoPE and QK-norm) dimension by dimension: 0
    removes a dimension from q.k, a boolean vector keeps the True dims; a torch tensor with
    ``requires_grad`` receives gradients. :mod:`framework.model.rope` maps RoPE pairs to such vectors."""

    def __init__(self, scales: dict[Head, Vector]):
        self.scales = scales
        self._cache = _LayerCache()

    @property
    def heads(self) -> list[Head]:
        return sorted(self.scales)

    def query(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        def build() -> torch.Tensor | None:
            values = {h: s for (l, h), s in self.scales.items() if l == layer}
            return per_head(layer, query, values, 1.0)[None, :, None, :] if values else None

        scale = self._cache.get(layer, build)
        return query if scale is None else query * scale

    def describe(self) -> dict[str, Any]:
        return {"query_dims": {f"{layer}.{head}": np.flatnonzero(_numpy(scale) != 1).tolist()
                               for (layer, head), scale in sorted(self.scales.items())}}


class HeadMasking(HeadEdit):
    """Mask heads (see :data:`MaskMode`): ``zero`` and ``mean`` replace the head's output (by 0 or
    by ``mean_outputs[head]``); ``uniform`` zeroes its query, so every key its mask allows scores
    0 and softmax is exactly uniform over them."""

    def __init__(self, modes: dict[Head, MaskMode], mean_outputs: dict[Head, Vector] | None = None):
        self.modes, self.mean_outputs = modes, mean_outputs or {}
        self._queries, self._outputs = _LayerCache(), _LayerCache()

    @property
    def heads(self) -> list[Head]:
        return sorted(self.modes)

    def _in_layer(self, layer: int, modes: tuple[str, ...]) -> list[int]:
        return [h for (l, h), m in self.modes.items() if l == layer and m in modes]

    def query(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        def build() -> torch.Tensor | None:
            uniform = self._in_layer(layer, ("uniform",))
            return per_head(layer, query, dict.fromkeys(uniform, 0.0), 1.0)[None, :, None, :] if uniform else None

        scale = self._queries.get(layer, build)
        return query if scale is None else query * scale

    def output(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        def build() -> tuple[torch.Tensor, torch.Tensor] | None:
            replaced = self._in_layer(layer, ("zero", "mean"))
            if not replaced:
                return None
            like = output.transpose(1, 2)  # [batch, heads, q_len, head_dim]
            mask = torch.zeros(like.shape[1], 1, dtype=torch.bool, device=output.device)
            mask[replaced] = True
            means = {h: self.mean_outputs[(layer, h)] for h in self._in_layer(layer, ("mean",))}
            return mask, per_head(layer, like, means, 0.0)

        replaced = self._outputs.get(layer, build)
        return output if replaced is None else torch.where(replaced[0], replaced[1], output)

    def describe(self) -> dict[str, Any]:
        return {"head_masks": {f"{layer}.{head}": mode for (layer, head), mode in sorted(self.modes.items())}}


class StreamingWindow(HeadEdit):
    """Streaming heads (StreamingLLM; DuoAttention's and RazorAttention's non-retrieval heads):
    each listed query head attends only to the first ``sink`` keys of its own sample and to the
    last ``recent`` keys up to and including its query, within what the layer's mask allows.
    Meant for full-attention layers: a sliding-window cache drops keys, so there its key indices
    are no longer positions.

    ``prefill``: whether the window restricts the prefill too (else only decode steps, i.e. the
    cache is evicted after a full prefill). ``evict``: whether generation uses a real evicting KV
    cache (:mod:`framework.model.kv_cache`, see :meth:`AttentionEdit.kv_cache`): streaming KV
    heads keep only their sink and recent entries; it needs every query head of a KV group
    streaming or none, and gives the same outputs as the masked pattern.

    The pattern is also a :meth:`bias`, which captured rows use, and so does a layer where another
    edit biases the pattern or logits are soft-capped (the chunked manual path). Otherwise the
    layer is computed without any length x length matrix and without that path: the other heads
    by SDPA with the layer's own mask, the streaming heads by SDPA over a gather of their sink and
    recent keys, one query chunk at a time (time and memory O(length x (sink + recent + chunk))).
    """

    def __init__(self, heads: Iterable[Head], n_heads: int, sink: int, recent: int, prefill: bool = True,
                 evict: bool = False):
        if sink < 0 or recent < 1:
            raise ValueError(f"a streaming window needs sink >= 0 and recent >= 1, got sink={sink}, recent={recent}")
        self.streaming, self.n_heads, self.sink, self.recent = sorted(set(heads)), n_heads, sink, recent
        self.prefill, self.evict = prefill, evict
        self.cache: Any = None  # the evicting cache of the generation under way (see AttentionEdit.kv_cache)
        # per finished evicting generation: (tokens, bytes per sample) its full-attention layers held
        self.measured: list[tuple[int, int]] = []

    @property
    def heads(self) -> list[Head]:
        return self.streaming

    def acts(self, layer: int, query_length: int) -> bool:
        """Whether the window restricts this layer in a pass with this many query positions."""
        return bool(self.layer_heads(layer)) and (self.prefill or query_length == 1)

    def allowed(self, where: AttentionPass, rows: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, len(rows), keys] bool: which keys (all of the pass, or ``keys`` [batch, n]
        indices) a streaming head's query ``rows`` may see, before the layer's own mask."""
        query = where.query_positions(rows)[:, :, None]
        key = where.key_positions(keys)[:, None, :]
        distance = query - key
        return (key >= 0) & (distance >= 0) & ((key < self.sink) | (distance < self.recent))

    def bias(self, layer: int, rows: torch.Tensor, key_length: int, where: AttentionPass) -> torch.Tensor | None:
        if not self.acts(layer, where.query_length):
            return None
        outside = torch.zeros(where.pad.shape[0], len(rows), key_length, device=rows.device)
        outside.masked_fill_(~self.allowed(where, rows)[:, :, :key_length], float("-inf"))
        bias = torch.zeros(where.pad.shape[0], self.n_heads, len(rows), key_length, device=rows.device)
        bias[:, self.layer_heads(layer)] = outside[:, None]
        return bias

    def streaming_kv_heads(self, n_kv_heads: int) -> dict[int, list[int]]:
        """Per layer, the KV heads all of whose query heads stream (what an evicting cache drops)."""
        group, by_layer = self.n_heads // n_kv_heads, {}
        for layer in sorted({layer for layer, _ in self.streaming}):
            heads = set(self.layer_heads(layer))
            kv = [k for k in range(n_kv_heads) if all(k * group + g in heads for g in range(group))]
            if len(kv) * group != len(heads):
                raise ValueError(f"layer {layer}: an evicting cache needs whole KV groups streaming (streaming query "
                                 f"heads {sorted(heads)}, {group} per KV head)")
            by_layer[layer] = kv
        return by_layer

    def describe(self) -> dict[str, Any]:
        return {"streaming_heads": [f"{layer}.{head}" for layer, head in self.streaming], "sink": self.sink,
                "recent": self.recent, "prefill": "windowed" if self.prefill else "full",
                "cache": "evicted" if self.evict else "masked"}


@dataclass
class AttentionEdit:
    """A set of per-head edits applied together, in the forward passes that ``phase`` selects.

    * ``head_masks[(layer, head)]`` is a :data:`MaskMode`: ``"zero"`` (the head contributes
      nothing to its layer), ``"mean"`` (its output is replaced by ``mean_outputs[head]``, a
      ``head_dim`` vector, see :func:`mean_head_outputs`) or ``"uniform"`` (its attention is
      uniform over the keys the causal / sliding-window mask allows: Wu et al.'s masking, done
      by zeroing the query so that every allowed score is 0). Applied as a :class:`HeadMasking`.
    * ``query_scale[(layer, head)]`` multiplies that head's query (after RoPE and QK-norm)
      dimension by dimension: length ``head_dim``; applied as a :class:`QueryScaling`.
    * ``parts``: further edits of any kind (:class:`HeadEdit` subclasses), applied after those two.
    * ``phase``: ``"prefill"`` edits passes with more than one query position, ``"decode"`` the
      one-token steps of generation, ``"both"`` every pass.
    """

    head_masks: dict[Head, MaskMode] = field(default_factory=dict)
    mean_outputs: dict[Head, Vector] = field(default_factory=dict)
    query_scale: dict[Head, Vector] = field(default_factory=dict)
    phase: Phase = "both"
    parts: list[HeadEdit] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} is unknown; choose one of {PHASES}")
        for head, mode in self.head_masks.items():
            if mode not in MASK_MODES:
                raise ValueError(f"head {head}: mask mode {mode!r} is unknown; choose one of {MASK_MODES}")
            if mode == "mean" and head not in self.mean_outputs:
                raise ValueError(f"head {head} is mean-ablated but has no mean output (see mean_head_outputs)")
        for part in self.parts:
            if not isinstance(part, HeadEdit):
                raise TypeError(f"AttentionEdit parts must be HeadEdit instances, got {part!r}")

    @classmethod
    def mask_heads(
        cls,
        heads: Iterable[Head],
        mode: MaskMode = "zero",
        phase: Phase = "both",
        mean_outputs: dict[Head, Vector] | None = None,
    ) -> AttentionEdit:
        """Mask every head in ``heads`` the same way (``mean_outputs`` only for ``mode="mean"``)."""
        heads = list(heads)
        means = {h: mean_outputs[h] for h in heads} if mode == "mean" and mean_outputs else {}
        return cls(head_masks={h: mode for h in heads}, mean_outputs=means, phase=phase)

    @classmethod
    def zero_query_dims(cls, dims_by_head: dict[Head, Sequence[int]], head_dim: int, phase: Phase = "both") -> AttentionEdit:
        """Remove the given raw query dimensions of each head from q.k (see :mod:`framework.model.rope`
        for the dimensions of RoPE frequency pairs)."""
        scales = {}
        for head, dims in dims_by_head.items():
            scales[head] = np.ones(head_dim, dtype=np.float32)
            scales[head][np.asarray(dims, dtype=int)] = 0.0
        return cls(query_scale=scales, phase=phase)

    def compiled(self) -> list[HeadEdit]:
        """Every part in the order applied; head masks and query scales as fresh parts, so each
        :func:`instrumented` block builds its per-layer tensors anew."""
        built: list[HeadEdit] = []
        if self.query_scale:
            built.append(QueryScaling(self.query_scale))
        if self.head_masks:
            built.append(HeadMasking(self.head_masks, self.mean_outputs))
        return built + list(self.parts)

    @property
    def heads(self) -> list[Head]:
        """Every head this edit touches (masked, query dims scaled, or changed by a part)."""
        return sorted(set(self.head_masks) | set(self.query_scale) | {h for p in self.parts for h in p.heads})

    @contextmanager
    def kv_cache(self, model: torch.nn.Module) -> Iterator[Any]:
        """A KV cache for one generation with this edit: an evicting cache (:mod:`framework.model.kv_cache`)
        where a part is a :class:`StreamingWindow` with ``evict``, else None (the model's own). What
        the evicting cache held at the end is added to the window's ``measured``."""
        from framework.model.kv_cache import full_layer_bytes, streaming_cache

        evicting = [p for p in self.parts if isinstance(p, StreamingWindow) and p.evict]
        if not evicting:
            yield None
            return
        if len(evicting) > 1 or self.phase != "both":
            raise ValueError("an evicting cache needs one evicting StreamingWindow, in an edit of phase 'both'")
        window = evicting[0]
        config = model.config.get_text_config()
        window.cache = streaming_cache(model, window.streaming_kv_heads(config.num_key_value_heads), window.sink, window.recent)
        try:
            yield window.cache
            _, tokens, held = full_layer_bytes(window.cache)
            window.measured.append((tokens, held))
        finally:
            window.cache = None

    def applies_to(self, query_length: int) -> bool:
        """Whether a forward pass with this many query positions is edited (see ``phase``)."""
        return _phase_applies(self.phase, query_length)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: phase, mask mode per head, per head the query dims scaled,
        and what each further part describes."""
        described = {"phase": self.phase, **HeadMasking(self.head_masks).describe(),
                     **QueryScaling(self.query_scale).describe()}
        for part in self.parts:
            described.update(part.describe())
        return described


def _phase_applies(phase: Phase, query_length: int) -> bool:
    """Whether ``phase`` covers a forward pass with this many query positions (one = decode)."""
    return phase == "both" or (phase == "decode") == (query_length == 1)


def _numpy(vector: Vector) -> np.ndarray:
    if isinstance(vector, torch.Tensor):
        return vector.detach().float().cpu().numpy()
    return np.asarray(vector, dtype=np.float32)


@dataclass
class RowCapture:
    """Capture softmax attention rows of chosen query positions during a prefill forward, or
    the single query row of every decode step.

    ``rows`` indexes the query positions of a prefill pass. ``sink(layer, probs)`` receives
    probabilities of shape [batch, heads, len(rows), key_length] for every layer, in order, after
    the active edit (a uniform head's rows are uniform); it should reduce them right away, so
    that nothing of size heads x length^2 is ever held. Gradients flow through ``probs``. In a
    left-padded batch a sample's real rows and keys are the last ones: its pad rows are all 0
    and its real rows weigh the pad keys 0.

    ``phase`` picks the passes captured, as for :class:`AttentionEdit`: ``"prefill"`` (the
    default) passes with several query positions; ``"decode"`` the one-token steps of cached
    generation, whose one row is captured whatever ``rows`` says (probs [batch, heads, 1, keys]:
    O(heads x length) per step, cached keys included); ``"both"``.
    """

    rows: torch.Tensor
    sink: Callable[[int, torch.Tensor], None]
    phase: Phase = "prefill"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} is unknown; choose one of {PHASES}")

    def rows_for(self, query: torch.Tensor) -> torch.Tensor | None:
        """The query rows to capture in this pass, None when ``phase`` skips it."""
        if not _phase_applies(self.phase, query.shape[2]):
            return None
        return self.rows if query.shape[2] > 1 else torch.zeros(1, dtype=torch.long, device=query.device)


@dataclass
class AttentionInputs:
    """What a layer's attention computes with, as :func:`instrumented_attention` receives it:
    query [batch, heads, q_len, head_dim] after RoPE, QK-norm and the active edit's query scale;
    key and value [batch, kv_heads, k_len, head_dim] (GQA: not repeated); the mask in SDPA's
    convention (None = causal, see :func:`attention_probs`), on a pass beyond 2K x 2K a
    :class:`framework.model.masks.RuleMask` (read its rows, ``mask[:, :, rows, :k]`` or
    :func:`key_bias`, never the whole); the softmax scaling and the logit soft-cap (Gemma-2) or
    None. :func:`attention_rows` recomputes the head outputs from them."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | RuleMask | None
    scaling: float
    softcap: float | None = None


OutputSink = Callable[[int, torch.Tensor], None]  # (layer, output [batch, q_len, heads, head_dim])
InputSink = Callable[[int, AttentionInputs], None]  # (layer, what its attention computes with)


class _Plan:
    """What one :func:`instrumented` block applies: the edit's parts and the callbacks."""

    def __init__(
        self,
        edit: AttentionEdit | None,
        capture: RowCapture | None,
        head_outputs: OutputSink | None,
        inputs: InputSink | None = None,
    ):
        self.edit = edit or AttentionEdit()
        self.parts = self.edit.compiled()
        self.capture = capture
        self.head_outputs = head_outputs
        self.inputs = inputs

    def parts_for(self, query_length: int) -> list[HeadEdit]:
        return self.parts if self.edit.applies_to(query_length) else []


# The plans of the instrumented blocks that are open, by model (see :func:`install`). A context
# variable, so that threads and asyncio tasks each see their own; keyed by model, so that two
# models in one process, each inside its own block, never see each other's edits.
_active: ContextVar[dict[int, _Plan]] = ContextVar("retrieval_heads_active_plans", default={})
_MODEL_KEY = "_retrieval_heads_model"  # set on every submodule: which model's plan applies


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention rows [batch, heads, len(rows), keys] for the given query positions,
    in float32 at least (bfloat16 models too).

    Follows SDPA's conventions: a boolean mask means True = attend, a float mask is added to
    the scores; with no mask a prefill is causal (upper-left aligned, keys cropped to the
    query length as SDPA does) and a single-token decode step sees every key.
    """
    batch, n_heads, q_len, head_dim = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    if attention_mask is None and q_len > 1:
        key = key[:, :, :q_len]
        k_len = q_len
    dtype = torch.promote_types(query.dtype, torch.float32)  # at least float32, float64 kept
    # per KV group (GQA): the group's query rows stacked against its one key, never a key repeated per
    # query head; the key is cast one KV head at a time, so a bfloat16 layer's key is never copied whole
    # in float32 (512 MiB per layer at 128K tokens on Llama-3.1-8B, 64 MiB per KV head)
    grouped = query[:, :, rows].to(dtype).reshape(batch, n_kv, -1, head_dim)
    scores = grouped.new_empty(batch, n_kv, grouped.shape[2], k_len)
    for group in range(n_kv):
        scores[:, group] = torch.matmul(grouped[:, group], key[:, group].to(dtype).transpose(-1, -2))
    scores = scores.view(batch, n_heads, len(rows), k_len).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, rows, :k_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(dtype)
    elif q_len > 1:
        causal = torch.arange(k_len, device=query.device)[None, :] > rows[:, None]
        scores = scores.masked_fill(causal, float("-inf"))
    # A row whose every key is masked (a left-pad query row of a padded batch, or a bias that removes
    # every key) would be a softmax of -inf alone: NaN, which reaches the real tokens through the next
    # layer's values at pad positions (a weight of 0 times NaN is NaN). Such a row attends to nothing:
    # probabilities 0 and so output 0, what torch's SDPA gives it on transformers' SDPA path (its eager
    # path fills masks with the dtype's minimum, which makes the row uniform instead). Its scores are set
    # to 0 before the softmax, so that gradients stay finite too; a row with any key left is untouched.
    empty = scores.detach().amax(dim=-1, keepdim=True) == float("-inf")
    probs = torch.softmax(scores.masked_fill_(empty, 0.0), dim=-1)
    del scores  # the copy below then peaks no higher than the softmax did
    return probs.masked_fill(empty, 0.0)


def key_bias(attention_mask: torch.Tensor | None, rows: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """The mask of ``rows`` as an additive float32 bias [batch or 1, 1, len(rows), key_length]
    (0 = attend, -inf = masked; a float mask as it is), read with :func:`attention_probs`'s
    conventions. Passed back to :func:`attention_probs` with ``rows = arange(len(rows))`` it
    gives the same rows, so rows of different sequences can be padded into one batch."""
    if attention_mask is not None:
        mask = attention_mask[:, :, rows, :key_length]
        if mask.dtype != torch.bool:
            return mask.float()
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    bias = torch.zeros(1, 1, len(rows), key_length, device=rows.device)
    if query_length > 1:
        bias = bias.masked_fill(torch.arange(key_length, device=rows.device)[None, :] > rows[:, None], float("-inf"))
    return bias


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-head attention outputs [batch, heads, len(rows), head_dim] of the given query rows
    (GQA: computed per KV group, the value is not repeated; causal cropping as in :func:`attention_probs`)."""
    if attention_mask is None and query.shape[2] > 1:
        value = value[:, :, : query.shape[2]]
    probs = attention_probs(query, key, attention_mask, scaling, rows, softcap)
    batch, n_heads, n_rows, k_len = probs.shape
    grouped = probs.to(value.dtype).reshape(batch, value.shape[1], -1, k_len)  # per KV group, value not repeated
    return torch.matmul(grouped, value).view(batch, n_heads, n_rows, value.shape[-1])


LogitBias = Callable[[torch.Tensor, int], torch.Tensor]  # (rows, key_length) -> additive bias


def _layer_bias(parts: Sequence[HeadEdit], layer: int, where: AttentionPass) -> LogitBias | None:
    """The summed logit bias of the parts that change this layer's pattern, None if none does."""
    changing = [p for p in parts if type(p).bias is not HeadEdit.bias]
    if not changing:
        return None

    def bias(rows: torch.Tensor, key_length: int) -> torch.Tensor:
        total = torch.zeros((), device=rows.device)
        for part in changing:
            extra = part.bias(layer, rows, key_length, where)
            if extra is not None:
                total = total + extra.float()
        return total

    return bias


def _biased_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    bias: LogitBias,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` of the query, the key (cropped as SDPA crops a causal prefill) and, for those rows,
    the mask plus ``bias`` as one float mask: :func:`attention_probs` and :func:`attention_rows`
    read them with rows ``arange(len(rows))``."""
    q_len = query.shape[2]
    if attention_mask is None and q_len > 1:
        key = key[:, :, :q_len]
    mask = key_bias(attention_mask, rows, q_len, key.shape[2]) + bias(rows, key.shape[2])
    return query[:, :, rows], key, mask


def _probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
    rows: torch.Tensor, softcap: float | None, bias: LogitBias | None,
) -> torch.Tensor:
    """:func:`attention_probs`, with the edits' logit bias where there is one."""
    if bias is None:
        return attention_probs(query, key, attention_mask, scaling, rows, softcap)
    query, key, mask = _biased_rows(query, key, attention_mask, rows, bias)
    return attention_probs(query, key, mask, scaling, torch.arange(len(rows), device=rows.device), softcap)


def _manual_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    bias: LogitBias | None = None,
) -> torch.Tensor:
    """Attention output [batch, q_len, heads, dim] computed in row chunks, for what SDPA lacks
    (logit soft-capping, edits' logit biases): memory stays O(chunk x length) per layer."""
    if bias is not None and attention_mask is None and query.shape[2] > 1:
        value = value[:, :, : query.shape[2]]
    chunks = []
    for start in range(0, query.shape[2], _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, query.shape[2]), device=query.device)
        if bias is None:
            chunks.append(attention_rows(query, key, value, attention_mask, scaling, rows, softcap))
        else:
            q, k, mask = _biased_rows(query, key, attention_mask, rows, bias)
            chunks.append(attention_rows(q, k, value, mask, scaling, torch.arange(len(rows), device=rows.device), softcap))
    return torch.cat(chunks, dim=2).transpose(1, 2).contiguous()


def _sdpa_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA of query [batch, heads, q, dim] against key and value with as many heads; ``mask``
    bool (True = attend) or None (causal for a prefill). Rows with no key get output 0; ``empty``
    [batch, 1, q, 1], if given, says which rows those are (else it is read from the mask)."""
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling)
    if empty is None:
        empty = ~mask.any(dim=-1, keepdim=True)
    has_empty = bool(empty.any())
    bias = torch.where(mask | empty if has_empty else mask, 0.0, float("-inf")).to(query.dtype)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)
    return output.masked_fill_(empty, 0.0) if has_empty else output


def _group_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: list[int], group: int,
    mask: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    """SDPA of the query heads ``heads`` (query [batch, len(heads), q, dim]) over the whole key and
    value of their KV heads: whole KV groups without a mask share their KV head (GQA, no copy per
    query head), as transformers' SDPA path does; otherwise each query head gets its KV head's."""
    kv = sorted({h // group for h in heads})
    if mask is None and heads == [k * group + g for k in kv for g in range(group)]:
        index = torch.tensor(kv, device=key.device)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key.index_select(1, index), value.index_select(1, index), is_causal=query.shape[2] > 1,
            scale=scaling, enable_gqa=True)
    index = torch.tensor([h // group for h in heads], device=key.device)
    return _sdpa_heads(query, key[:, index], value[:, index], mask, scaling)


def _bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's mask as bool (True = attend); a float mask's finite entries attend."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > float("-inf")


def _windowed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float, window: StreamingWindow, where: AttentionPass,
) -> torch.Tensor:
    """Attention output [batch, q_len, heads, dim] of a layer with streaming heads, without the
    manual path (see :class:`StreamingWindow`). The full heads run one SDPA with the layer's mask;
    the streaming heads, per query chunk, one SDPA over their sink keys (gathered once per layer:
    each sample's first real keys) and the chunk's recent span (a slice shared by the batch), with
    a chunk x (sink + span) mask whose band part is built once per layer."""
    batch, n_heads, q_len, head_dim = query.shape
    group = n_heads // key.shape[1]
    if attention_mask is None and q_len > 1:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    mask = _bool_mask(attention_mask)
    streaming = window.layer_heads(where.layer)
    full = [h for h in range(n_heads) if h not in set(streaming)]
    outputs: dict[str, torch.Tensor] = {}
    device = query.device
    if full and isinstance(mask, RuleMask):
        outputs["full"] = chunked_sdpa(query[:, full], key, value, mask, scaling, _ROW_CHUNK,
                                       torch.tensor([h // group for h in full], device=device))
    elif full:
        outputs["full"] = _group_sdpa(query[:, full], key, value, full, group, mask, scaling)
    kv = torch.tensor([h // group for h in streaming], device=device)
    stream_query = query[:, streaming]
    offset, sink, recent = where.key_length - q_len, window.sink, window.recent
    sink_index = (where.pad[:, None] + torch.arange(sink, device=device)).clamp(max=where.key_length - 1)  # [batch, sink]
    gather = sink_index[:, None, :, None].expand(-1, key.shape[1], -1, head_dim)
    sink_key, sink_value = torch.gather(key, 2, gather), torch.gather(value, 2, gather)  # every KV head: small
    sink_position = where.key_positions(sink_index)[:, None, :]  # [batch, 1, sink]
    sink_real = (sink_position >= 0) & (sink_position < sink)
    bands: dict[tuple[int, int], torch.Tensor] = {}
    chunks = []
    for start in range(0, q_len, _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, q_len), device=device)
        low, high = max(0, offset + start - recent + 1), offset + int(rows[-1]) + 1
        shift = offset + start - low  # a row's distance to the span's first key, less its own index
        if (len(rows), shift) not in bands:  # the same for every chunk once the window is full
            distance = shift + torch.arange(len(rows), device=device)[:, None] - torch.arange(high - low, device=device)
            bands[len(rows), shift] = (distance >= 0) & (distance < recent)
        query_position = where.query_positions(rows)[:, :, None]  # [batch, rows, 1]
        span_real = where.key_positions(torch.arange(low, high, device=device)) >= 0  # [batch, span]
        # a sink key inside a row's recent span is seen there, not twice
        allowed = torch.cat([sink_real & (query_position - sink_position >= recent),
                             bands[len(rows), shift] & span_real[:, None, :]], dim=2)
        if mask is not None:
            layer_mask = mask[:, 0, rows, : where.key_length].expand(batch, -1, -1)  # the mask has a row per query
            allowed &= torch.cat([torch.gather(layer_mask, 2, sink_index[:, None, :].expand(-1, len(rows), -1)),
                                  layer_mask[:, :, low:high]], dim=2)
        chunk_key = torch.cat([sink_key, key[:, :, low:high]], dim=2)[:, kv]  # per streaming head: small
        chunk_value = torch.cat([sink_value, value[:, :, low:high]], dim=2)[:, kv]
        empty = (query_position < 0)[:, None] if mask is None else None  # pad rows see nothing
        chunks.append(_sdpa_heads(stream_query[:, :, start: start + len(rows)], chunk_key, chunk_value,
                                  allowed[:, None], scaling, empty))
    outputs["streaming"] = torch.cat(chunks, dim=2)
    output = query.new_empty(batch, n_heads, q_len, value.shape[-1])
    for name, heads in (("full", full), ("streaming", streaming)):
        if heads:
            output.index_copy_(1, torch.tensor(heads, device=device), outputs[name])
    return output.transpose(1, 2).contiguous()


def _evicted_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float, softcap: float | None, cached: Any,
) -> torch.Tensor:
    """A decode step's output [batch, 1, heads, dim] on an evicted cache layer: the kept KV heads'
    query heads over ``key``/``value`` (the kept heads' full keys), the streaming ones over the
    layer's sink and recent entries (:meth:`framework.model.kv_cache.StreamingLayer.streaming_state`)."""
    n_heads = query.shape[1]
    group = n_heads // (len(cached.kept) + len(cached.streaming))
    rows = torch.zeros(1, dtype=torch.long, device=query.device)
    output = query.new_empty(query.shape[0], n_heads, 1, value.shape[-1])
    if cached.kept:
        kept = [k * group + g for k in cached.kept for g in range(group)]
        output[:, kept] = attention_rows(query[:, kept], key, value, attention_mask, scaling, rows, softcap)
    stream_key, stream_value, allowed = cached.streaming_state()
    streaming = [k * group + g for k in cached.streaming for g in range(group)]
    output[:, streaming] = attention_rows(query[:, streaming], stream_key, stream_value, allowed[:, None, None, :],
                                          scaling, rows, softcap)
    return output.transpose(1, 2).contiguous()


def _single_window(parts: Sequence[HeadEdit], layer: int, query_length: int) -> StreamingWindow | None:
    """The one streaming window acting on this layer in this pass, where it is the layer's only
    pattern change."""
    windows = [p for p in parts if isinstance(p, StreamingWindow) and p.acts(layer, query_length)]
    others = [p for p in parts if type(p).bias is not HeadEdit.bias and not isinstance(p, StreamingWindow)]
    return windows[0] if len(windows) == 1 and not others else None


def _evicting_layer(parts: Sequence[HeadEdit], layer: int) -> Any:
    """This layer's evicting cache layer, if a window's generation has one."""
    for part in parts:
        if isinstance(part, StreamingWindow) and part.cache is not None and layer < len(part.cache.layers):
            cached = part.cache.layers[layer]
            if hasattr(cached, "evict"):
                return cached
    return None


def instrumented_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: SDPA plus the active plan's edits and captures."""
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    softcap = kwargs.pop("softcap", None)
    layer = module.layer_idx
    plan = _active.get().get(getattr(module, _MODEL_KEY, None))
    parts = plan.parts_for(query.shape[2]) if plan is not None else []
    for part in parts:
        query, key = part.query(layer, query), part.key(layer, key)
    where = AttentionPass.of(layer, query, key, attention_mask, kwargs.get("position_ids"))
    patterned = [p for p in parts if not isinstance(p, StreamingWindow) or p.acts(layer, query.shape[2])]
    bias = _layer_bias(patterned, layer, where)
    window = _single_window(parts, layer, query.shape[2]) if softcap is None else None
    cached = _evicting_layer(parts, layer)
    evicted = cached is not None and cached.evicted
    rows = plan.capture.rows_for(query) if plan is not None and plan.capture is not None else None
    if rows is not None:
        plan.capture.sink(layer, _probs(query, key, attention_mask, scaling, rows, softcap, bias))
    if plan is not None and plan.inputs is not None:
        plan.inputs(layer, AttentionInputs(query, key, value, attention_mask, scaling, softcap))
    if evicted:
        output = _evicted_decode(query, key, value, attention_mask, scaling, softcap, cached)
    elif window is not None:
        output = _windowed_attention(query, key, value, attention_mask, scaling, window, where)
    elif softcap is not None or bias is not None:
        output = _manual_attention(query, key, value, attention_mask, scaling, softcap, bias)
    elif isinstance(attention_mask, RuleMask):  # a long pass whose mask is kept as its rule: query chunks
        output = chunked_sdpa(query, key, value, attention_mask, scaling, _ROW_CHUNK).transpose(1, 2).contiguous()
    else:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if cached is not None and not evicted:
        cached.evict(where.pad)  # the prefill saw every key; from now on the streaming heads keep sink + recent
    for part in parts:
        output = part.output(layer, output)
    if plan is not None and plan.head_outputs is not None:
        plan.head_outputs(layer, output)
    return output, None


def install(model: torch.nn.Module) -> None:
    """Route a model's attention through :func:`instrumented_attention` (idempotent), and mark
    its modules as this model's (a deep copy of a model is marked anew as its own)."""
    for module in model.modules():
        if module.__dict__.get(_MODEL_KEY) != id(model):
            module.__dict__[_MODEL_KEY] = id(model)
    AttentionInterface.register(ATTN_IMPLEMENTATION, instrumented_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, rule_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextmanager
def instrumented(
    model: torch.nn.Module,
    edit: AttentionEdit | None = None,
    capture: RowCapture | None = None,
    head_outputs: OutputSink | None = None,
    inputs: InputSink | None = None,
) -> Iterator[None]:
    """Apply ``edit`` and ``capture`` to every forward pass of ``model`` inside the block.

    ``head_outputs(layer, output)``, if given, receives each layer's attention output
    [batch, q_len, heads, head_dim] after the edit, i.e. what ``o_proj`` reads.
    ``inputs(layer, AttentionInputs)``, if given, receives what each layer's attention computes
    with (the tensors themselves: detach or reduce them, and mind that a prefill's are
    O(length) per layer).
    """
    install(model)
    token = _active.set({**_active.get(), id(model): _Plan(edit, capture, head_outputs, inputs)})
    try:
        yield
    finally:
        _active.reset(token)


def mean_head_outputs(
    model: torch.nn.Module, sequences: Iterable[Sequence[int]], heads: Iterable[Head] | None = None
) -> dict[Head, np.ndarray]:
    """Each head's output averaged over every position of ``sequences`` (unedited model), for
    ``"mean"`` head masks. Sequences run one at a time, so they need no padding; all heads if
    ``heads`` is None."""
    sums: dict[int, torch.Tensor] = {}
    count = 0

    def sink(layer: int, output: torch.Tensor) -> None:
        total = output.detach().double().sum(dim=(0, 1))
        sums[layer] = sums[layer] + total if layer in sums else total

    device = next(model.parameters()).device
    with torch.inference_mode(), instrumented(model, head_outputs=sink):
        for ids in sequences:
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False, logits_to_keep=1)
            count += len(ids)
    if count == 0:
        raise ValueError("mean_head_outputs needs at least one non-empty sequence")
    means = {layer: (total / count).float().cpu().numpy() for layer, total in sums.items()}
    if heads is None:
        heads = [(layer, h) for layer in sorted(means) for h in range(means[layer].shape[0])]
    return {(layer, h): means[layer][h] for layer, h in heads}
