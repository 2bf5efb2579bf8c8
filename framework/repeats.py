"""Heads that look back at earlier copies of the current token, scored on repeated random tokens.

RazorAttention (Tang et al. 2024) keeps the KV cache in full for two kinds of head, found by a
calibration on random tokens repeated several times (4 in its description; Huawei's msModelSlim
``ra_compress``), where every token after the first copy has earlier copies at known offsets:

* an **echo** head attends to the earlier occurrences of the current token (position ``p - k L``
  for a row ``p`` in copy ``c`` and ``k = 1..c``, ``L`` the length of one copy);
* an **induction** head attends to the token after each earlier occurrence (``p - k L + 1``),
  the token that came next last time.

A head's score is the attention its rows in the 2nd and later copies put on those targets,
summed over the targets and averaged over rows and sequences. With two copies there is one
earlier occurrence, "the previous occurrence"; with more, each earlier copy is one. The scores
are per query head; RazorAttention takes the maximum over each KV head's query group, which the
run logs for every detector (``kv_scores.json``). The sequences are made by the detector from a
seed: no task samples are read (:attr:`Detector.own_samples`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from framework.interfaces import ConfigError, Detector, HeadScores, LoadedModel, ModelInfo, Sample
from framework.model.attention import RowCapture, instrumented
from framework.model.heads import check_selection, select_heads
from framework.runner.progress import track


def repeated_random_tokens(
    vocab_size: int, length: int, repeats: int, n_sequences: int, seed: int, exclude: set[int] | frozenset[int] = frozenset()
) -> np.ndarray:
    """[n_sequences, length * repeats] token ids: ``length`` tokens drawn uniformly without
    replacement from the vocabulary less ``exclude`` (special tokens), repeated ``repeats`` times.
    Drawn without replacement, a token's only earlier occurrences are its earlier copies."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    if len(allowed) < length:
        raise ConfigError(f"length={length} needs that many distinct tokens; the vocabulary has {len(allowed)}")
    rng = np.random.default_rng(seed)
    return np.stack([np.tile(rng.choice(allowed, size=length, replace=False), repeats) for _ in range(n_sequences)])


def target_mask(length: int, repeats: int, offset: int, start: int = 0) -> np.ndarray:
    """[rows, keys] 0/1 mask of the targets of the rows in copies 2.. of a sequence whose first
    copy begins at position ``start`` (keys count from 0, the prefix included): row ``p`` in copy
    ``c`` (from 0) targets ``p - k * length + offset`` for ``k = 1..c``."""
    total = start + length * repeats
    rows = np.arange(start + length, total)
    mask = np.zeros((len(rows), total))
    for i, row in enumerate(rows):
        copy = (row - start) // length
        mask[i, [row - k * length + offset for k in range(1, copy + 1)]] = 1.0
    return mask


class PreviousOccurrence(Detector):
    """Base of the ``echo`` (``offset = 0``) and ``induction`` (``offset = 1``) detectors: the
    attention each head puts on the earlier copies of the current token, shifted by ``offset``."""

    offset: ClassVar[int]
    """Where a head looks relative to an earlier occurrence: 0 for the occurrence itself (echo), 1 for the token after it (induction)."""
    own_samples = True

    def __init__(self, length: int = 64, repeats: int = 4, n_sequences: int = 4, seed: int = 0,
                 threshold: float | None = None, top_k: int | None = 20):
        if length < 2 or repeats < 2 or n_sequences < 1:
            raise ConfigError(f"length={length} and repeats={repeats} must be at least 2, n_sequences={n_sequences} at least 1")
        self.length, self.repeats, self.n_sequences, self.seed = length, repeats, n_sequences, seed
        self.threshold, self.top_k = threshold, top_k

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def sequences(self, model: LoadedModel) -> tuple[np.ndarray, list[int]]:
        """The repeated random tokens and the prefix put before each (the BOS token, if any)."""
        tokenizer = model.tokenizer
        special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        config = model.model.config
        special |= {t for t in (config.bos_token_id, config.eos_token_id, config.pad_token_id) if isinstance(t, int)}
        bos = config.bos_token_id if tokenizer is None else tokenizer.bos_token_id
        prefix = [bos] if isinstance(bos, int) else []
        tokens = repeated_random_tokens(config.vocab_size, self.length, self.repeats, self.n_sequences, self.seed, special)
        return tokens, prefix

    def sequence_scores(self, model: LoadedModel, ids: list[int], targets: torch.Tensor) -> np.ndarray:
        """[layers, heads] attention mass on ``targets`` [rows, keys], averaged over the rows."""
        scores = np.zeros((model.info.n_layers, model.info.n_heads))
        rows = torch.arange(len(ids) - targets.shape[0], len(ids), device=model.device)

        def sink(layer: int, probs: torch.Tensor) -> None:
            scores[layer] = (probs[0].float() * targets).sum(-1).mean(-1).cpu().numpy()

        with torch.inference_mode(), instrumented(model.model, capture=RowCapture(rows, sink)):
            model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
        return scores

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        tokens, prefix = self.sequences(model)
        targets = torch.tensor(target_mask(self.length, self.repeats, self.offset, len(prefix)),
                               dtype=torch.float32, device=model.device)
        scores = np.mean([self.sequence_scores(model, prefix + row.tolist(), targets) for row in track(tokens)], axis=0)
        extra = {"sequences": self.n_sequences, "tokens_per_sequence": len(prefix) + tokens.shape[1]}
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k), extra)
