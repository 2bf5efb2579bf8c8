"""QRHead (Zhang et al. 2025, arXiv 2506.09944): query-focused retrieval heads.

Follows princeton-pli/QRHead, ``src/qrretriever/attn_retriever.py``
(``score_docs_per_head_for_detection``, ``score_per_token_attention_to_query``) and
``exp_scripts/detection/detect_qrhead_lme.py`` (``lme_eval``, ``score_heads``):

1. per head, the attention of the query's tokens to every earlier token, averaged over the query
   rows (their query span runs from the late instruction to the end of the prompt; here from
   ``Sample.query_start``, the question, to the prompt's last token);
2. per document, the tokens whose attention lies below the document's mean minus 2 standard
   deviations (unbiased, as ``torch.std``) are dropped and the rest summed;
3. the head's score on a sample is the sum over the gold documents (here the one in
   ``needle_span``: the gold document of ``multidoc_qa``, the needle of ``niah``), averaged over
   samples (the mean "score over gold" of ``lme_eval``).

Not reproduced: their calibration, which subtracts the attention of the same prompt with the query
replaced by "N/A", needs the question's own token span (a ``Sample`` marks only where the question
starts, not where the chat frame's suffix begins); scores here are uncalibrated. Their prompt
template (``get_prompt``) is replaced by the task's own; QRHead's users report that head lists move
with the template (QRHead issue #8), so compare lists only under one template.
"""

from __future__ import annotations

import numpy as np
import torch

from framework.api import (
    ConfigError,
    Detector,
    HeadScores,
    LoadedModel,
    ModelInfo,
    RowCapture,
    Sample,
    check_selection,
    hookimpl,
    instrumented,
    select_heads,
    track,
)


def gold_document_score(attention: torch.Tensor, span: tuple[int, int], outlier_sd: float = 2.0) -> torch.Tensor:
    """[...] score of one document from per-token attention [..., keys]: the tokens of ``span``
    above their mean minus ``outlier_sd`` standard deviations, summed (QRHead's detection filter)."""
    tokens = attention[..., span[0]:span[1]]
    if tokens.shape[-1] < 2:
        return tokens.sum(-1)
    threshold = tokens.mean(-1, keepdim=True) - outlier_sd * tokens.std(-1, keepdim=True)
    return tokens.masked_fill(tokens <= threshold, 0.0).sum(-1)


class QRHead(Detector):
    def __init__(self, threshold: float | None = None, top_k: int | None = 20, outlier_sd: float = 2.0):
        if outlier_sd < 0:
            raise ConfigError(f"outlier_sd={outlier_sd} must be >= 0 (QRHead drops tokens below mean - 2 sd)")
        self.threshold, self.top_k, self.outlier_sd = threshold, top_k, outlier_sd

    def validate(self, info: ModelInfo) -> None:
        check_selection(self.threshold, self.top_k, info)

    def sample_scores(self, model: LoadedModel, sample: Sample) -> np.ndarray:
        """[layers, heads] QRHead score of one sample's gold span."""
        if sample.needle_span[1] <= sample.needle_span[0]:
            raise ConfigError(f"qrhead needs a gold document: sample {sample.id!r} has an empty needle_span")
        scores = np.zeros((model.info.n_layers, model.info.n_heads))

        def sink(layer: int, probs: torch.Tensor) -> None:
            per_token = probs[0].float().mean(dim=1)  # [heads, keys], averaged over the query rows
            scores[layer] = gold_document_score(per_token, sample.needle_span, self.outlier_sd).cpu().numpy()

        rows = torch.arange(sample.query_start, len(sample.input_ids), device=model.device)
        with torch.inference_mode(), instrumented(model.model, capture=RowCapture(rows, sink)):
            model.model(input_ids=torch.tensor([sample.input_ids], device=model.device), use_cache=False, logits_to_keep=1)
        return scores

    def detect(self, model: LoadedModel, samples: list[Sample]) -> HeadScores:
        scores = np.mean([self.sample_scores(model, s) for s in track(samples)], axis=0)
        return HeadScores(self.name, scores, select_heads(scores, self.threshold, self.top_k))


@hookimpl
def register_detectors(register):
    register("qrhead", QRHead)
