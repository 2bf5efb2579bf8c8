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
  them for mean-ablation (:func:`mean_head_outputs`).

No edit builds a heads x length^2 matrix: uniform attention is a zeroed query (every allowed
key then scores 0, so softmax is exactly uniform over the causal / sliding-window mask), and
only logit soft-capping (Gemma-2), which SDPA lacks, takes a manual path chunked over query rows.
Detectors and interventions go through this module; none of them patches model internals.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, get_args

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

Head = tuple[int, int]  # (layer, head)
MaskMode = Literal["zero", "mean", "uniform"]
Phase = Literal["prefill", "decode", "both"]
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
PHASES: tuple[str, ...] = get_args(Phase)
Vector = np.ndarray | torch.Tensor  # one value per head dimension
ATTN_IMPLEMENTATION = "retrieval_heads"
_ROW_CHUNK = 256


@dataclass
class AttentionEdit:
    """A set of per-head edits applied together, in the forward passes that ``phase`` selects.

    * ``head_masks[(layer, head)]`` is a :data:`MaskMode`: ``"zero"`` (the head contributes
      nothing to its layer), ``"mean"`` (its output is replaced by ``mean_outputs[head]``, a
      ``head_dim`` vector, see :func:`mean_head_outputs`) or ``"uniform"`` (its attention is
      uniform over the keys the causal / sliding-window mask allows: Wu et al.'s masking, done
      by zeroing the query so that every allowed score is 0).
    * ``query_scale[(layer, head)]`` multiplies that head's query (after RoPE and QK-norm)
      dimension by dimension: length ``head_dim``; 0 removes a dimension from q.k; a boolean
      vector keeps the True dimensions; a torch tensor with ``requires_grad`` receives gradients
      through instrumented forward passes. :mod:`framework.rope` maps RoPE frequency pairs or
      raw dimension indices to such vectors.
    * ``phase``: ``"prefill"`` edits passes with more than one query position, ``"decode"`` the
      one-token steps of generation, ``"both"`` every pass.
    """

    head_masks: dict[Head, MaskMode] = field(default_factory=dict)
    mean_outputs: dict[Head, Vector] = field(default_factory=dict)
    query_scale: dict[Head, Vector] = field(default_factory=dict)
    phase: Phase = "both"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} is unknown; choose one of {PHASES}")
        for head, mode in self.head_masks.items():
            if mode not in MASK_MODES:
                raise ValueError(f"head {head}: mask mode {mode!r} is unknown; choose one of {MASK_MODES}")
            if mode == "mean" and head not in self.mean_outputs:
                raise ValueError(f"head {head} is mean-ablated but has no mean output (see mean_head_outputs)")

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
        """Remove the given raw query dimensions of each head from q.k (see :mod:`framework.rope`
        for the dimensions of RoPE frequency pairs)."""
        scales = {}
        for head, dims in dims_by_head.items():
            scales[head] = np.ones(head_dim, dtype=np.float32)
            scales[head][np.asarray(dims, dtype=int)] = 0.0
        return cls(query_scale=scales, phase=phase)

    @property
    def heads(self) -> list[Head]:
        """Every head this edit touches (masked, or with query dims scaled)."""
        return sorted(set(self.head_masks) | set(self.query_scale))

    def applies_to(self, query_length: int) -> bool:
        """Whether a forward pass with this many query positions is edited (see ``phase``)."""
        return _phase_applies(self.phase, query_length)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: phase, mask mode per head, per head the query dims scaled."""
        return {
            "phase": self.phase,
            "head_masks": {f"{layer}.{head}": mode for (layer, head), mode in sorted(self.head_masks.items())},
            "query_dims": {
                f"{layer}.{head}": np.flatnonzero(_numpy(scale) != 1).tolist()
                for (layer, head), scale in sorted(self.query_scale.items())
            },
        }


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
    that nothing of size heads x length^2 is ever held. Gradients flow through ``probs``.

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
    convention (None = causal, see :func:`attention_probs`); the softmax scaling and the logit
    soft-cap (Gemma-2) or None. :func:`attention_rows` recomputes the head outputs from them."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    softcap: float | None = None


OutputSink = Callable[[int, torch.Tensor], None]  # (layer, output [batch, q_len, heads, head_dim])
InputSink = Callable[[int, AttentionInputs], None]  # (layer, what its attention computes with)


@dataclass
class _LayerEdit:
    """One layer's part of an edit, as tensors on the model's device and dtype."""

    query_scale: torch.Tensor | None = None  # [1, heads, 1, head_dim]
    replaced: torch.Tensor | None = None  # bool [heads, 1]: output replaced by ``fill``
    fill: torch.Tensor | None = None  # [heads, head_dim]: zeros or mean outputs


class _Plan:
    """An edit compiled per layer, lazily, on first use. Layers whose tensors need gradients are
    rebuilt on every call, so that each forward pass gets its own autograd graph."""

    def __init__(
        self,
        edit: AttentionEdit | None,
        capture: RowCapture | None,
        head_outputs: OutputSink | None,
        inputs: InputSink | None = None,
    ):
        self.edit = edit or AttentionEdit()
        self.capture = capture
        self.head_outputs = head_outputs
        self.inputs = inputs
        self._layers: dict[int, _LayerEdit] = {}

    def layer(self, layer: int, query: torch.Tensor) -> _LayerEdit:
        if layer in self._layers:
            return self._layers[layer]
        compiled = self._compile(layer, query)
        if not any(t is not None and t.requires_grad for t in (compiled.query_scale, compiled.fill)):
            self._layers[layer] = compiled
        return compiled

    def _compile(self, layer: int, like: torch.Tensor) -> _LayerEdit:
        n_heads, head_dim = like.shape[1], like.shape[3]

        def vector(value: Vector | float) -> torch.Tensor:
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value), device=like.device)
            if value.dim() and value.shape != (head_dim,):
                raise ValueError(f"layer {layer}: per-head vectors need shape ({head_dim},), got {tuple(value.shape)}")
            return value.to(device=like.device, dtype=like.dtype).expand(head_dim)

        masks = {h: m for (l, h), m in self.edit.head_masks.items() if l == layer}
        scales = {h: s for (l, h), s in self.edit.query_scale.items() if l == layer}
        result = _LayerEdit()
        if scales or "uniform" in masks.values():
            result.query_scale = torch.stack([
                vector(0.0) if masks.get(h) == "uniform" else vector(scales.get(h, 1.0)) for h in range(n_heads)
            ])[None, :, None, :]
        replaced = [h for h, m in masks.items() if m in ("zero", "mean")]
        if replaced:
            result.replaced = torch.zeros(n_heads, 1, dtype=torch.bool, device=like.device)
            result.replaced[replaced] = True
            result.fill = torch.stack([
                vector(self.edit.mean_outputs[(layer, h)]) if masks.get(h) == "mean" else vector(0.0)
                for h in range(n_heads)
            ])
        return result


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
    # per KV group (GQA): the group's query rows stacked against its one key, never a key repeated per query head
    grouped = query[:, :, rows].to(dtype).reshape(batch, n_kv, -1, head_dim)
    scores = torch.matmul(grouped, key.to(dtype).transpose(-1, -2)).view(batch, n_heads, len(rows), k_len) * scaling
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
    return torch.softmax(scores, dim=-1)


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
    chunks = []
    for start in range(0, query.shape[2], _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, query.shape[2]), device=query.device)
        chunks.append(attention_rows(query, key, value, attention_mask, scaling, rows, softcap))
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
    """The registered attention function: SDPA plus the active plan's edits and captures."""
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    softcap = kwargs.pop("softcap", None)
    plan = _active.get().get(getattr(module, _MODEL_KEY, None))
    edit = plan.layer(module.layer_idx, query) if plan and plan.edit.applies_to(query.shape[2]) else _LayerEdit()
    if edit.query_scale is not None:
        query = query * edit.query_scale
    rows = plan.capture.rows_for(query) if plan is not None and plan.capture is not None else None
    if rows is not None:
        plan.capture.sink(module.layer_idx, attention_probs(query, key, attention_mask, scaling, rows, softcap))
    if plan is not None and plan.inputs is not None:
        plan.inputs(module.layer_idx, AttentionInputs(query, key, value, attention_mask, scaling, softcap))
    if softcap is not None:
        output = _manual_attention(query, key, value, attention_mask, scaling, softcap)
    else:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if edit.replaced is not None:
        output = torch.where(edit.replaced, edit.fill, output)
    if plan is not None and plan.head_outputs is not None:
        plan.head_outputs(module.layer_idx, output)
    return output, None


def install(model: torch.nn.Module) -> None:
    """Route a model's attention through :func:`instrumented_attention` (idempotent), and mark
    its modules as this model's (a deep copy of a model is marked anew as its own)."""
    for module in model.modules():
        if module.__dict__.get(_MODEL_KEY) != id(model):
            module.__dict__[_MODEL_KEY] = id(model)
    AttentionInterface.register(ATTN_IMPLEMENTATION, instrumented_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
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
            model(input_ids=torch.tensor([list(ids)], device=device), logits_to_keep=1)
            count += len(ids)
    if count == 0:
        raise ValueError("mean_head_outputs needs at least one non-empty sequence")
    means = {layer: (total / count).float().cpu().numpy() for layer, total in sums.items()}
    if heads is None:
        heads = [(layer, h) for layer in sorted(means) for h in range(means[layer].shape[0])]
    return {(layer, h): means[layer][h] for layer, h in heads}
