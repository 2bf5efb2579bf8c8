"""Greedy decoding: batching with left padding does not change any sample's output."""

from __future__ import annotations

import numpy as np
import pytest

from framework.model.generation import greedy_generate, length_batches
from plugins.tasks.niah import NIAH


@pytest.mark.parametrize("seed", range(4))
def test_length_batches_cover_every_sample_within_the_padding_bound(seed):
    lengths = np.random.default_rng(seed).integers(50, 400, 40).tolist()
    batches = list(length_batches(lengths, batch_size=6, max_padding=0.2))
    assert sorted(i for b in batches for i in b) == list(range(40))
    for batch in batches:
        assert 1 <= len(batch) <= 6
        real = sum(lengths[i] for i in batch)
        assert len(batch) * max(lengths[i] for i in batch) <= 1.2 * real or len(batch) == 1


def test_batched_with_padding_equals_unbatched_greedy_decoding(embedded_model):
    task = NIAH(context_lengths=[180, 190, 200, 210], depths=[0.2, 0.8], samples_per_cell=1, max_new_tokens=8)
    samples = task.build_samples(embedded_model.tokenizer, "eval", seed=3)
    assert list(length_batches([len(s.input_ids) for s in samples], 8, 0.2)) == [list(range(8))]  # one padded batch
    one_by_one = greedy_generate(embedded_model, samples, task.max_new_tokens, batch_size=1)
    batched = greedy_generate(embedded_model, samples, task.max_new_tokens, batch_size=8)
    assert batched == one_by_one
    assert sum(task.score(s, o) for s, o in zip(samples, batched)) >= 4  # the model does retrieve here
