"""DuoAttention (Xiao et al. 2024) gates: an optimisation-based detector of retrieval heads.

Follows mit-han-lab/duo-attention: ``duo_attn/train.py`` (the training loop), ``duo_attn/loss.py``
(``l1_loss``), ``duo_attn/patch/llama.py`` (the gated attention) and
``duo_attn/patch/streaming_attn.py`` (``generate_streaming_mask``):

* every KV head has a gate alpha in [0, 1] (initial 1, clamped to [0, 1] before every step); each
  of its query heads outputs ``alpha * full + (1 - alpha) * streaming`` attention, where streaming
  attention sees only the first ``sink_size`` keys and the last ``recent_size`` ones (the row's
  own key included);
* the loss is the mean over hidden dims of the squared difference between the gated and the full
  model's final hidden states, summed over the answer tokens and divided by their number, plus
  ``reg_weight`` x the mean |alpha| (``l1_loss``: the L1 norm over the number of gates);
* AdamW without weight decay, the learning rate ramped up over the first fifth of the steps and
  down over the last fifth (floor 0.1 x lr), one sample per step;
* the head's score is its KV head's gate.

The samples are synthetic multi-passkey prompts made by the detector (as ``MultiplePasskey
RetrievalDataset`` in ``duo_attn/data.py``): passkeys of random words inserted at random depths of a
filler text, then for each passkey its question followed by the passkey; the loss reads the tokens
of that question-and-answer part. No task sample is read (:attr:`Detector.own_samples`).

The gated attention is a :class:`framework.api.HeadEdit` whose ``output`` hook mixes the layer's
full output with a streaming output computed from the same query, key and value (handed over by
the ``inputs`` callback of :func:`framework.api.instrumented`), so gradients reach the gates
through the framework's own attention path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from framework.api import (
    AttentionEdit,
    AttentionInputs,
    ConfigError,
    Detector,
    Head,
    HeadEdit,
    HeadScores,
    LoadedModel,
    ModelInfo,
    Sample,
    attention_rows,
    check_selection,
    encode,
    hookimpl,
    instrumented,
    key_bias,
    select_heads,
    track,
)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest", "candle", "rocket", "violet",
         "marble", "anchor", "garden", "silver", "window", "hammer", "planet", "jacket", "meadow"]


def streaming_bias(rows: torch.Tensor, key_length: int, sink_size: int, recent_size: int) -> torch.Tensor:
    """[len(rows), key_length] additive bias of streaming attention: 0 on the first ``sink_size``
    keys and on the ``recent_size`` latest keys up to the row's own, -inf elsewhere (the causal
    mask is applied apart)."""
    keys = torch.arange(key_length, device=rows.device)
    allowed = (keys[None, :] < sink_size) | (keys[None, :] > rows[:, None] - recent_size)
    return torch.zeros(allowed.shape, device=rows.device).masked_fill(~allowed, float("-inf"))


class GatedStreaming(HeadEdit):
    """Each query head's output becomes ``gate * full + (1 - gate) * streaming``, gates per KV
    head [layers, kv_heads]; :meth:`inputs` must be passed as the block's ``inputs`` callback."""

    def __init__(self, gates: torch.Tensor, n_heads: int, sink_size: int, recent_size: int):
        self.gates, self.n_heads = gates, n_heads
        self.sink_size, self.recent_size = sink_size, recent_size
        self._streaming: dict[int, torch.Tensor] = {}

    @property
    def heads(self) -> list[Head]:
        return [(layer, head) for layer in range(self.gates.shape[0]) for head in range(self.n_heads)]

    def inputs(self, layer: int, inputs: AttentionInputs) -> None:
        """Compute this layer's streaming output from what its attention computes with."""
        q_len, k_len = inputs.query.shape[2], inputs.key.shape[2]
        rows = torch.arange(k_len - q_len, k_len, device=inputs.query.device)
        bias = key_bias(inputs.attention_mask, rows, q_len, k_len) + streaming_bias(rows, k_len, self.sink_size, self.recent_size)
        if inputs.softcap is None:  # torch's fused attention: the sink keys leave no row empty
            self._streaming[layer] = torch.nn.functional.scaled_dot_product_attention(
                inputs.query, inputs.key, inputs.value, attn_mask=bias.to(inputs.query.dtype), scale=inputs.scaling,
                enable_gqa=True)
        else:
            self._streaming[layer] = attention_rows(inputs.query, inputs.key, inputs.value, bias, inputs.scaling,
                                                    torch.arange(q_len, device=rows.device), inputs.softcap)

    def output(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        streaming = self._streaming.pop(layer).transpose(1, 2).to(output.dtype)  # [batch, q_len, heads, dim]
        gate = self.gates[layer].clamp(0, 1).repeat_interleave(self.n_heads // self.gates.shape[1])
        gate = gate.to(output.dtype)[None, None, :, None]
        return gate * output + (1 - gate) * streaming

    def describe(self) -> dict[str, Any]:
        return {"GatedStreaming": {"sink_size": self.sink_size, "recent_size": self.recent_size}}


def passkey_sample(tokenizer: Any, vocab_size: int, context_tokens: int, n_passkeys: int, passkey_words: int,
                   rng: np.random.Generator) -> tuple[list[int], int]:
    """One multi-passkey sequence and where its question-and-answer part starts. Without a
    tokenizer (tiny test models) the same layout is made of random token ids."""
    def tokens(text: str) -> list[int]:
        if tokenizer is not None:
            return encode(tokenizer, text)
        return rng.integers(3, vocab_size, size=max(1, len(text.split()))).tolist()

    filler = tokens(FILLER)
    haystack = (filler * (context_tokens // len(filler) + 1))[:context_tokens]
    keys = [" ".join(rng.choice(WORDS, size=passkey_words)) for _ in range(n_passkeys)]
    depths = np.sort(rng.choice(np.arange(1, 10), size=n_passkeys, replace=False)) / 10
    context: list[int] = []
    last = 0
    for ordinal, key, depth in zip(ORDINALS, keys, depths):
        cut = int(depth * len(haystack))
        needle = tokens(f" Remember this sequence of words, it's the {ordinal} passkey to the vault: {key}. ")
        context += haystack[last:cut] + needle
        last = cut
    context += haystack[last:] + tokens(" </book>.\n\n")
    prefix = ([tokenizer.bos_token_id] if tokenizer is not None and tokenizer.bos_token_id is not None else [])
    prefix += tokens("This is a very long story book: <book> ")
    question_answer: list[int] = []
    for ordinal, key in zip(ORDINALS, keys):
        question_answer += tokens(f"Based on the content of the book, what is the {ordinal} passkey to the vault?\n"
                                  f"Passkey: {key}\n\n")
    start = len(prefix) + len(context)
    return prefix + context + question_answer, start


def learning_rate_factor(step: int, steps: int) -> float:
    """DuoAttention's schedule: linear ramp up over the first fifth, down over the last, floor 0.1."""
    fifth = max(steps // 5, 1)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


class DuoGates(Detector):
    own_samples = True

    def __init__(self, steps: int = 40, lr: float = 0.02, reg_weight: float = 0.05, sink_size: int = 16,
                 recent_size: int = 64, context_tokens: int = 320, n_passkeys: int = 3, passkey_words: int = 4,
                 n_samples: int = 8, seed: int = 0, threshold: float | None = 0.5, top_k: int | None = None):
        if steps < 1 or lr <= 0 or reg_weight < 0:
            raise ConfigError(f"steps={steps} and lr={lr} must be positive, reg_weight={reg_weight} >= 0")
        if sink_size < 0 or recent_size < 1:
            raise ConfigError(f"sink_size={sink_size} must be >= 0 and recent_size={recent_size} >= 1")
        if not 1 <= n_passkeys <= len(ORDINALS) or passkey_words < 1 or n_samples < 1 or context_tokens < 1:
            raise ConfigError(f"n_passkeys={n_passkeys} must lie in 1..{len(ORDINALS)}; passkey_words={passkey_words}, "
                              f"n_samples={n_samples} and context_tokens={context_tokens} must be positive")
        self.steps, self.lr, self.reg_weight = steps, lr, reg_weight
        self.sink_size, self.recent_size = sink_size, recent_size
        self.context_tokens, self.n_passkeys, self.passkey_words = context_tokens, n_passkeys, passkey_words
        self.n_samples, self.seed = n_samples, seed
        self.threshold, self.top_k = threshold, top_k

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def samples(self, model: LoadedModel) -> list[tuple[list[int], int]]:
        """The detector's own multi-passkey sequences, each with the start of its answer part."""
        rng = np.random.default_rng(self.seed)
        return [passkey_sample(model.tokenizer, model.model.config.vocab_size, self.context_tokens, self.n_passkeys,
                               self.passkey_words, rng) for _ in range(self.n_samples)]

    def hidden(self, model: LoadedModel, ids: list[int], start: int) -> torch.Tensor:
        """Final hidden states [answer tokens, hidden] (after the final norm) of the tokens from ``start`` on."""
        out = model.model.base_model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
        return out.last_hidden_state[0, start:].float()

    def fit(self, model: LoadedModel, samples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """The gates [layers, kv_heads] after ``steps`` steps, and the loss curves."""
        info = model.info
        with torch.inference_mode():
            targets = [self.hidden(model, ids, start).clone() for ids, start in track(samples, unit="references")]
        gates = torch.ones(info.n_layers, info.n_kv_heads, device=model.device, requires_grad=True)
        optimiser = torch.optim.AdamW([gates], lr=self.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: learning_rate_factor(step, self.steps))
        gating = GatedStreaming(gates, info.n_heads, self.sink_size, self.recent_size)
        edit = AttentionEdit(parts=[gating])
        curves: dict[str, list[float]] = {"loss": [], "distill_loss": [], "reg_loss": []}
        for step in track(range(self.steps), unit="steps"):
            with torch.no_grad():
                gates.clamp_(0, 1)
            ids, start = samples[step % len(samples)]
            with instrumented(model.model, edit=edit, inputs=gating.inputs):
                gated = self.hidden(model, ids, start)
            distill = (gated - targets[step % len(samples)]).square().mean(-1).sum() / gated.shape[0]
            reg = gates.abs().sum() / gates.numel()
            loss = distill + self.reg_weight * reg
            (gates.grad,) = torch.autograd.grad(loss, [gates])  # the model's weights get no gradient
            optimiser.step()
            scheduler.step()
            for name, value in (("loss", loss), ("distill_loss", distill), ("reg_loss", reg)):
                curves[name].append(value.item())
        return gates.detach().clamp(0, 1), curves

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        own = self.samples(model)
        gates, curves = self.fit(model, own)
        scores = gates.repeat_interleave(model.info.n_heads // model.info.n_kv_heads, dim=1).cpu().numpy()
        extra = {"gates": gates.cpu().numpy(), "curves": curves, "final_loss": curves["loss"][-1],
                 "sequences": len(own), "tokens_per_sequence": float(np.mean([len(ids) for ids, _ in own]))}
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k), extra)


@hookimpl
def register_detectors(register):
    register("duo_gates", DuoGates)
