"""Greedy decoding with the KV cache, batched with left padding where it pays.

Samples are sorted by prompt length and packed into batches whose left padding stays within
``max_padding`` of the real tokens, so similar lengths share a batch and very different ones do
not waste compute on padding. Transformers derives positions from the attention mask, so each
sample's output equals unbatched greedy decoding (tested).

Logits that are NaN or inf fail the batch (:class:`NonFiniteLogits`) instead of being decoded:
argmax makes some token of them, so a broken edit would otherwise be scored as a wrong answer.
The check costs one reduction per forward pass; only a failing batch is run again, to find the
layer where the values first stopped being finite.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from framework.interfaces import LoadedModel, Sample
from framework.model.attention import AttentionEdit, AttentionInputs, instrumented


class NonFiniteLogits(RuntimeError):
    """A sample's logits are NaN or inf: what it would generate from them means nothing."""


def length_batches(lengths: list[int], batch_size: int, max_padding: float) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length: padded size <= (1 + max_padding) x real."""
    batch: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        candidate = batch + [index]
        padded = len(candidate) * lengths[index]  # sorted: the newest is the longest
        if batch and (len(candidate) > batch_size or padded > (1 + max_padding) * sum(lengths[i] for i in candidate)):
            yield batch
            candidate = [index]
        batch = candidate
    if batch:
        yield batch


def _pass_name(index: int) -> str:
    return "the prefill" if index == 0 else f"decode step {index}"


@contextmanager
def _finite_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Per forward pass of ``model`` inside the block, whether each batch row's logits are finite
    ([batch] bool, left on the device: no synchronisation per pass)."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        seen.append(torch.isfinite(output.logits).flatten(1).all(1))

    handle = model.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


class _FirstNonFinite:
    """Where one batch row first holds NaN or inf inside the model: the forward pass, the layer, and
    whether in the query entering the layer's attention (after the edit's query hooks) or in its
    attention output (after the edit's output hooks). Only the row's real positions count: its
    ``pad`` left-pad positions of the prefill are never read by a real token."""

    def __init__(self, row: int, pad: int):
        self.row, self.pad = row, pad
        self.passes, self.last_layer = -1, -1
        self.found: tuple[int, int, str] | None = None

    def _check(self, layer: int, values: torch.Tensor, what: str) -> None:
        """``values`` [positions, ...] of the row in this pass."""
        if self.found is None:
            real = values[self.pad:] if values.shape[0] > 1 else values
            if not torch.isfinite(real).all():
                self.found = (self.passes, layer, what)

    def inputs(self, layer: int, inputs: AttentionInputs) -> None:
        if layer <= self.last_layer or self.passes < 0:
            self.passes += 1
        self.last_layer = layer
        self._check(layer, inputs.query[self.row].transpose(0, 1), "the query entering its attention")

    def output(self, layer: int, output: torch.Tensor) -> None:
        self._check(layer, output[self.row], "its attention output")


def _generate(
    model: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
    edit: AttentionEdit | None,
) -> torch.Tensor:
    """Greedy generation, with the KV cache the edit asks for (an evicting one) or the model's own."""
    with (edit or AttentionEdit()).kv_cache(model.model) as cache:
        return model.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=model.tokenizer.pad_token_id,
            **({"cache": cache} if cache is not None else {}),
        )


def _where_first(
    model: LoadedModel, edit: AttentionEdit | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int,
    passes: int,
) -> str:
    """Runs the batch again for ``passes`` forward passes, watching ``row``: where its values first
    stop being finite (the computation is deterministic, so the replay meets what the run met)."""
    watch = _FirstNonFinite(row, int((attention_mask[row] == 0).sum()))
    with instrumented(model.model, edit, head_outputs=watch.output, inputs=watch.inputs):
        _generate(model, input_ids, attention_mask, passes, edit)
    if watch.found is None:
        return "after the last layer's attention output (its o_proj or MLP, the final norm or the output head)"
    index, layer, what = watch.found
    return f"layer {layer} ({what}, in {_pass_name(index)})"


def greedy_generate(
    model: LoadedModel,
    samples: list[Sample],
    max_new_tokens: int,
    edit: AttentionEdit | None = None,
    batch_size: int = 8,
    progress: Callable[[int, float], None] | None = None,
    max_padding: float = 0.2,
) -> list[str]:
    """Generated text per sample (prompt excluded, special tokens removed), in sample order;
    ``progress(samples, prompt_tokens)`` is called after each batch. Raises
    :class:`NonFiniteLogits` naming the first sample whose logits are NaN or inf, and the layer."""
    outputs: dict[int, str] = {}
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id
    with torch.inference_mode(), instrumented(model.model, edit), _finite_logits(model.model) as finite:
        for batch in length_batches([len(s.input_ids) for s in samples], batch_size, max_padding):
            width = max(len(samples[i].input_ids) for i in batch)
            rows = [[pad] * (width - len(samples[i].input_ids)) + samples[i].input_ids for i in batch]
            input_ids = torch.tensor(rows, device=model.device)
            attention_mask = torch.tensor(
                [[0] * (width - len(samples[i].input_ids)) + [1] * len(samples[i].input_ids) for i in batch],
                device=model.device,
            )
            finite.clear()
            generated = _generate(model, input_ids, attention_mask, max_new_tokens, edit)
            failing = (~torch.stack(finite)).nonzero() if finite else []  # [pass, row] pairs, in pass order
            if len(failing):
                index, bad = failing[0].tolist()
                where = _where_first(model, edit, input_ids, attention_mask, bad, index + 1)
                raise NonFiniteLogits(f"the logits of sample {samples[batch[bad]].id!r} are NaN or inf from "
                                      f"{_pass_name(index)} on; they first appear in {where}")
            for i, row in zip(batch, generated[:, width:]):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
            if progress is not None:
                progress(len(batch), sum(len(samples[i].input_ids) for i in batch))
    return [outputs[i] for i in range(len(samples))]
