"""Chiang & Yogatama (2025, Sec. 5.2, Eq. 4) utility of each query dimension, per head.

For every head a mask u in [0, 1]^d on its query (after RoPE, as the attention sees it) minimises

    mean over query rows of ||Attn(q, K, V) - Attn(q * u, K, V)||^2  +  alpha * ||u||_1,

alpha = 1 / (2d), d = head_dim; dims with u < 0.5 are low utility (the paper masks them in its
Table 1). The paper feeds instruction, documents, question and the model's generation; here
each sample's prompt plus its gold answer (teacher forced), with the query rows from
``query_start`` on (``rows: all`` takes every row).

Each sample runs through the model once: every layer's post-RoPE query, key, value, mask and
scaling are captured (:class:`framework.model.attention.AttentionInputs`), the samples are padded into
one batch per layer and u is fitted on those tensors alone, all heads of a layer in one batched
problem (their losses are independent, so summing them fits each head on its own). u starts at
1, where the reconstruction term is exactly 0, and is fitted by full-batch Adam projected onto
[0, 1] after every step: no random draw, so the result is deterministic without a seed.

Head score (``score``): ``lowfreq`` (default) is the mean utility of the lowest-frequency half of
the RoPE pairs (both halves of each pair, the layer's own frequencies), which the paper finds
higher in retrieval heads (its Fig. 3); ``kept`` is the fraction of dims with u >= 0.5. Both lie
in [0, 1]; no paper cut-off exists, so the default selection is the top 20.
"""

from __future__ import annotations

import numpy as np
import torch

from framework.api import (
    AttentionInputs,
    ConfigError,
    Detector,
    Head,
    HeadScores,
    LoadedModel,
    ModelInfo,
    Sample,
    attention_rows,
    check_selection,
    hookimpl,
    instrumented,
    key_bias,
    layer_inv_freq,
    lowest_frequency_dims,
    select_heads,
    track,
)

SCORES = ("lowfreq", "kept")
ROWS = ("query", "all")
Captured = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # query rows, key, value, bias


def solve_utility(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    weight: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    steps: int = 200,
    lr: float = 0.05,
    alpha: float | None = None,
) -> torch.Tensor:
    """u [heads, head_dim] for one layer, from query rows [S, heads, R, d], key and value
    [S, kv_heads, T, d], an additive mask ``bias`` [S, 1, R, T] (see :func:`key_bias`) and row
    weights [S, R] (1 for a real row, 0 for padding)."""
    n_heads, head_dim = query.shape[1], query.shape[3]
    alpha = 1.0 / (2 * head_dim) if alpha is None else alpha
    rows = torch.arange(query.shape[2], device=query.device)

    def output(q: torch.Tensor) -> torch.Tensor:
        return attention_rows(q, key, value, bias, scaling, rows, softcap)

    with torch.no_grad():
        target = output(query)
    u = torch.ones(n_heads, head_dim, device=query.device, dtype=query.dtype, requires_grad=True)
    optimiser = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        error = (output(query * u[None, :, None, :]) - target).square().sum(-1)  # [S, heads, R]
        reconstruction = (error * weight[:, None, :]).sum(dim=(0, 2)) / weight.sum()
        (reconstruction + alpha * u.sum(-1)).sum().backward()
        optimiser.step()
        with torch.no_grad():
            u.clamp_(0.0, 1.0)
    return u.detach()


def _batch(parts: list[Captured]) -> tuple[torch.Tensor, ...]:
    """Pad one layer's captures of several samples into one batch, plus row weights: padded keys
    are masked, padded rows see every key (kept finite) and weigh 0."""
    n_rows, n_keys = max(q.shape[2] for q, *_ in parts), max(k.shape[2] for _, k, *_ in parts)
    query = parts[0][0].new_zeros(len(parts), parts[0][0].shape[1], n_rows, parts[0][0].shape[3])
    key = parts[0][1].new_zeros(len(parts), parts[0][1].shape[1], n_keys, parts[0][1].shape[3])
    value = torch.zeros_like(key)
    bias = query.new_full((len(parts), 1, n_rows, n_keys), float("-inf"))
    weight = query.new_zeros(len(parts), n_rows)
    for i, (q, k, v, b) in enumerate(parts):
        rows, keys = q.shape[2], k.shape[2]
        query[i, :, :rows], key[i, :, :keys], value[i, :, :keys], bias[i, :, :rows, :keys] = q[0], k[0], v[0], b[0]
        bias[i, :, rows:] = 0.0
        weight[i, :rows] = 1.0
    return query, key, value, bias, weight


class Utility(Detector):
    def __init__(
        self,
        threshold: float | None = None,
        top_k: int | None = 20,
        score: str = "lowfreq",
        rows: str = "query",
        include_answer: bool = True,
        steps: int = 200,
        lr: float = 0.05,
    ):
        if score not in SCORES:
            raise ConfigError(f"score={score!r} is unknown; choose one of {SCORES}")
        if rows not in ROWS:
            raise ConfigError(f"rows={rows!r} is unknown; choose one of {ROWS}")
        if steps < 1 or lr <= 0:
            raise ConfigError(f"steps={steps} and lr={lr} must be positive")
        self.threshold = threshold
        self.top_k = top_k
        self.score = score
        self.rows = rows
        self.include_answer = include_answer
        self.steps = steps
        self.lr = lr

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def capture(self, model: LoadedModel, sample: Sample) -> tuple[dict[int, Captured], dict[int, tuple[float, float | None]]]:
        """One forward pass: per layer the query rows, key, value and mask bias (float32,
        detached), and the layer's scaling and soft-cap."""
        ids = sample.input_ids + (sample.answer_ids if self.include_answer else [])
        rows = torch.arange(sample.query_start if self.rows == "query" else 0, len(ids), device=model.device)
        tensors: dict[int, Captured] = {}
        constants: dict[int, tuple[float, float | None]] = {}

        def sink(layer: int, inputs: AttentionInputs) -> None:
            q_len, k_len = inputs.query.shape[2], inputs.key.shape[2]
            tensors[layer] = (inputs.query[:, :, rows].float(), inputs.key.float(), inputs.value.float(),
                              key_bias(inputs.attention_mask, rows, q_len, k_len))
            constants[layer] = (inputs.scaling, inputs.softcap)

        with torch.no_grad(), instrumented(model.model, inputs=sink):  # not inference_mode: autograd needs them later
            model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
        return tensors, constants

    def head_scores(self, utility: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        """[layers, heads] from utility [layers, heads, head_dim] (see ``score``)."""
        if self.score == "kept":
            return (utility >= 0.5).mean(-1)
        n_pairs = inv_freq.shape[1]
        return np.stack([
            utility[layer][:, lowest_frequency_dims(freqs, 2 * (n_pairs // 2))].mean(-1)
            for layer, freqs in enumerate(inv_freq)
        ])

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        captures = [self.capture(model, s) for s in track(samples)]
        utility = []
        for layer in track(range(model.info.n_layers), unit="layers fitted"):
            batch = _batch([tensors.pop(layer) for tensors, _ in captures])  # pop: free each layer once fitted
            scaling, softcap = captures[0][1][layer]
            utility.append(solve_utility(*batch, scaling, softcap, self.steps, self.lr).cpu().numpy())
        utility = np.stack(utility)
        scores = self.head_scores(utility, layer_inv_freq(model.model))
        low: dict[Head, list[int]] = {
            (layer, head): np.flatnonzero(utility[layer, head] < 0.5).tolist()
            for layer in range(utility.shape[0]) for head in range(utility.shape[1])
        }
        extra = {"utility": utility, "low_utility_dims": low}
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k), extra)


@hookimpl
def register_detectors(register):
    register("utility", Utility)
