"""Greedy decoding: batching does not change any sample's output."""

from __future__ import annotations

from framework.generation import greedy_generate
from plugins.tasks.niah import NIAH


def test_batched_equals_unbatched_greedy_decoding(embedded_model):
    task = NIAH(context_lengths=[160, 200], depths=[0.2, 0.8], samples_per_cell=2, max_new_tokens=8)
    samples = task.build_samples(embedded_model.tokenizer, "eval", seed=3)
    one_by_one = greedy_generate(embedded_model, samples, task.max_new_tokens, batch_size=1)
    batched = greedy_generate(embedded_model, samples, task.max_new_tokens, batch_size=4)
    assert batched == one_by_one
    assert sum(task.score(s, o) for s, o in zip(samples, batched)) >= 1  # the model does retrieve
