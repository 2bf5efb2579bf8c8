"""Batch invariance: a sample's logits, greedy tokens and captured attention rows are the same
alone and inside a left-padded batch with samples of other lengths, on every family and with
every kind of edit, in prefill and in greedy decoding with the KV cache.

A left-pad query row has every key masked. On the manual attention path (Gemma-2's logit
soft-capping, every ``HeadEdit`` with a bias) and in captured rows its softmax was NaN, and the
NaN reached the real tokens through the next layer's values at pad positions. The families are
the tiny random models of ``test_families`` (GQA; sliding windows shorter than the prompts).
The embedded model runs end to end with ``batch_size=1`` and ``8`` under a third-party bias edit,
and a run whose logits are NaN fails, naming the condition, the sample and the layer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import CONFIG_DIR
from framework_cli import all_runs, local_store
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf
from test_families import FAMILIES, HEAD_DIM, N_HEADS, N_KV, build
from test_third_party import make_distribution

from framework.__main__ import describe
from framework.api import AttentionEdit, HeadEdit, RowCapture, instrumented
from framework.interfaces import LoadedModel, Sample
from framework.model import attention, rope
from framework.model.generation import NonFiniteLogits, greedy_generate, length_batches
from framework.registry import get_registry
from framework.runner import pipeline

LENGTHS = (40, 33, 25)  # left-padded by 0, 7 and 15: more than the sliding window (8)
NEW_TOKENS = 4
PAD = 0
HEADS = [(0, 1), (1, 2)]  # one head per layer (layer 0 is a sliding-window layer where a family has them)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a busy machine, thread synchronisation costs tiny models most of their time
    (the matrix took 208 s with two threads and 9 s with one on this 2-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt(n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()


# --- the edit kinds ----------------------------------------------------------------------------


class ScaleKeys(HeadEdit):
    """Key edit: KV head 0 of layer 0 (so every query head of its group) scaled by 1.7."""

    heads = [(0, h) for h in range(N_HEADS // N_KV)]

    def key(self, layer, key):
        if layer != 0:
            return key
        key = key.clone()
        key[:, 0] *= 1.7
        return key


class ScaleOutputs(HeadEdit):
    """Output edit: the heads' outputs times -0.6."""

    heads = HEADS

    def output(self, layer, output):
        factors = torch.ones(output.shape[2], dtype=output.dtype)
        factors[self.layer_heads(layer)] = -0.6
        return output * factors[:, None]


class Recency(HeadEdit):
    """Bias edit: the heads' logits fall by 0.4 per position of distance to the query, and keys more
    than 5 positions behind it are removed (-inf). Relative to the query, so the same pattern in
    every sample of a left-padded batch; the query is row ``rows[i]`` of a prefill and the last key
    of a decode step (the prompts are shorter than a row chunk)."""

    heads = HEADS

    def bias(self, layer, rows, key_length, where):
        heads = self.layer_heads(layer)
        if not heads:
            return None
        query = rows if len(rows) > 1 else torch.tensor([key_length - 1])
        distance = (query[:, None] - torch.arange(key_length)[None, :]).float()
        pattern = (-0.4 * distance).masked_fill(distance > 5, float("-inf"))
        bias = torch.zeros(1, N_HEADS, len(rows), key_length)
        bias[:, heads] = pattern
        return bias


class ZeroBias(HeadEdit):
    """A bias that changes nothing, yet takes the manual path (the third-party case of the issue)."""

    heads = HEADS

    def bias(self, layer, rows, key_length, where):
        return torch.zeros(1, 1, len(rows), key_length)


MEANS = {h: torch.linspace(-1, 1, HEAD_DIM) for h in HEADS}
LOWEST_PAIR = rope.pair_dims([HEAD_DIM // 2 - 1], HEAD_DIM)

# name -> (the edit, whether rows are captured); each call builds a fresh edit
EDITS: dict[str, tuple[Callable[[], AttentionEdit | None], bool]] = {
    "none": (lambda: None, False),
    "mask_zero": (lambda: AttentionEdit.mask_heads(HEADS, "zero"), False),
    "mask_mean": (lambda: AttentionEdit.mask_heads(HEADS, "mean", mean_outputs=MEANS), False),
    "mask_uniform": (lambda: AttentionEdit.mask_heads(HEADS, "uniform"), False),
    "mask_uniform_decode": (lambda: AttentionEdit.mask_heads(HEADS, "uniform", phase="decode"), False),
    "query_scale": (lambda: AttentionEdit.zero_query_dims({h: LOWEST_PAIR for h in HEADS}, HEAD_DIM), False),
    "key": (lambda: AttentionEdit(parts=[ScaleKeys()]), False),
    "bias": (lambda: AttentionEdit(parts=[Recency()]), False),
    "zero_bias": (lambda: AttentionEdit(parts=[ZeroBias()]), False),
    "output": (lambda: AttentionEdit(parts=[ScaleOutputs()]), False),
    "capture": (lambda: None, True),
    "capture_bias": (lambda: AttentionEdit(parts=[Recency()]), True),
}
UNCHANGED = {"none", "zero_bias", "capture"}  # edits that leave the logits as they are


# --- one batch, alone or padded ----------------------------------------------------------------


def batch_of(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Left-padded ids, attention mask and each sample's padding (as greedy_generate pads)."""
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[PAD] * n + p for n, p in zip(pads, prompts)])
    mask = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pads, prompts)])
    return ids, mask, pads


class Captured:
    """Every captured row per layer, in pass order."""

    def __init__(self, rows: torch.Tensor, phase: str):
        self.by_layer: dict[int, list[torch.Tensor]] = {}
        self.capture = RowCapture(rows, lambda layer, probs: self.by_layer.setdefault(layer, []).append(probs.clone()),
                                  phase=phase)


def run_batch(model, prompts: list[list[int]], kind: str) -> dict:
    """Prefill logits (every position) and captured rows; greedy tokens, each step's logits and the
    decode steps' captured rows."""
    make_edit, capturing = EDITS[kind]
    ids, mask, pads = batch_of(prompts)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate derives them
    prefill = Captured(torch.arange(ids.shape[1]), "prefill") if capturing else None
    decode = Captured(torch.zeros(1, dtype=torch.long), "decode") if capturing else None
    with torch.inference_mode():
        with instrumented(model, make_edit(), prefill.capture if prefill else None):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        with instrumented(model, make_edit(), decode.capture if decode else None):
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    return {"pads": pads, "logits": logits, "tokens": generated.sequences[:, ids.shape[1]:],
            "steps": torch.stack(generated.logits, 1), "prefill": prefill, "decode": decode}


@lru_cache(maxsize=None)
def alone_and_batched(name: str, kind: str) -> tuple[list[dict], dict]:
    model, _ = build(name)
    prompts = [prompt(n) for n in LENGTHS]
    return [run_batch(model, [p], kind) for p in prompts], run_batch(model, prompts, kind)


def same_rows(batched: torch.Tensor, alone: torch.Tensor, pad: int) -> None:
    """Captured rows [heads, rows, keys]: the padded batch's real rows equal the sample's alone on
    its own keys (the last ones: left padding), weigh the pad keys 0, and its pad rows are finite."""
    assert torch.isfinite(batched).all()
    real = batched[:, pad:]
    n_keys = alone.shape[-1]
    torch.testing.assert_close(real[..., -n_keys:], alone, atol=1e-5, rtol=1e-4)
    assert (real[..., :-n_keys] == 0).all()


# --- the matrix --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EDITS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_sample_alone_and_in_a_padded_batch_agree(name, kind):
    alone, batched = alone_and_batched(name, kind)
    for b, (single, pad) in enumerate(zip(alone, batched["pads"])):
        assert torch.isfinite(batched["logits"][b]).all(), "pad positions must stay finite too"
        torch.testing.assert_close(batched["logits"][b, pad:], single["logits"][0], atol=1e-4, rtol=1e-4)
        steps = single["tokens"].shape[1]  # alone, generation may stop at the end-of-sequence token
        assert batched["tokens"][b, :steps].tolist() == single["tokens"][0].tolist()
        torch.testing.assert_close(batched["steps"][b, :steps], single["steps"][0], atol=1e-4, rtol=1e-4)
        if batched["prefill"] is not None:
            for layer, (rows,) in batched["prefill"].by_layer.items():
                same_rows(rows[b], single["prefill"].by_layer[layer][0][0], pad)
            for layer, per_step in batched["decode"].by_layer.items():
                assert len(per_step) == NEW_TOKENS - 1
                for step, rows in enumerate(per_step[: steps - 1]):
                    same_rows(rows[b], single["decode"].by_layer[layer][step][0], 0)
    if kind not in UNCHANGED:  # the edit bites
        assert not torch.allclose(batched["steps"], alone_and_batched(name, "none")[1]["steps"], atol=1e-3)


def test_fully_masked_rows_attend_to_nothing_as_in_sdpa():
    """By hand: a row whose every key is masked (a left-pad query row) gets probabilities 0 and
    output 0, which is what torch's SDPA gives such a row; the other rows are unchanged."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    _, mask, _ = batch_of([[5] * 5, [5] * 3])
    allowed = (torch.tril(torch.ones(5, 5, dtype=torch.bool)) & mask.bool()[:, None, :])[:, None]  # [2, 1, 5, 5]
    rows = torch.arange(5)
    probs = attention.attention_probs(query, key, allowed, 0.35, rows)
    assert (probs[1, :, :2] == 0).all()  # the pad rows
    expected = (query.view(2, 2, 2, 5, 8) @ key[:, :, None].transpose(-1, -2) * 0.35).view(2, 4, 5, 5)
    expected = expected.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(probs[0], expected[0].softmax(-1))
    torch.testing.assert_close(probs[1, :, 2:], expected[1, :, 2:].softmax(-1))
    for bias in (allowed, attention.key_bias(allowed, rows, 5, 5)):  # boolean mask, and as a float bias
        output = attention.attention_rows(query, key, value, bias, 0.35, rows)
        sdpa = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(2, 1),
                                                                value.repeat_interleave(2, 1), attn_mask=allowed, scale=0.35)
        torch.testing.assert_close(output, sdpa, atol=1e-6, rtol=1e-5)


def test_gradients_through_a_padded_batch_stay_finite():
    """The utility detector fits a query mask by gradients through ``attention_rows``: pad rows must
    give finite (zero) gradients, not NaN."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    _, mask, _ = batch_of([[5] * 5, [5] * 3])
    bias = attention.key_bias((torch.tril(torch.ones(5, 5, dtype=torch.bool)) & mask.bool()[:, None, :])[:, None],
                              torch.arange(5), 5, 5)
    u = torch.ones(8, requires_grad=True)
    attention.attention_rows(query * u, key, value, bias, 0.35, torch.arange(5)).square().sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


# --- the guard ---------------------------------------------------------------------------------


class NaNAt(HeadEdit):
    """Writes NaN into one head's query or output at ``layer``."""

    def __init__(self, layer: int, where: str):
        self.layer, self.where = layer, where

    @property
    def heads(self):
        return [(self.layer, 0)]

    def query(self, layer, query):
        return query.index_fill(1, torch.tensor([0]), float("nan")) if self.where == "query" and layer == self.layer else query

    def output(self, layer, output):
        return output.index_fill(2, torch.tensor([0]), float("nan")) if self.where == "output" and layer == self.layer else output


class Digits:
    """A tokenizer for the tiny models: token ids as text."""

    pad_token_id = PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


NAN_CASES = {  # where the NaN is made -> the edit, and where the message says it first appears
    "query": (lambda: AttentionEdit(parts=[NaNAt(1, "query")]), "the prefill",
              "layer 1 (the query entering its attention, in the prefill)"),
    "output": (lambda: AttentionEdit(parts=[NaNAt(1, "output")]), "the prefill",
               "layer 1 (its attention output, in the prefill)"),
    "decode": (lambda: AttentionEdit(parts=[NaNAt(1, "output")], phase="decode"), "decode step 1",
               "layer 1 (its attention output, in decode step 1)"),
    "output_head": (lambda: None, "the prefill",
                    "after the last layer's attention output (its o_proj or MLP, the final norm or the output head)"),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_non_finite_logits_name_the_sample_and_the_layer(case):
    model = build("llama2", fresh=case == "output_head")[0]
    if case == "output_head":
        with torch.no_grad():
            model.lm_head.weight[7, 0] = float("inf")
    loaded = LoadedModel(model=model, tokenizer=Digits(), info=None, inv_freq=None)
    samples = [Sample(id=f"s{n}", input_ids=prompt(n), answer="", answer_ids=[], context_span=(1, n), query_start=n - 1,
                      needle_span=(1, 2)) for n in LENGTHS]
    make_edit, when, where = NAN_CASES[case]
    if case != "output_head":
        assert len(greedy_generate(loaded, samples, 3, None)) == 3  # finite: no error
    with pytest.raises(NonFiniteLogits) as raised:
        greedy_generate(loaded, samples, 3, make_edit())
    # the first batch holds the two shorter samples (length_batches), its first row the shortest
    assert str(raised.value) == f"the logits of sample 's25' are NaN or inf from {when} on; they first appear in {where}"


# --- end to end on the embedded model ------------------------------------------------------------

PLUGINS = '''
"""Third-party edits with a logit bias: the case where padded batches went NaN."""
import torch
from framework.api import AttentionEdit, HeadEdit, Intervention, hookimpl, random_heads_matched_per_layer


class Recency(HeadEdit):
    """In the prefill, each head's logits fall by ``slope`` per position of distance to the query."""

    def __init__(self, heads, slope, n_heads):
        self._heads, self.slope, self.n_heads = sorted(heads), slope, n_heads

    @property
    def heads(self):
        return self._heads

    def bias(self, layer, rows, key_length, where):
        heads = self.layer_heads(layer)
        if not heads:
            return None
        distance = (rows[:, None] - torch.arange(key_length, device=rows.device)[None, :]).clamp(min=0)
        bias = torch.zeros(1, self.n_heads, len(rows), key_length, device=rows.device)
        bias[:, heads] = -self.slope * distance.float()
        return bias


class NaNOutput(HeadEdit):
    """Writes NaN into head 0 of ``layer``: a broken edit."""

    def __init__(self, layer):
        self.layer = layer

    @property
    def heads(self):
        return [(self.layer, 0)]

    def output(self, layer, output):
        return output.index_fill(2, torch.tensor([0], device=output.device), float("nan")) if layer == self.layer else output


class RecencyBias(Intervention):
    def __init__(self, slope: float = 1.0):
        self.slope = slope

    def treatment(self, model, heads):
        return AttentionEdit(parts=[Recency(heads, self.slope, model.info.n_heads)], phase="prefill")

    def control(self, model, heads, rng):
        return self.treatment(model, random_heads_matched_per_layer(heads, model.info.n_heads, rng))


class BrokenEdit(Intervention):
    def __init__(self, layer: int = 2):
        self.layer = layer

    def treatment(self, model, heads):
        return AttentionEdit(parts=[NaNOutput(self.layer)])

    def control(self, model, heads, rng):
        return self.treatment(model, heads)


@hookimpl
def register_interventions(register):
    register("recency_bias", RecencyBias)
    register("broken_edit", BrokenEdit)
'''
# two samples of different lengths, which length_batches pads into one batch
GRID = ["task.context_lengths=[190,200]", "task.depths=[0.5]", "task.samples_per_cell=1", "task.max_new_tokens=8"]


@pytest.fixture(scope="module")
def bias_plugins(tmp_path_factory) -> tuple[Path, Path]:
    """The two interventions as an installed distribution (its directory) and their configs."""
    root = tmp_path_factory.mktemp("bias-plugins")
    site = make_distribution(root, "bias-edits", "bias_edits", PLUGINS, {"bias_edits": "bias_edits"})
    (root / "conf" / "intervention").mkdir(parents=True)
    for name, params in {"recency_bias": "slope: 1.0", "broken_edit": "layer: 2"}.items():
        (root / "conf" / "intervention" / f"{name}.yaml").write_text(f"name: {name}\n{params}\n")
    return site, root / "conf"


@pytest.fixture
def installed(bias_plugins, monkeypatch, tmp_path) -> Callable[..., dict]:
    """Runs in this process see the distribution through the real entry-point group, and log to a
    store in ``tmp_path``; the composed config of a run, with the distribution's configs."""
    site, conf = bias_plugins
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_registry.cache_clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda *overrides: OmegaConf.to_container(
            compose("config", overrides=[f"hydra.searchpath=[file://{conf}]", *GRID, *overrides]), resolve=True)
    get_registry.cache_clear()  # later tests: the registry without it


def sample_outputs(client: MlflowClient, run_id: str, folder: Path) -> dict[tuple[str, str], str]:
    """(sample, condition) -> output, from the run's samples.json."""
    folder.mkdir()
    table = json.loads(Path(client.download_artifacts(run_id, "samples.json", str(folder))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    return {(row["sample"], row["condition"]): row["output"] for row in rows}


@pytest.mark.e2e
def test_a_runs_outputs_do_not_depend_on_its_batch_size(installed, tmp_path, embedded_model):
    config = installed()
    samples = get_registry().create("task", config["task"]).build_samples(embedded_model.tokenizer, "eval", config["seed"])
    lengths = [len(s.input_ids) for s in samples]
    assert len(set(lengths)) == 2 and list(length_batches(lengths, 8, 0.2)) == [sorted(range(2), key=lengths.__getitem__)]
    client, outputs = local_store(tmp_path), {}
    for batch_size in (1, 8):  # the 12 heads that attend most to the context: where the bias matters
        config = installed("+detector=attn_mass", "detector.threshold=null", "detector.top_k=12",
                           "+intervention=recency_bias", f"batch_size={batch_size}")
        context = pipeline.run(config)
        assert client.get_run(context.run_id).info.status == "FINISHED"
        outputs[batch_size] = sample_outputs(client, context.run_id, tmp_path / str(batch_size))
    assert outputs[8] == outputs[1]
    assert {condition for _, condition in outputs[1]} == {"baseline", "treatment", "control"}
    assert all(outputs[1].values())  # no silent '' anywhere
    assert any(outputs[1][s.id, "treatment"] != outputs[1][s.id, "baseline"] for s in samples)  # the bias bites


@pytest.mark.e2e
def test_a_run_whose_logits_are_nan_fails_naming_condition_sample_and_layer(installed, tmp_path, embedded_model):
    with pytest.raises(NonFiniteLogits) as raised:
        pipeline.run(installed("+detector=qnorm", "detector.top_k=4", "+intervention=broken_edit", "intervention.layer=3"))
    client = local_store(tmp_path)
    [failed] = all_runs(client)
    assert failed.info.status == "FAILED"
    baseline = sample_outputs(client, failed.info.run_id, tmp_path / "samples")  # kept: the baseline finished
    assert {condition for _, condition in baseline} == {"baseline"} and all(baseline.values())
    assert "recall/treatment" not in failed.data.metrics  # nothing scored from NaN
    named = [sample for sample, _ in baseline if f"sample {sample!r}" in str(raised.value)]
    assert len(named) == 1
    message = (f"condition 'treatment': the logits of sample {named[0]!r} are NaN or inf from the prefill on; they "
               "first appear in layer 3 (its attention output, in the prefill)")
    assert str(raised.value) == message
    assert failed.data.tags["error"] == f"NonFiniteLogits: {message}"
    assert describe(raised.value).startswith(f"run failed: NonFiniteLogits: {message}")  # the command's error line
