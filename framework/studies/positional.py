"""The NoPE switch: a transformers model without rotary position embedding, otherwise unchanged.

Chiang & Yogatama (2025, Sec. 4) compare a model trained with RoPE against the same model
trained without position encoding (NoPE). Transformers' Llama classes have no NoPE option, so
:func:`remove_rope` swaps the model's rotary embedding for :class:`NoRotaryEmbedding`, which
returns cos = 1 and sin = 0: ``q * cos + rotate_half(q) * sin`` is then ``q`` exactly, for
every position. Nothing else changes (no parameters are added or removed), so a NoPE model and
its RoPE twin built from the same seed start from identical weights, and every detector and
intervention of the framework runs on it unchanged. The module keeps the ``inv_freq`` buffer of
the embedding it replaces: it has no effect on the computation, but :mod:`framework.model.rope` still
names each query dimension by the RoPE pair it would belong to, so the two twins' dimensions
are compared pair by pair.
"""

from __future__ import annotations

import torch
from torch import nn


class NoRotaryEmbedding(nn.Module):
    """Drop-in for a rotary embedding module: the identity rotation at every position."""

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.inv_freq = nn.Buffer(inv_freq.detach().clone(), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos = 1, sin = 0 with the shape and dtype the rotary embedding would give:
        [batch, positions, head_dim] in ``x``'s dtype."""
        shape = (*position_ids.shape, 2 * self.inv_freq.shape[0])
        cos = torch.ones(shape, dtype=x.dtype, device=x.device)
        return cos, torch.zeros_like(cos)


def remove_rope(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a transformers decoder with one shared ``model.model.rotary_emb``,
    e.g. Llama) to NoPE in place and return it."""
    decoder = getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no shared rotary embedding (model.model.rotary_emb) to remove")
    decoder.rotary_emb = NoRotaryEmbedding(rotary.inv_freq)
    return model


def uses_rope(model: nn.Module) -> bool:
    """False once :func:`remove_rope` has switched ``model`` to NoPE."""
    return not isinstance(getattr(model.model, "rotary_emb", None), NoRotaryEmbedding)
