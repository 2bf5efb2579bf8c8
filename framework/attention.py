"""Attention instrumentation: the one place where the framework reads and edits attention.

The model runs with a registered transformers attention function (``ATTN_IMPLEMENTATION``)
that sees every layer's query, key and value after RoPE (and after QK-norm where a family has
it). Outside an :func:`instrumented` block it is plain SDPA. Inside one it can

* scale query dimensions per head before the scores are computed (zeroing RoPE pairs or raw
  dimensions; a real-valued scale is allowed),
* zero a head's output before ``o_proj``, so the head contributes nothing to the layer,
* capture softmax rows for chosen query positions only: memory O(rows x length) per layer,
  while the layer's output is still computed by SDPA.

Detectors and interventions go through this module; none of them patches model internals.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

Head = tuple[int, int]  # (layer, head)
ATTN_IMPLEMENTATION = "retrieval_heads"
_ROW_CHUNK = 256


@dataclass
class AttentionEdit:
    """A set of per-head edits applied together.

    ``query_scale[(layer, head)]`` multiplies that head's query, dimension by dimension (length
    ``head_dim``; 0 removes a dimension from q.k). ``zeroed_heads`` contribute nothing to their
    layer's output.
    """

    zeroed_heads: set[Head] = field(default_factory=set)
    query_scale: dict[Head, np.ndarray] = field(default_factory=dict)

    @classmethod
    def zero_query_dims(cls, dims_by_head: dict[Head, np.ndarray], head_dim: int) -> AttentionEdit:
        """Remove the given query dimensions of each head from q.k."""
        scales = {}
        for head, dims in dims_by_head.items():
            scales[head] = np.ones(head_dim, dtype=np.float32)
            scales[head][np.asarray(dims, dtype=int)] = 0.0
        return cls(query_scale=scales)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: zeroed heads, and per head the query dims scaled below 1."""
        return {
            "zeroed_heads": sorted([list(h) for h in self.zeroed_heads]),
            "query_dims": {
                f"{layer}.{head}": np.flatnonzero(scale < 1).tolist()
                for (layer, head), scale in sorted(self.query_scale.items())
            },
        }


@dataclass
class RowCapture:
    """Capture softmax attention rows of chosen query positions during a prefill forward.

    ``rows`` indexes the query positions of the forward pass. ``sink(layer, probs)`` receives
    probabilities of shape [batch, heads, len(rows), key_length] for every layer, in order; it
    should reduce them right away, so that nothing of size heads x length^2 is ever held.
    """

    rows: torch.Tensor
    sink: Callable[[int, torch.Tensor], None]


class _Plan:
    """An edit compiled to per-layer tensors on the model's device, built lazily per layer."""

    def __init__(self, edit: AttentionEdit | None, capture: RowCapture | None):
        self.edit = edit or AttentionEdit()
        self.capture = capture
        self._layers: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def layer(self, layer: int, query: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if layer not in self._layers:
            n_heads, head_dim = query.shape[1], query.shape[3]
            scale = None
            heads = {h: s for (l, h), s in self.edit.query_scale.items() if l == layer}
            if heads:
                scale = torch.ones(n_heads, head_dim, dtype=query.dtype, device=query.device)
                for h, s in heads.items():
                    scale[h] = torch.as_tensor(s, dtype=query.dtype, device=query.device)
                scale = scale[None, :, None, :]
            keep = None
            zeroed = [h for (l, h) in self.edit.zeroed_heads if l == layer]
            if zeroed:
                keep = torch.ones(n_heads, dtype=query.dtype, device=query.device)
                keep[zeroed] = 0
                keep = keep[None, None, :, None]
            self._layers[layer] = (scale, keep)
        return self._layers[layer]


_active: _Plan | None = None


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention rows [batch, heads, len(rows), keys] for the given query positions.

    Follows SDPA's conventions: a boolean mask means True = attend, a float mask is added to
    the scores; with no mask a prefill is causal (upper-left aligned, keys cropped to the
    query length as SDPA does) and a single-token decode step sees every key.
    """
    n_groups = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1:
        key = key[:, :, :q_len]
        k_len = q_len
    key = repeat_kv(key, n_groups)
    scores = torch.matmul(query[:, :, rows].float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, rows, :k_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif q_len > 1:
        causal = torch.arange(k_len, device=query.device)[None, :] > rows[:, None]
        scores = scores.masked_fill(causal, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _manual_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention output [batch, q_len, heads, dim] computed in row chunks, for what SDPA lacks
    (logit soft-capping): memory stays O(chunk x length) per layer."""
    n_groups = query.shape[1] // key.shape[1]
    value = repeat_kv(value, n_groups)
    if attention_mask is None and query.shape[2] > 1:
        value = value[:, :, : query.shape[2]]
    chunks = []
    for start in range(0, query.shape[2], _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, query.shape[2]), device=query.device)
        probs = attention_probs(query, key, attention_mask, scaling, rows, softcap)
        chunks.append(torch.matmul(probs.to(value.dtype), value))
    return torch.cat(chunks, dim=2).transpose(1, 2).contiguous()


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
    """The registered attention function: SDPA plus the active plan's edits and capture."""
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    softcap = kwargs.pop("softcap", None)
    plan = _active
    if plan is not None:
        query_scale, head_keep = plan.layer(module.layer_idx, query)
        if query_scale is not None:
            query = query * query_scale
        if plan.capture is not None and query.shape[2] > 1:
            probs = attention_probs(query, key, attention_mask, scaling, plan.capture.rows, softcap)
            plan.capture.sink(module.layer_idx, probs)
    if softcap is not None:
        output = _manual_attention(query, key, value, attention_mask, scaling, softcap)
    else:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if plan is not None and head_keep is not None:
        output = output * head_keep
    return output, None


def install(model: torch.nn.Module) -> None:
    """Route a model's attention through :func:`instrumented_attention` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, instrumented_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextmanager
def instrumented(
    model: torch.nn.Module, edit: AttentionEdit | None = None, capture: RowCapture | None = None
) -> Iterator[None]:
    """Apply ``edit`` and ``capture`` to every forward pass of ``model`` inside the block."""
    global _active
    install(model)
    previous, _active = _active, _Plan(edit, capture)
    try:
        yield
    finally:
        _active = previous
