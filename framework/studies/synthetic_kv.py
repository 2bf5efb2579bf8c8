"""Synthetic key-value retrieval for training small transformers from scratch (Chiang &
Yogatama 2025, Sec. 4 and Appendix A), and the model they are trained in.

The paper learns n (query, key, value) vectors and draws, per sample, a subset of the key-value
pairs; an attention head must retrieve v_i with q_i. Its model is attention alone, so the answer
can only come from the retrieved value. A language model has a residual stream that would carry
a fixed value straight from the query token to the output, so here the value of each key is
drawn afresh for every sample and the model must read it from the context:

* one context token per pair, ``pair(k, v)``: the key and its value live in the same token, so
  retrieval is one attention hop that matches the query against keys by content, as in the
  paper (two tokens per pair would need a position-based "previous token" step, which a NoPE
  model can only infer indirectly from the causal mask, and the study would compare that);
* then ``query(k)`` for one of the pairs' keys; the next token to predict is ``value(v)``.

Positions: with ``spread_positions`` the sequence's tokens sit at sorted random distinct
positions in [0, max_position), so the distance between query and gold pair varies up to
``max_position`` (the paper's "maximum position of 2048"); otherwise they are 0 .. length-1.
Batches carry an explicit all-ones attention mask: without it transformers reads gaps in
``position_ids`` as boundaries between packed sequences and would cut the attention there.

The model is transformers' own :class:`LlamaForCausalLM` (RoPE as in LLaMA); the NoPE twin is
the same model after :func:`framework.studies.positional.remove_rope`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from framework.interfaces import ConfigError, Sample
from framework.model.attention import AttentionEdit, instrumented
from framework.studies.positional import remove_rope


@dataclass
class KVBatch:
    """Sequences of pair tokens followed by one query token, and what must come next."""

    input_ids: torch.Tensor  # [batch, pairs + 1]
    position_ids: torch.Tensor  # [batch, pairs + 1], increasing
    answers: torch.Tensor  # [batch] value token ids
    targets: torch.Tensor  # [batch] index of the gold pair in the context

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.ones_like(self.input_ids)

    def to(self, device: torch.device | str) -> KVBatch:
        return KVBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.answers, self.targets)))


@dataclass(frozen=True)
class KVTask:
    """The vocabulary and the sampler of the synthetic task (see the module docstring)."""

    n_keys: int
    n_values: int
    pairs_per_sample: int
    max_position: int
    spread_positions: bool = True

    def __post_init__(self) -> None:
        if self.n_keys < 2 or self.n_values < 2:
            raise ConfigError(f"n_keys={self.n_keys} and n_values={self.n_values} must both be at least 2")
        if not 2 <= self.pairs_per_sample <= self.n_keys:
            raise ConfigError(
                f"pairs_per_sample={self.pairs_per_sample} must lie between 2 and n_keys={self.n_keys}: "
                "the keys of one sample are distinct"
            )
        if self.max_position < self.length:
            raise ConfigError(
                f"max_position={self.max_position} is too small for {self.pairs_per_sample} pairs plus the query "
                f"({self.length} positions)"
            )

    @property
    def length(self) -> int:
        return self.pairs_per_sample + 1

    @property
    def vocab_size(self) -> int:
        return self.n_keys * self.n_values + self.n_keys + self.n_values

    def pair_token(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return keys * self.n_values + values

    def query_token(self, keys: torch.Tensor) -> torch.Tensor:
        return self.n_keys * self.n_values + keys

    def value_token(self, values: torch.Tensor) -> torch.Tensor:
        return self.n_keys * self.n_values + self.n_keys + values

    def batch(self, size: int, generator: torch.Generator, spread_positions: bool | None = None) -> KVBatch:
        """``size`` samples drawn with ``generator``; positions spread or not as configured
        unless ``spread_positions`` says otherwise."""
        spread = self.spread_positions if spread_positions is None else spread_positions
        keys = torch.rand(size, self.n_keys, generator=generator).argsort(-1)[:, : self.pairs_per_sample]
        values = torch.randint(self.n_values, (size, self.pairs_per_sample), generator=generator)
        targets = torch.randint(self.pairs_per_sample, (size,), generator=generator)
        rows = torch.arange(size)
        input_ids = torch.cat([self.pair_token(keys, values), self.query_token(keys[rows, targets])[:, None]], dim=1)
        if spread:
            positions = torch.rand(size, self.max_position, generator=generator).argsort(-1)[:, : self.length]
            positions = positions.sort(-1).values
        else:
            positions = torch.arange(self.length).expand(size, -1)
        return KVBatch(input_ids, positions, self.value_token(values[rows, targets]), targets)

    def samples(self, count: int, seed: int) -> list[Sample]:
        """Framework samples at contiguous positions (detectors feed plain ``input_ids``): the
        pairs are the context, the gold pair the needle, the query token starts the question."""
        batch = self.batch(count, torch.Generator().manual_seed(seed), spread_positions=False)
        pairs = self.pairs_per_sample
        return [
            Sample(
                id=f"kv-{seed}-{i}",
                input_ids=batch.input_ids[i].tolist(),
                answer=str(int(batch.answers[i])),
                answer_ids=[int(batch.answers[i])],
                context_span=(0, pairs),
                query_start=pairs,
                needle_span=(int(batch.targets[i]), int(batch.targets[i]) + 1),
                meta={"seed": seed, "gold_index": int(batch.targets[i])},
            )
            for i in range(count)
        ]


def build_model(
    task: KVTask,
    rope: bool,
    hidden_size: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    intermediate_size: int,
    rope_theta: float,
    seed: int,
) -> LlamaForCausalLM:
    """A randomly initialised Llama for ``task``; the same ``seed`` gives the RoPE and the NoPE
    variant identical initial weights (the switch adds or removes no parameters)."""
    if hidden_size < 1 or n_layers < 1 or n_heads < 1 or intermediate_size < 1:
        raise ConfigError("hidden_size, n_layers, n_heads and intermediate_size must all be at least 1")
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} must be even: RoPE rotates pairs of dimensions")
    config = LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        head_dim=head_dim,
        max_position_embeddings=task.max_position,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model if rope else remove_rope(model)


def answer_logits(model: torch.nn.Module, batch: KVBatch) -> torch.Tensor:
    """[batch, vocab] logits of the token after the query."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=1)
    return out.logits[:, -1]


def retrieval_loss(model: torch.nn.Module, batch: KVBatch) -> torch.Tensor:
    """Mean cross-entropy of the answer token (the paper's -E log P(v_i | q_i, K, V))."""
    return torch.nn.functional.cross_entropy(answer_logits(model, batch).float(), batch.answers)


def retrieval_accuracy(model: torch.nn.Module, batch: KVBatch, edit: AttentionEdit | None = None) -> float:
    """Share of samples whose greedy next token is the gold value, under ``edit`` if given."""
    with torch.no_grad(), instrumented(model, edit):
        return float((answer_logits(model, batch).argmax(-1) == batch.answers).float().mean())
