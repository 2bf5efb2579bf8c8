"""Mask the selected heads (seed 000 claim 1). Control: as many random heads in each layer as were
selected there, drawn from that layer's other heads, masked with the same mode and phase.

Modes (``mode``):

* ``zero``: the head's output is zeroed before o_proj, so it contributes nothing (pruning);
* ``mean``: the head's output is replaced by its mean output vector (mean-ablation);
* ``uniform``: the head attends uniformly to every key its causal / sliding-window mask allows
  (Wu et al.'s masking).

Where every head of a layer is selected no head of that layer is left for the control:
``control_fallback: none`` stops the run and says so; ``same_type`` draws the shortfall from the
other layers of the same attention type (e.g. Gemma's global layers), and only then.

``phase`` picks the forward passes masked: ``prefill`` (the prompt), ``decode`` (each generated
token) or ``both``.

Mean outputs come from the model itself, before any edit, on a small fixed reference set: the
hook ``treatment(model, heads)`` sees no samples, so the set cannot be the run's samples.
It is ``mean_sequences`` orderings (seeded) of generic English sentences below, tokenised with
the model's tokenizer (each sentence appears once per sequence, so no head can copy repeats);
a model without a tokenizer (tiny test models) gets seeded random token ids of the same count.
The means are computed for every head once per model and reused by treatment and control.
"""

from __future__ import annotations

import numpy as np

from framework.api import (
    MASK_MODES,
    PHASES,
    AttentionEdit,
    ConfigError,
    Head,
    Intervention,
    LoadedModel,
    hookimpl,
    layer_groups_by_type,
    mean_head_outputs,
    random_heads_matched_per_layer,
)

_REFERENCE_SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Rain had fallen through the night, and the streets were still wet in the morning.",
    "She opened the window and listened to the sound of traffic far below.",
    "Most of the old houses on this road were built before the railway arrived.",
    "He wrote a short letter to his sister and posted it on the way to work.",
    "The museum closes early on Sundays, so we decided to visit on Saturday instead.",
    "A small dog followed the children all the way from the park to the bakery.",
    "Prices in the market rose slowly during the summer and fell again in autumn.",
    "The engineer checked every bolt on the bridge before the inspection began.",
    "After dinner they talked about books, films and the places they wanted to see.",
    "The library keeps its oldest maps in a cool room on the top floor.",
    "Nobody expected the concert to sell out, but every seat was taken by noon.",
]


CONTROL_FALLBACKS = ("none", "same_type")


class HeadMask(Intervention):
    def __init__(self, mode: str = "zero", phase: str = "both", mean_sequences: int = 8, control_fallback: str = "none"):
        if mode not in MASK_MODES:
            raise ConfigError(f"head_mask mode={mode!r} is unknown; choose one of {', '.join(MASK_MODES)}")
        if phase not in PHASES:
            raise ConfigError(f"head_mask phase={phase!r} is unknown; choose one of {', '.join(PHASES)}")
        if mean_sequences < 1:
            raise ConfigError("head_mask mean_sequences must be at least 1")
        if control_fallback not in CONTROL_FALLBACKS:
            raise ConfigError(f"head_mask control_fallback={control_fallback!r} is unknown; choose one of {', '.join(CONTROL_FALLBACKS)}")
        self.control_fallback = control_fallback
        self.mode = mode
        self.phase = phase
        self.mean_sequences = mean_sequences
        self._means: tuple[object, dict[Head, np.ndarray]] | None = None  # (model, means)

    def reference_sequences(self, model: LoadedModel) -> list[list[int]]:
        """The fixed token sequences mean outputs are computed on (see the module docstring)."""
        rng = np.random.default_rng(0)
        orders = [rng.permutation(len(_REFERENCE_SENTENCES)) for _ in range(self.mean_sequences)]
        if model.tokenizer is None:
            vocab = model.model.config.get_text_config().vocab_size
            return [rng.integers(0, vocab, size=8 * len(order)).tolist() for order in orders]
        texts = [" ".join(_REFERENCE_SENTENCES[i] for i in order) for order in orders]
        return [list(model.tokenizer(text)["input_ids"]) for text in texts]

    def mean_outputs(self, model: LoadedModel) -> dict[Head, np.ndarray]:
        """Every head's mean output on the reference sequences, computed once per model."""
        if self._means is None or self._means[0] is not model.model:
            self._means = (model.model, mean_head_outputs(model.model, self.reference_sequences(model)))
        return self._means[1]

    def mask(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        means = self.mean_outputs(model) if self.mode == "mean" else None
        return AttentionEdit.mask_heads(heads, self.mode, self.phase, means)

    def treatment(self, model: LoadedModel, heads: list[Head]) -> AttentionEdit:
        return self.mask(model, heads)

    def control(self, model: LoadedModel, heads: list[Head], rng: np.random.Generator) -> AttentionEdit:
        groups = None
        if self.control_fallback == "same_type":
            groups = layer_groups_by_type(model.model.config.get_text_config(), model.info.n_layers)
        return self.mask(model, random_heads_matched_per_layer(heads, model.info.n_heads, rng, groups))


@hookimpl
def register_interventions(register):
    register("head_mask", HeadMask)
