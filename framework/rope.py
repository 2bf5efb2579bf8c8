"""RoPE dimension layout: which query dimensions carry which rotation frequency.

Hugging Face models rotate with ``rotate_half``: dimension ``j`` and ``j + head_dim/2`` form one
rotation pair with frequency ``inv_freq[j]``. Frequencies are taken from the model's own rotary
embedding, so llama3 / yarn / linear scaling is respected. Zeroing a whole pair of the query
after RoPE equals zeroing it before, because the rotation stays inside the pair.
"""

from __future__ import annotations

import numpy as np
import torch

from framework.interfaces import ConfigError


def model_inv_freq(model: torch.nn.Module) -> np.ndarray:
    """The model's RoPE frequencies, one per rotation pair (length head_dim / 2)."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq.detach().float().cpu().numpy()
    raise ConfigError(f"{type(model).__name__} has no rotary embedding with an inv_freq buffer")


def pair_dims(pairs: np.ndarray, head_dim: int) -> np.ndarray:
    """Both query dimensions of each rotation pair, under the rotate_half layout."""
    pairs = np.asarray(pairs, dtype=int)
    return np.sort(np.concatenate([pairs, pairs + head_dim // 2]))


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
    pairs = np.argsort(inv_freq, kind="stable")[: n_dims // 2]
    return pair_dims(pairs, head_dim)


def random_pair_dims(head_dim: int, n_dims: int, rng: np.random.Generator) -> np.ndarray:
    """``n_dims`` query dimensions forming ``n_dims / 2`` rotation pairs drawn at random."""
    check_dim_count(n_dims, head_dim)
    pairs = rng.choice(head_dim // 2, size=n_dims // 2, replace=False)
    return pair_dims(pairs, head_dim)

