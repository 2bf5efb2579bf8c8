"""Greedy decoding with the KV cache, batched with left padding where it pays.

Samples are sorted by prompt length and packed into batches whose left padding stays within
``max_padding`` of the real tokens, so similar lengths share a batch and very different ones do
not waste compute on padding. Transformers derives positions from the attention mask, so each
sample's output equals unbatched greedy decoding (tested).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from framework.interfaces import LoadedModel, Sample
from framework.model.attention import AttentionEdit, instrumented


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
    ``progress(samples, prompt_tokens)`` is called after each batch."""
    outputs: dict[int, str] = {}
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id
    with torch.inference_mode(), instrumented(model.model, edit):
        for batch in length_batches([len(s.input_ids) for s in samples], batch_size, max_padding):
            width = max(len(samples[i].input_ids) for i in batch)
            rows = [[pad] * (width - len(samples[i].input_ids)) + samples[i].input_ids for i in batch]
            input_ids = torch.tensor(rows, device=model.device)
            attention_mask = torch.tensor(
                [[0] * (width - len(samples[i].input_ids)) + [1] * len(samples[i].input_ids) for i in batch],
                device=model.device,
            )
            generated = model.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
            for i, row in zip(batch, generated[:, width:]):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
            if progress is not None:
                progress(len(batch), sum(len(samples[i].input_ids) for i in batch))
    return [outputs[i] for i in range(len(samples))]
