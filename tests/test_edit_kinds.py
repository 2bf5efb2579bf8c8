"""New kinds of attention edit through the public extension point ``HeadEdit``: an output edit,
a key edit and a logit-bias (pattern) edit, each checked against an independent computation,
and the built-in head masks and query scales as ordinary parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_attention import TINY, llama  # noqa: F401  (the same tiny Llama, and its fixture)

from framework.api import (
    AttentionEdit,
    HeadEdit,
    HeadMasking,
    QueryScaling,
    RowCapture,
    instrumented,
)


def ids(n: int = 20) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(0))


def logits(model, edit: AttentionEdit | None = None, **callbacks) -> torch.Tensor:
    with torch.no_grad(), instrumented(model, edit, **callbacks):
        return model(input_ids=ids()).logits


class ScaleOutputs(HeadEdit):
    def __init__(self, heads, factor):
        self._heads, self.factor = list(heads), factor

    @property
    def heads(self):
        return self._heads

    def output(self, layer, output):
        factors = torch.ones(output.shape[2], dtype=output.dtype)
        factors[self.layer_heads(layer)] = self.factor
        return output * factors[:, None]


class ScaleKeys(HeadEdit):
    """Scale the keys of KV head ``kv`` of ``layer`` (so of every query head in its group)."""

    def __init__(self, layer, kv, factor, group):
        self.layer, self.kv, self.factor, self.group = layer, kv, factor, group

    @property
    def heads(self):
        return [(self.layer, h) for h in range(self.kv * self.group, (self.kv + 1) * self.group)]

    def key(self, layer, key):
        if layer != self.layer:
            return key
        key = key.clone()
        key[:, self.kv] *= self.factor
        return key


class OnlyFirstKey(HeadEdit):
    """The pattern edit: ``head`` attends to the first key only (every other logit -inf)."""

    def __init__(self, head):
        self.head = head

    @property
    def heads(self):
        return [self.head]

    def bias(self, layer, rows, key_length, where):
        if layer != self.head[0]:
            return None
        bias = torch.zeros(1, TINY["num_attention_heads"], len(rows), key_length)
        bias[:, self.head[1], :, 1:] = float("-inf")
        return bias


class Zero(HeadEdit):
    """A bias of 0 everywhere: the pattern is unchanged, but the layer takes the manual path."""

    @property
    def heads(self):
        return [(0, 0)]

    def bias(self, layer, rows, key_length, where):
        return torch.zeros(1, 1, len(rows), key_length)


def test_an_output_scale_of_zero_is_exactly_a_zero_head_mask(llama):
    heads = [(0, 1), (2, 3), (2, 0)]
    custom = logits(llama.model, AttentionEdit(parts=[ScaleOutputs(heads, 0.0)]))
    masked = logits(llama.model, AttentionEdit.mask_heads(heads, "zero"))
    torch.testing.assert_close(custom, masked, atol=0, rtol=0)
    assert not torch.equal(custom, logits(llama.model))


def test_halving_a_kv_heads_keys_is_halving_its_query_heads_queries(llama):
    """q . (k/2) = (q/2) . k, exactly (a power of two): a key edit acts on the KV head's whole group."""
    group = TINY["num_attention_heads"] // TINY["num_key_value_heads"]
    keys = logits(llama.model, AttentionEdit(parts=[ScaleKeys(1, 1, 0.5, group)]))
    queries = logits(llama.model, AttentionEdit(query_scale={(1, 2): np.full(16, 0.5), (1, 3): np.full(16, 0.5)}))
    torch.testing.assert_close(keys, queries, atol=0, rtol=0)
    assert not torch.equal(keys, logits(llama.model))


def test_a_logit_bias_sets_the_pattern_and_captured_rows_show_it(llama):
    layer, head = 1, 2
    rows, values, outputs = {}, {}, {}

    def capture(l, probs):
        rows[l] = probs

    def inputs(l, attention_inputs):
        values[l] = attention_inputs.value

    def head_outputs(l, output):
        outputs[l] = output

    n = ids().shape[1]
    logits(llama.model, AttentionEdit(parts=[OnlyFirstKey((layer, head))]),
           capture=RowCapture(torch.arange(n), capture), inputs=inputs, head_outputs=head_outputs)
    expected = torch.zeros(n, n)
    expected[:, 0] = 1
    torch.testing.assert_close(rows[layer][0, head], expected, atol=0, rtol=0)
    causal = torch.tril(torch.ones(n, n))  # the other heads keep a causal pattern
    assert torch.equal(rows[layer][0, head - 1] > 0, causal > 0)
    first_value = values[layer][0, head // 2, 0]  # KV head of the group
    torch.testing.assert_close(outputs[layer][0, :, head], first_value.expand(n, -1), atol=1e-6, rtol=0)


def test_a_zero_bias_takes_the_manual_path_and_changes_nothing(llama):
    torch.testing.assert_close(logits(llama.model, AttentionEdit(parts=[Zero()])), logits(llama.model), atol=1e-4, rtol=1e-4)


def test_parts_follow_the_phase_and_describe_themselves(llama):
    decode_only = AttentionEdit(parts=[ScaleOutputs([(0, 1)], 0.0)], phase="decode")
    torch.testing.assert_close(logits(llama.model, decode_only), logits(llama.model), atol=0, rtol=0)  # a prefill
    described = AttentionEdit(head_masks={(0, 0): "zero"}, parts=[ScaleOutputs([(1, 2)], 0.5)]).describe()
    assert described["head_masks"] == {"0.0": "zero"} and described["ScaleOutputs"] == ["1.2"]
    assert AttentionEdit(parts=[ScaleOutputs([(1, 2)], 0.5)], query_scale={(0, 3): np.ones(16)}).heads == [(0, 3), (1, 2)]
    with pytest.raises(TypeError, match="HeadEdit"):
        AttentionEdit(parts=["not an edit"])


def test_head_masks_and_query_scales_are_ordinary_parts(llama):
    edit = AttentionEdit(head_masks={(0, 1): "uniform", (2, 2): "zero"}, query_scale={(1, 0): np.zeros(16)})
    [scaling, masking] = edit.compiled()
    assert isinstance(scaling, QueryScaling) and isinstance(masking, HeadMasking)
    as_parts = AttentionEdit(parts=[QueryScaling(edit.query_scale), HeadMasking(edit.head_masks)])
    torch.testing.assert_close(logits(llama.model, as_parts), logits(llama.model, edit), atol=0, rtol=0)


def test_a_bias_written_without_where_still_runs_and_says_how_to_move_on(llama):
    with pytest.warns(DeprecationWarning, match="add a fourth parameter `where`"):
        class OnlyFirstKeyWithoutWhere(OnlyFirstKey):  # as edits were written before `where`
            def bias(self, layer, rows, key_length):
                return OnlyFirstKey.bias(self, layer, rows, key_length, None)

    old = logits(llama.model, AttentionEdit(parts=[OnlyFirstKeyWithoutWhere((1, 2))]))
    new = logits(llama.model, AttentionEdit(parts=[OnlyFirstKey((1, 2))]))
    torch.testing.assert_close(old, new, atol=0, rtol=0)
    assert not torch.equal(new, logits(llama.model))


def test_conditions_with_a_biased_edit_are_repriced_by_a_measured_factor(llama, tmp_path, monkeypatch):
    import mlflow

    from framework.api import StreamingWindow
    from framework.interfaces import Condition, Sample
    from framework.planning import planner

    plain = Condition("treatment", "treatment", "x", AttentionEdit.mask_heads([(0, 0)], "zero"))
    biased = Condition("control", "control", "x", AttentionEdit(parts=[Zero()]))
    window = Condition("window", "extra", "x", AttentionEdit(parts=[StreamingWindow([(0, 0)], 4, sink=1, recent=2)]))
    assert [planner.takes_manual_path(c.edit) for c in (plain, biased, window)] == [False, True, False]
    estimate = planner.Estimate(
        model="tiny", device="cpu", dtype="float32", conditions=3, samples=1,
        steps=[planner.Step("baseline", 1, seconds=5.0), planner.Step("3 conditions", 1, seconds=30.0)],
        load_seconds=0.0, base_bytes=0, weights_bytes=0, load_peak_bytes=0, watch=planner.Stopwatch(torch.device("cpu")),
        eval_samples=[Sample("s", [5] * 48, "", [], (0, 1), 1, (0, 1))])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        assert planner.reprice_conditions(estimate, llama.model, [plain, window]) == 1.0  # nothing biased: nothing timed
        assert estimate.steps[1].seconds == 30.0
        factor = planner.reprice_conditions(estimate, llama.model, [plain, biased, window])
    # one of three conditions biased: its third of the step scaled by the factor measured
    assert factor >= 1.0 and estimate.steps[1].seconds == pytest.approx(30.0 + 10.0 * (factor - 1))
    assert estimate.steps[0].seconds == 5.0
    params = mlflow.get_run(run.info.run_id).data.params
    assert float(params["estimate.bias_edit_factor"]) == pytest.approx(factor, abs=1e-3)
    assert float(params["estimate.repriced_seconds"]) == pytest.approx(estimate.seconds, abs=0.1)
