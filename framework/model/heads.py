"""Head selection shared by detectors and interventions: threshold / top-k selection of scored
heads, and random heads matched per layer for head-level controls."""

from __future__ import annotations

from collections import Counter

import numpy as np

from framework.interfaces import ConfigError, ModelInfo
from framework.model.attention import Head


def check_selection(threshold: float | None, top_k: int | None, info: ModelInfo) -> None:
    """Reject selections that cannot work on this model, before any model work."""
    if threshold is None and top_k is None:
        raise ConfigError("set a threshold or a top_k to select heads")
    if top_k is not None and not 0 < top_k <= info.n_heads_total:
        raise ConfigError(
            f"top_k={top_k} is impossible: {info.name} has {info.n_heads_total} heads "
            f"({info.n_layers} layers x {info.n_heads})"
        )


def select_heads(scores: np.ndarray, threshold: float | None = None, top_k: int | None = None) -> list[Head]:
    """Heads scoring above ``threshold``, or the ``top_k`` best (both given: top-k of those above).

    Ties are broken by (layer, head) order, so the selection is deterministic.
    """
    flat = scores.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))  # descending score, then index
    if threshold is not None:
        order = order[flat[order] > threshold]
    if top_k is not None:
        order = order[:top_k]
    return sorted((int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order)


def random_heads_matched_per_layer(
    heads: list[Head], n_heads: int, rng: np.random.Generator, layer_groups: list[list[int]] | None = None
) -> list[Head]:
    """As many random heads in each layer as ``heads`` has there, drawn from that layer's other heads.

    Where a layer has fewer other heads than it has selected (e.g. every head of a layer is a
    retrieval head), matching is impossible: a :class:`ConfigError` unless ``layer_groups`` is
    given, in which case the shortfall is drawn from the other layers of the layer's group (e.g.
    the layers of the same attention type). Without a shortfall the draw is the same either way.
    """
    chosen = []
    selected = set(heads)
    shortfall: dict[int, int] = {}
    for layer, count in sorted(Counter(layer for layer, _ in heads).items()):
        others = [h for h in range(n_heads) if (layer, h) not in selected]
        if count > len(others) and layer_groups is None:
            raise ConfigError(
                f"no matched random control: layer {layer} has {count} selected heads but only "
                f"{len(others)} others; select fewer heads, or let the control draw the rest from "
                "layers of the same attention type (head_mask: control_fallback=same_type)"
            )
        take = min(count, len(others))
        chosen += [(layer, int(h)) for h in rng.choice(others, size=take, replace=False)]
        if take < count:
            shortfall[layer] = count - take
    for layer, missing in shortfall.items():
        group = next(g for g in layer_groups if layer in g)
        pool = [(l, h) for l in group if l != layer for h in range(n_heads) if (l, h) not in selected and (l, h) not in chosen]
        if missing > len(pool):
            raise ConfigError(f"no random control: layer {layer} lacks {missing} heads and its layer group has only {len(pool)} free")
        chosen += [pool[i] for i in rng.choice(len(pool), size=missing, replace=False)]
    return sorted(chosen)


def layer_groups_by_type(model_config: object, n_layers: int) -> list[list[int]]:
    """Layers grouped by attention type (``config.layer_types``, e.g. Gemma's sliding-window and
    global layers); one group of all layers for a model without types."""
    types = getattr(model_config, "layer_types", None) or ["all"] * n_layers
    return [[l for l in range(n_layers) if types[l] == kind] for kind in dict.fromkeys(types)]
