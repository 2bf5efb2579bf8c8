"""Streaming heads on the embedded SmolLM2: the masked and evicted caches generate the same tokens
and logits, and a compression run (dose over kept heads, all_streaming, lowest_kept, evicted cache)
logs each condition's KV fraction, the budget summary and kv_budget.png."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from framework.api import create_plugin, instrumented
from framework.runner import pipeline
from plugins.interventions.streaming_heads import StreamingHeads

SINK, RECENT = 4, 60


@pytest.mark.e2e
def test_masked_and_evicted_caches_agree_on_the_embedded_model(embedded_model):
    model = embedded_model
    group = model.info.n_heads // model.info.n_kv_heads
    kept = [(layer, (layer % model.info.n_kv_heads) * group) for layer in range(model.info.n_layers)]
    lengths = [150, 130]  # left-padded batch, both longer than sink + recent
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.full((width - n,), model.tokenizer.pad_token_id), torch.arange(100, 100 + n) * 7 % 5000])
                       for n in lengths])
    mask = torch.stack([torch.cat([torch.zeros(width - n), torch.ones(n)]).long() for n in lengths])
    results = {}
    for cache in ("masked", "evicted"):
        edit = StreamingHeads(sink=SINK, recent=RECENT, cache=cache).treatment(model, kept)
        with torch.inference_mode(), edit.kv_cache(model.model) as kv, instrumented(model.model, edit):
            out = model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True,
                                       pad_token_id=model.tokenizer.pad_token_id, **({"cache": kv} if kv else {}))
        results[cache] = out
    torch.testing.assert_close(torch.stack(results["evicted"].logits, 1), torch.stack(results["masked"].logits, 1),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(results["evicted"].sequences, results["masked"].sequences)


@pytest.mark.e2e
def test_compression_run_logs_fractions_budget_and_figure(tmp_path, monkeypatch, compose_config, embedded_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    window = [f"intervention.sink={SINK}", f"intervention.recent={RECENT}"]
    extras = []
    for label, keep in (("all_streaming", "none"), ("lowest_kept", "lowest")):
        extras += [f"+intervention@conditions.{label}=streaming_heads", f"conditions.{label}.keep={keep}",
                   f"conditions.{label}.sink={SINK}", f"conditions.{label}.recent={RECENT}"]
    config = compose_config("task=passkey", "task.context_lengths=[200]", "task.depths=[0.5]", "task.samples_per_cell=2",
                            "+detector=attn_mass", "detector.top_k=9", "+intervention=streaming_heads", *window,
                            "intervention.cache=evicted", "dose.param=heads", "dose.values=[3,9]", *extras,
                            "+detector@detectors.qnorm=qnorm", "detectors.qnorm.top_k=9", "per_detector=true")
    context = pipeline.run(config, loaded=embedded_model)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(context.run_id)
    metrics = run.data.metrics
    samples = create_plugin("task", config["task"]).build_samples(embedded_model.tokenizer, "eval", config["seed"])
    longest = max(len(sample.input_ids) for sample in samples)
    fractions = {key.removeprefix("kv/fraction_kept/"): value for key, value in metrics.items()
                 if key.startswith("kv/fraction_kept/")}
    dosed = {f"{role}{key}.heads_{dose}" for role in ("treatment", "control") for key in ("", ".qnorm") for dose in (3, 9)}
    assert set(fractions) == dosed | {"all_streaming", "lowest_kept"}  # each detector's dose series, same samples
    for key in ("", ".qnorm"):
        for dose in (3, 9):  # random KV heads matched per layer: the same memory as the treatment
            assert fractions[f"treatment{key}.heads_{dose}"] == fractions[f"control{key}.heads_{dose}"]
    for label in dosed:  # the evicted cache held what the formula says, at the longest generation
        assert metrics[f"kv/bytes/{label}"] == metrics[f"kv/bytes_formula/{label}"] < metrics[f"kv/bytes_full/{label}"]
        assert metrics[f"kv/tokens/{label}"] == longest + config["task"]["max_new_tokens"] - 1
    assert "kv/bytes/all_streaming" not in metrics  # masked (the conditions' default cache): nothing evicted to measure
    tokens = metrics["kv/tokens/treatment.heads_3"]
    assert metrics["kv/bytes_full/treatment.heads_3"] == 30 * 3 * tokens * 2 * 64 * 4  # layers, KV heads, K+V, dim, float32
    assert fractions["all_streaming"] < fractions["treatment.heads_3"] <= fractions["treatment.heads_9"] < 1
    assert fractions["all_streaming"] == pytest.approx((SINK + RECENT) / longest)  # StreamingLLM: no KV head full
    assert "kv_budget.png" in [a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
                               .list_artifacts(context.run_id)]
    assert {"kv_budget/attn_mass: treatment/auc", "kv_budget/attn_mass: control/smallest_fraction",
            "kv_budget/qnorm: treatment/auc", "kv_budget/qnorm: control/smallest_fraction"} <= set(metrics)
    assert any(key.endswith("treatment.qnorm.heads_9_vs_control.qnorm.heads_9/p_holm") for key in metrics)
    assert any(key.endswith("treatment.heads_9_vs_control.heads_9/p_holm") for key in metrics)
    assert np.isfinite(metrics["recall/all_streaming"])
