"""Long passes keep their masks as rules (framework/model/masks.py): on every family, with the
rule mask forced on short passes, logits, captured rows, head masks, streaming windows and the
soft-capping path equal those computed with transformers' dense masks, for a left-padded batch
and for sliding-window layers across query chunks; and the rule mask's rows are the dense mask's."""

from __future__ import annotations

import pytest
import torch
from test_families import NAMES, WINDOW, build
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from framework.model import attention, masks
from framework.model.attention import AttentionEdit, RowCapture, StreamingWindow, instrumented
from framework.model.masks import RuleMask, rule_mask

LENGTHS = (40, 29)  # a left-padded batch: the second sample starts at key 11


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(LENGTHS)
    generator = torch.Generator().manual_seed(5)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, width - n:] = torch.randint(3, 256, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


def forward(model: torch.nn.Module, edit: AttentionEdit | None = None, rows: torch.Tensor | None = None):
    """Logits of the padded batch (real positions only) and the captured rows per layer."""
    ids, mask = padded_batch()
    seen: dict[int, torch.Tensor] = {}
    capture = RowCapture(rows, lambda layer, probs: seen.__setitem__(layer, probs)) if rows is not None else None
    with torch.no_grad(), instrumented(model, edit, capture):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits.masked_fill(mask[:, :, None] == 0, 0.0), seen


def both_ways(monkeypatch, model, **kwargs):
    """The same pass with dense masks and with rule masks on every layer, in chunks of 7 rows."""
    monkeypatch.setattr(attention, "_ROW_CHUNK", 7)  # chunks and windows cross each other's edges
    dense = forward(model, **kwargs)
    seen_rules = []

    def spying(*args, **options):
        made = rule_mask(*args, **options)
        seen_rules.append(isinstance(made, RuleMask))
        return made

    monkeypatch.setattr(masks, "DENSE_LIMIT", 0)
    monkeypatch.setattr(attention, "rule_mask", spying)  # what install() registers with transformers
    ruled = forward(model, **kwargs)
    monkeypatch.undo()
    assert seen_rules and all(seen_rules)  # every layer type's mask was a rule in the second pass
    return dense, ruled


@pytest.mark.parametrize("name", NAMES)
def test_plain_pass_and_captured_rows_equal_the_dense_masks(name, monkeypatch):
    model, _ = build(name)
    rows = torch.tensor([0, 5, 11, 20, 39])  # a pad row of the short sample, its first real row, ...
    (logits, rows_dense), (ruled, rows_ruled) = both_ways(monkeypatch, model, rows=rows)
    torch.testing.assert_close(ruled, logits, atol=1e-5, rtol=1e-5)
    for layer, probs in rows_dense.items():
        torch.testing.assert_close(rows_ruled[layer], probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_edits_on_long_masks_equal_the_dense_masks(name, monkeypatch):
    model, _ = build(name)
    n_heads = model.config.num_attention_heads
    last = model.config.num_hidden_layers - 1
    window = StreamingWindow([(last, 0), (last, 1)], n_heads, sink=2, recent=5)  # the windowed streaming path
    edit = AttentionEdit.mask_heads([(0, 1)], "uniform")  # a query edit on the plain path
    for each in (AttentionEdit(parts=[window]), edit):
        (logits, _), (ruled, _) = both_ways(monkeypatch, model, edit=each)
        torch.testing.assert_close(ruled, logits, atol=1e-5, rtol=1e-5)


def test_rule_mask_rows_are_transformers_dense_mask():
    padding = torch.tensor([[1] * 30, [0] * 9 + [1] * 21]).bool()
    function = sliding_window_causal_mask_function(WINDOW)
    options = dict(batch_size=2, q_length=30, kv_length=30, mask_function=function, attention_mask=padding,
                   local_size=WINDOW)
    dense = sdpa_mask(**options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(masks, "DENSE_LIMIT", 0)
        ruled = rule_mask(**options)
    assert isinstance(ruled, RuleMask) and ruled.shape == dense.shape
    assert torch.equal(ruled.dense(), dense)
    rows = torch.tensor([3, 17, 29])
    assert torch.equal(ruled[:, :, rows, :20], dense[:, :, rows, :20])
    assert torch.equal(ruled[:, 0, rows, :], dense[:, 0, rows, :])
    assert ruled.pad.tolist() == [0, 9]
    for first, last in ((0, 6), (10, 16), (23, 29)):  # a chunk's span holds every key its rows may see
        low, high = ruled.span(first, last)
        seen = dense[:, 0, first: last + 1].any(dim=(0, 1)).nonzero().ravel()
        assert low <= int(seen.min()) and int(seen.max()) < high
        assert high - low <= (last - first) + WINDOW
