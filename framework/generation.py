"""Greedy decoding with the KV cache, batched over samples of equal length.

Samples are grouped by prompt length, so batches need no padding and each sample's output is
what unbatched greedy decoding gives (up to float rounding of batched kernels).
"""

from __future__ import annotations

from itertools import groupby
from typing import Callable

import torch

from framework.attention import AttentionEdit, instrumented
from framework.interfaces import LoadedModel, Sample


def greedy_generate(
    model: LoadedModel,
    samples: list[Sample],
    max_new_tokens: int,
    edit: AttentionEdit | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Generated text per sample (prompt excluded, special tokens removed), in sample order."""
    outputs: dict[int, str] = {}
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    tokenizer = model.tokenizer
    with torch.inference_mode(), instrumented(model.model, edit):
        for _, same_length in groupby(order, key=lambda i: len(samples[i].input_ids)):
            same_length = list(same_length)
            for start in range(0, len(same_length), batch_size):
                batch = same_length[start : start + batch_size]
                input_ids = torch.tensor([samples[i].input_ids for i in batch], device=model.device)
                generated = model.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for i, row in zip(batch, generated[:, input_ids.shape[1] :]):
                    outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
                if progress is not None:
                    progress(len(batch))
    return [outputs[i] for i in range(len(samples))]
