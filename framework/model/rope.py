"""RoPE dimension layout: which query dimensions carry which rotation frequency.

Hugging Face models rotate with ``rotate_half``: dimension ``j`` and ``j + head_dim/2`` form one
rotation pair with frequency ``inv_freq[j]`` (j = 0 the highest). Frequencies are read from the
model's own rotary embedding, so llama3 / yarn / linear scaling is respected, and per layer,
because some families give layer types their own RoPE (Gemma-3: base 1e4 on sliding-window
layers, 1e6 on global ones). Zeroing a whole pair of the query after RoPE equals zeroing it
before, because the rotation stays inside the pair.

Two readings of "query dimensions" are offered, named apart:

* frequency pairs (``*_frequency_dims``, ``pair_dims``, ``pair_scale``): both halves of each
  pair, chosen by frequency; what "zero the lowest-frequency dims" means (seed 000, claim 4);
* raw indices (``first_raw_dims``, ``last_raw_dims``): Chiang & Yogatama's "first / last n
  dims", which under rotate_half are single halves of the highest / lowest frequency pairs.

All of them return dimension indices or per-dimension scales for
:class:`framework.model.attention.AttentionEdit` (``zero_query_dims`` or ``query_scale``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

from framework.interfaces import ConfigError

Scale = TypeVar("Scale", np.ndarray, torch.Tensor)


def _text_config(model: torch.nn.Module) -> Any:
    return getattr(model.config, "text_config", None) or model.config


def _find_inv_freq(model: torch.nn.Module, layer_type: str | None) -> np.ndarray:
    """The rotary buffer for ``layer_type`` (``<type>_inv_freq``, Gemma-3 style) or the shared one."""
    names = ([f"{layer_type}_inv_freq"] if layer_type else []) + ["inv_freq"]
    for name in names:
        for module in model.modules():
            inv_freq = getattr(module, name, None)
            if isinstance(inv_freq, torch.Tensor):
                return inv_freq.detach().float().cpu().numpy()
    raise ConfigError(f"{type(model).__name__} has no rotary embedding with an inv_freq buffer")


def layer_inv_freq(model: torch.nn.Module) -> np.ndarray:
    """The RoPE frequencies each layer uses: [n_layers, head_dim / 2].

    Read when called: RoPE types that rescale at run time (``dynamic``) are not followed.
    """
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    return np.stack([_find_inv_freq(model, layer_type) for layer_type in layer_types])


def model_inv_freq(model: torch.nn.Module) -> np.ndarray:
    """The global (full-attention) layers' RoPE frequencies, one per rotation pair."""
    return _find_inv_freq(model, "full_attention")


# --- frequency-pair reading --------------------------------------------------------------------


def pair_dims(pairs: np.ndarray, head_dim: int) -> np.ndarray:
    """Both query dimensions of each rotation pair, under the rotate_half layout."""
    pairs = np.asarray(pairs, dtype=int)
    return np.sort(np.concatenate([pairs, pairs + head_dim // 2]))


def pair_scale(pair_values: Scale) -> Scale:
    """A per-dimension query scale [head_dim] from one value per rotation pair [head_dim / 2]:
    both halves of pair j get ``pair_values[j]``. Booleans (True = keep) or reals; a torch
    tensor keeps its autograd graph, for learned masks such as Chiang & Yogatama's utility."""
    if isinstance(pair_values, torch.Tensor):
        return torch.cat([pair_values, pair_values])
    return np.concatenate([pair_values, pair_values])


def check_dim_count(n_dims: int, head_dim: int) -> None:
    """Dimension counts act on whole rotation pairs, so they must be even and fit the head."""
    if n_dims <= 0 or n_dims > head_dim or n_dims % 2:
        raise ConfigError(
            f"n_dims={n_dims} is impossible: it must be an even number between 2 and the "
            f"head dimension {head_dim} (dims are zeroed as whole RoPE pairs)"
        )


def lowest_frequency_dims(inv_freq: np.ndarray, n_dims: int) -> np.ndarray:
    """The ``n_dims`` query dimensions of the ``n_dims / 2`` lowest-frequency pairs."""
    head_dim = 2 * len(inv_freq)
    check_dim_count(n_dims, head_dim)
    return pair_dims(np.argsort(inv_freq, kind="stable")[: n_dims // 2], head_dim)


def highest_frequency_dims(inv_freq: np.ndarray, n_dims: int) -> np.ndarray:
    """The ``n_dims`` query dimensions of the ``n_dims / 2`` highest-frequency pairs."""
    head_dim = 2 * len(inv_freq)
    check_dim_count(n_dims, head_dim)
    return pair_dims(np.argsort(-np.asarray(inv_freq), kind="stable")[: n_dims // 2], head_dim)


def random_pair_dims(head_dim: int, n_dims: int, rng: np.random.Generator) -> np.ndarray:
    """``n_dims`` query dimensions forming ``n_dims / 2`` rotation pairs drawn at random."""
    check_dim_count(n_dims, head_dim)
    return pair_dims(rng.choice(head_dim // 2, size=n_dims // 2, replace=False), head_dim)


# --- raw-index reading -------------------------------------------------------------------------


def check_raw_count(n_dims: int, head_dim: int) -> None:
    """Raw-index readings take any count of single dimensions that fits the head."""
    if not 0 < n_dims <= head_dim:
        raise ConfigError(f"n_dims={n_dims} is impossible: it must lie between 1 and the head dimension {head_dim}")


def first_raw_dims(n_dims: int, head_dim: int) -> np.ndarray:
    """Raw query dimensions 0 .. n_dims - 1 (under rotate_half: first halves of the
    highest-frequency pairs, as long as n_dims <= head_dim / 2)."""
    check_raw_count(n_dims, head_dim)
    return np.arange(n_dims)


def last_raw_dims(n_dims: int, head_dim: int) -> np.ndarray:
    """Raw query dimensions head_dim - n_dims .. head_dim - 1 (under rotate_half: second halves
    of the lowest-frequency pairs, as long as n_dims <= head_dim / 2)."""
    check_raw_count(n_dims, head_dim)
    return np.arange(head_dim - n_dims, head_dim)


def random_raw_dims(head_dim: int, n_dims: int, rng: np.random.Generator) -> np.ndarray:
    """``n_dims`` query dimensions drawn at random, one by one (no pair structure)."""
    check_raw_count(n_dims, head_dim)
    return np.sort(rng.choice(head_dim, size=n_dims, replace=False))
