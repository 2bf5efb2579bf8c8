"""The RoPE-vs-NoPE study: the NoPE switch against position-free computations, the synthetic
key-value task's samples, learning on it, and the command end to end on tiny settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR
from framework_cli import local_store, run_here
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from framework.interfaces import ConfigError
from framework.model.attention import AttentionInputs, instrumented
from framework.model.loading import prepare
from framework.model.rope import model_inv_freq
from framework.studies.positional import NoRotaryEmbedding, remove_rope, uses_rope
from framework.studies.rope_vs_nope import VariantResult, check, pair_profile
from framework.studies.synthetic_kv import KVTask, build_model, retrieval_accuracy, retrieval_loss
from framework.studies.training import fit

TASK = KVTask(n_keys=16, n_values=4, pairs_per_sample=6, max_position=256)
SIZE = dict(hidden_size=32, n_layers=2, n_heads=2, head_dim=16, intermediate_size=64, rope_theta=10000.0)
TINY_COMMAND = ["model.hidden_size=32", "model.head_dim=16", "model.intermediate_size=64", "data.n_keys=16",
                "data.n_values=4", "data.pairs_per_sample=6", "data.max_position=64", "train.steps=12",
                "train.log_every=5", "train.eval_every=6", "train.eval_samples=32", "train.utility_samples=4",
                "utility.steps=5"]


def twins(seed: int = 0) -> dict[str, torch.nn.Module]:
    return {variant: build_model(TASK, rope=variant == "rope", seed=seed, **SIZE).eval() for variant in ("rope", "nope")}


def logits_at(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions).logits


def test_nope_twin_has_the_same_weights_and_only_a_different_rotary_module():
    models = twins()
    rope_state, nope_state = models["rope"].state_dict(), models["nope"].state_dict()
    assert rope_state.keys() == nope_state.keys()
    assert all(torch.equal(rope_state[k], nope_state[k]) for k in rope_state)
    assert isinstance(models["rope"].model.rotary_emb, LlamaRotaryEmbedding) and uses_rope(models["rope"])
    assert isinstance(models["nope"].model.rotary_emb, NoRotaryEmbedding) and not uses_rope(models["nope"])
    # the dims keep their RoPE names, so the twins are compared pair by pair
    np.testing.assert_array_equal(model_inv_freq(models["nope"]), model_inv_freq(models["rope"]))


def test_positions_change_the_rope_model_and_not_the_nope_model():
    batch = TASK.batch(4, torch.Generator().manual_seed(0), spread_positions=False)
    spread = TASK.batch(4, torch.Generator().manual_seed(1)).position_ids  # random gaps
    for variant, model in twins().items():
        contiguous, shifted = logits_at(model, batch.input_ids, batch.position_ids), logits_at(model, batch.input_ids, spread)
        if variant == "nope":
            torch.testing.assert_close(shifted, contiguous, rtol=0, atol=1e-6)
        else:
            assert (shifted - contiguous).abs().max() > 1e-3  # small: a random model attends almost uniformly


def test_nope_attention_sees_the_position_free_query_and_key():
    """The post-'RoPE' query and key the attention computes with equal q_proj / k_proj of the
    normed input, recomputed by hand: no rotation at any position (RoPE: only at position 0)."""
    batch = TASK.batch(2, torch.Generator().manual_seed(0))
    for variant, model in twins().items():
        loaded = prepare(model, None, variant)
        seen: dict[int, AttentionInputs] = {}
        with torch.no_grad(), instrumented(loaded.model, inputs=seen.__setitem__):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
            layer = model.model.layers[0]
            hidden = layer.input_layernorm(model.model.embed_tokens(batch.input_ids))
            shape = (2, batch.input_ids.shape[1], SIZE["n_heads"], SIZE["head_dim"])
            query = layer.self_attn.q_proj(hidden).view(shape).transpose(1, 2)
            key = layer.self_attn.k_proj(hidden).view(shape).transpose(1, 2)
        if variant == "nope":
            torch.testing.assert_close(seen[0].query, query, rtol=0, atol=1e-6)
            torch.testing.assert_close(seen[0].key, key, rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(seen[0].query, query, atol=1e-3)


def test_remove_rope_refuses_a_model_without_shared_rotary_embedding():
    with pytest.raises(TypeError, match="no shared rotary embedding"):
        remove_rope(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_kv_batches_ask_for_a_key_in_the_context_and_expect_its_value():
    batch = TASK.batch(32, torch.Generator().manual_seed(3))
    pair_tokens = TASK.n_keys * TASK.n_values
    for ids, positions, answer, target in zip(batch.input_ids, batch.position_ids, batch.answers, batch.targets):
        keys, values = ids[:-1] // TASK.n_values, ids[:-1] % TASK.n_values
        assert (ids[:-1] < pair_tokens).all() and len(set(keys.tolist())) == TASK.pairs_per_sample
        assert int(ids[-1]) - pair_tokens == int(keys[target])  # the query names the gold pair's key
        assert int(answer) - pair_tokens - TASK.n_keys == int(values[target])
        assert (positions.diff() > 0).all() and 0 <= positions.min() and positions.max() < TASK.max_position
    sample = TASK.samples(1, seed=5)[0]
    assert sample.input_ids[sample.query_start] >= pair_tokens and sample.needle_span[1] - sample.needle_span[0] == 1
    assert sample.answer_ids[0] >= pair_tokens + TASK.n_keys


@pytest.mark.parametrize("settings, message", [
    (dict(n_keys=8, n_values=4, pairs_per_sample=9, max_position=64), "keys of one sample are distinct"),
    (dict(n_keys=8, n_values=4, pairs_per_sample=6, max_position=5), "max_position=5 is too small"),
])
def test_impossible_tasks_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        KVTask(**settings)


def test_a_rope_model_learns_the_task_well_above_chance():
    torch.manual_seed(0)
    task = KVTask(n_keys=8, n_values=4, pairs_per_sample=3, max_position=32)
    model = build_model(task, rope=True, seed=0, **SIZE)
    batches = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = fit(model, lambda step: retrieval_loss(model, task.batch(64, batches)), 300, optimiser)
    held_out = task.batch(256, torch.Generator().manual_seed(1))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert retrieval_accuracy(model, held_out) > 0.6  # chance: 1 / n_values = 0.25


def test_pair_profile_orders_pairs_by_frequency_and_averages_both_halves():
    per_dim = np.arange(8, dtype=float).reshape(1, 1, 8)  # pairs (0,4) (1,5) (2,6) (3,7)
    inv_freq = np.array([0.1, 1.0, 0.01, 0.5])
    np.testing.assert_array_equal(pair_profile(per_dim, inv_freq), [[3.0, 5.0, 2.0, 4.0]])
    result = VariantResult({}, utility=np.array([[0.2, 0.4, 0.6, 1.0]]), qnorm=np.array([[1.0, 1.0, 3.0, 3.0]]))
    assert result.gap("utility") == pytest.approx(0.8)
    assert result.gap("qnorm") == pytest.approx(1.0)  # 1.5 - 0.5 of the head mean


def test_config_errors_name_what_and_why():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = OmegaConf.to_container(compose("rope_vs_nope", overrides=["model.head_dim=12"]), resolve=True)
    with pytest.raises(ConfigError, match="head_dim=12 must be a multiple of 8"):
        check(config)
    config["model"]["head_dim"], config["eval_seed"] = 16, config["seed"]
    with pytest.raises(ConfigError, match="eval_seed must differ from seed"):
        check(config)


def test_command_trains_both_variants_and_logs_the_comparison(tmp_path):
    result = run_here(tmp_path, *TINY_COMMAND, module="framework.studies.rope_vs_nope")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verdict/utility_gap_rope_minus_nope" in result.stdout
    client = local_store(tmp_path)
    [run_] = client.search_runs([client.get_experiment_by_name("rope-vs-nope").experiment_id])
    assert run_.info.status == "FINISHED" and run_.data.tags["kind"] == "rope_vs_nope"
    metrics = run_.data.metrics
    for variant in ("rope", "nope"):
        assert 0.0 <= metrics[f"{variant}/accuracy/held_out"] <= 1.0
        assert len(client.get_metric_history(run_.info.run_id, f"{variant}/train_loss")) == 4  # steps 0, 5, 10, 11
        assert f"{variant}/utility/band4" in metrics and f"{variant}/accuracy/zero_lowfreq_quarter" in metrics
    assert metrics["verdict/utility_gap_rope_minus_nope"] == pytest.approx(
        metrics["rope/utility/low_minus_high"] - metrics["nope/utility/low_minus_high"])
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"rope_vs_nope.png", "bands.json", "per_pair.json", "config.yaml"} <= artifacts
