"""Attention masks kept as the rule that makes them, for long passes.

transformers builds every layer type's mask as a [batch, 1, q_len, k_len] bool tensor unless SDPA's
``is_causal`` can stand in for it. Sliding-window layers (Gemma-2/3, Mistral with a window) and
padded batches can never skip it, so a 32K prefill held a 32K x 32K mask (1 GiB as bool, more
once SDPA turns it into a float bias): most of Gemma-3-270m's 8.8 GiB peak at 32K.

:func:`rule_mask` is the mask function this framework registers with transformers. Below
:data:`DENSE_LIMIT` entries it returns what transformers' own ``sdpa_mask`` returns (so short
passes and decode steps are unchanged). Above it, it returns a :class:`RuleMask`: the mask
function and the offsets, from which any block of rows is built on demand. The attention engine
(:mod:`framework.model.attention`) reads it in query chunks: :func:`chunked_sdpa` attends each
chunk of 256 rows to the keys its rows may see (its window, or everything before it), with a
chunk x span mask, so a layer's mask costs O(chunk x length) memory and a sliding-window layer
O(length x window) time. Every reader that slices a mask as ``mask[:, :, rows, :k]`` or
``mask[:, 0, rows, :k]`` gets those rows as a bool tensor; :meth:`RuleMask.dense` builds the whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.masking_utils import and_masks, padding_mask_function, prepare_padding_mask, sdpa_mask

DENSE_LIMIT = 1 << 22
"""q_len x k_len entries (a 2K x 2K prefill) above which a layer's mask is a :class:`RuleMask`."""


@dataclass(frozen=True, eq=False)
class RuleMask:
    """A [batch, 1, q_len, k_len] bool attention mask (True = attend) kept as transformers' mask
    function: query row ``i`` is index ``q_offset + i`` and key ``j`` index ``kv_offset + j`` of
    the function, which holds causality, the sliding window (``window``: keys more than
    ``window - 1`` before a query are masked) and the padding. Rows are built on demand."""

    function: Callable[..., torch.Tensor]
    batch: int
    q_length: int
    k_length: int
    q_offset: int
    kv_offset: int
    window: int | None
    padding: torch.Tensor | None  # [batch, k_length] bool, True on real keys; None: no padding
    device: torch.device

    dtype = torch.bool
    ndim = 4

    @property
    def shape(self) -> torch.Size:
        """[batch, 1, q_len, k_len], as the dense mask's."""
        return torch.Size((self.batch, 1, self.q_length, self.k_length))

    def block(self, rows: torch.Tensor, low: int = 0, high: int | None = None) -> torch.Tensor:
        """[batch, 1, len(rows), high - low]: what query ``rows`` may see of keys ``low:high``."""
        high = self.k_length if high is None else high
        batch = torch.arange(self.batch, device=self.device)[:, None, None, None]
        head = torch.zeros(1, dtype=torch.long, device=self.device)[None, :, None, None]
        query = (rows.to(self.device) + self.q_offset)[None, None, :, None]
        key = (torch.arange(low, high, device=self.device) + self.kv_offset)[None, None, None, :]
        return self.function(batch, head, query, key).expand(self.batch, 1, len(rows), high - low)

    def __getitem__(self, index: tuple[Any, ...]) -> torch.Tensor:
        """The slices the attention engine takes: ``[:, :, rows, :k]`` and ``[:, 0, rows, :k]``."""
        batch, head, rows, keys = index
        if batch != slice(None) or head not in (slice(None), 0) or not isinstance(keys, slice) or keys.step not in (None, 1):
            raise IndexError(f"a RuleMask is read as [:, :, rows, low:high] or [:, 0, rows, low:high], not {index}")
        if isinstance(rows, slice):
            rows = torch.arange(self.q_length, device=self.device)[rows]
        low, high, _ = keys.indices(self.k_length)
        block = self.block(torch.as_tensor(rows, device=self.device), low, high)
        return block[:, 0] if head == 0 else block

    def span(self, first_row: int, last_row: int) -> tuple[int, int]:
        """The keys ``low:high`` that rows ``first_row..last_row`` may see (causal, within the window)."""
        shift = self.q_offset - self.kv_offset
        high = min(self.k_length, last_row + shift + 1)
        low = 0 if self.window is None else max(0, first_row + shift - self.window + 1)
        return min(low, high), high

    @functools.cached_property
    def pad(self) -> torch.Tensor:
        """[batch] left-pad keys per sample: the padding's leading masked keys."""
        if self.padding is None:
            return torch.zeros(self.batch, dtype=torch.long, device=self.device)
        return (~self.padding).long().cumprod(dim=1).sum(dim=1)

    def dense(self) -> torch.Tensor:
        """The whole [batch, 1, q_len, k_len] mask (O(q_len x k_len): for short passes and tests)."""
        return self.block(torch.arange(self.q_length, device=self.device))


def rule_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable[..., torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
    local_size: int | None = None, allow_is_causal_skip: bool = True, use_vmap: bool = False,
    device: torch.device | str = "cpu", **kwargs: Any,
) -> torch.Tensor | RuleMask | None:
    """transformers' ``sdpa_mask`` (None where SDPA's causal flag does, a bool tensor for small
    passes), or a :class:`RuleMask` where the tensor would exceed :data:`DENSE_LIMIT` entries.
    Custom mask functions (``use_vmap``: bidirectional overlays, packed sequences) stay dense."""
    arguments = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, device=device, **kwargs)
    if mask_function is not None:
        arguments["mask_function"] = mask_function
    if use_vmap or mask_function is None or q_length * kv_length <= DENSE_LIMIT or isinstance(q_offset, torch.Tensor):
        return sdpa_mask(**arguments)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None and bool(padding[:, kv_offset: kv_offset + kv_length].all()):
        padding = None
    if padding is None and local_size is None and q_length == kv_length and allow_is_causal_skip:
        return sdpa_mask(**arguments)  # plain causal: None, SDPA's is_causal
    function = mask_function if padding is None else and_masks(mask_function, padding_mask_function(padding))
    real = None if padding is None else padding[:, kv_offset: kv_offset + kv_length].bool()
    return RuleMask(function, batch_size, q_length, kv_length, int(q_offset), int(kv_offset), local_size, real,
                    torch.device(device))


def chunked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: RuleMask, scaling: float,
                 chunk: int, kv_heads: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA of query [batch, heads, q_len, dim] under ``mask``, ``chunk`` query rows at a time
    against the keys those rows may see: output [batch, heads, q_len, dim]. ``kv_heads``: the KV
    head of each query head (default: the GQA groups in order, as SDPA's ``enable_gqa`` pairs them).
    A row that may see no key (a left-pad row) gets output 0, as on every other path."""
    chunks = []
    for start in range(0, query.shape[2], chunk):
        rows = torch.arange(start, min(start + chunk, query.shape[2]), device=query.device)
        low, high = mask.span(start, int(rows[-1]))
        allowed = mask.block(rows, low, high)
        keys, values = key[:, :, low:high], value[:, :, low:high]
        if kv_heads is not None:
            keys, values = keys[:, kv_heads], values[:, kv_heads]
        empty = ~allowed.any(dim=-1, keepdim=True)
        bias = torch.where(allowed | empty, 0.0, float("-inf")).to(query.dtype)
        output = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start: start + len(rows)], keys, values, attn_mask=bias, scale=scaling,
            enable_gqa=keys.shape[1] != query.shape[1])
        chunks.append(output.masked_fill_(empty, 0.0))
    return torch.cat(chunks, dim=2)
