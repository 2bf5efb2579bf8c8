"""RetMask: the DPO loss against hand computations, DPO training on a tiny model, the contrast
data against independent greedy decoding with and without the mask, and the command end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIG_DIR, tiny_llama
from framework_cli import environment, local_store
from framework_cli import run as run_command
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from framework.interfaces import ConfigError, LoadedModel
from framework.model.attention import AttentionEdit, instrumented
from framework.registry import get_registry
from framework.studies.retmask import contrast_pairs, preference_triples, run
from framework.studies.training import dpo_loss, reference_logprobs, response_logprob, train_dpo
from plugins.tasks.passkey import Passkey

TINY_COMMAND = ["task=passkey", "task.context_lengths=[128]", "task.depths=[0.3,0.7]", "task.samples_per_cell=1",
                "control_task.n_samples=2", "train_seeds=[2]", "detector.top_k=40", "dpo.pairs_per_step=2", "dpo.update=attention",
                "stats.permutation.n_resamples=100"]


def compose_retmask(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("retmask", overrides=list(overrides)), resolve=True)


# --- DPO --------------------------------------------------------------------------------------


def test_dpo_loss_matches_a_hand_computation():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    loss = dpo_loss(torch.tensor(-1.0), torch.tensor(-3.0), torch.tensor(-2.0), torch.tensor(-2.0), beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)))
    # no preference yet (policy == reference): log 2, whatever the log-probabilities are
    assert float(dpo_loss(torch.tensor(-5.0), torch.tensor(-1.0), torch.tensor(-5.0), torch.tensor(-1.0), 0.1)) == \
        pytest.approx(math.log(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor(-1.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    beta = 0.5
    dpo_loss(chosen, rejected, torch.tensor(-2.0), torch.tensor(-2.0), beta).backward()
    expected = beta * torch.sigmoid(torch.tensor(-beta * 2.0))  # d/d margin of -log sigmoid(beta * margin), negated
    assert float(chosen.grad) == pytest.approx(-float(expected))
    assert float(rejected.grad) == pytest.approx(float(expected))


def test_response_logprob_sums_the_response_tokens_log_probabilities():
    model = tiny_llama().model
    prompt, response = [1, 5, 9, 13], [20, 21, 22]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        by_hand = sum(F.log_softmax(logits[len(prompt) - 1 + i], -1)[token] for i, token in enumerate(response))
        assert float(response_logprob(model, prompt, response)) == pytest.approx(float(by_hand), abs=1e-5)
        assert float(response_logprob(model, prompt, [])) == 0.0


def test_identical_chosen_and_rejected_give_log2_and_no_gradient():
    model = tiny_llama().model
    prompt, response = [1, 7, 8], [30, 31]
    policy = response_logprob(model, prompt, response), response_logprob(model, prompt, response)
    loss = dpo_loss(*policy, policy[0].detach(), policy[1].detach(), beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert all(p.grad is None or float(p.grad.abs().max()) < 1e-7 for p in model.parameters())


@pytest.mark.parametrize("update", ["full", "attention"])
def test_dpo_training_moves_the_policy_towards_chosen(update):
    model = tiny_llama().model
    rng = np.random.default_rng(0)
    triples = [(rng.integers(3, 200, 12).tolist(), rng.integers(3, 200, 3).tolist(), rng.integers(3, 200, 3).tolist())
               for _ in range(4)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = reference_logprobs(model, triples)
    losses = train_dpo(model, triples, beta=0.5, lr=1e-2, epochs=5, pairs_per_step=2, update=update, seed=0)
    assert len(losses) == 10 and losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at first
    after = reference_logprobs(model, triples)
    assert ((after - reference) @ torch.tensor([1.0, -1.0])).mean() > 0  # chosen gained on rejected
    assert float(dpo_loss(after[:, 0], after[:, 1], reference[:, 0], reference[:, 1], 0.5).mean()) < math.log(2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    attention = {name for name in before if ".self_attn." in name}
    assert changed == (set(before) if update == "full" else attention)


# --- contrast data ----------------------------------------------------------------------------


def greedy_by_hand(model: LoadedModel, ids: list[int], max_new_tokens: int, edit: AttentionEdit | None) -> str:
    """Greedy decoding token by token with the KV cache: one sample, no padding, no generate()."""
    stop = model.model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    tokens: list[int] = []
    with torch.no_grad(), instrumented(model.model, edit):
        out = model.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in stop:
                break
            tokens.append(token)
            out = model.model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.e2e
def test_rejected_outputs_come_from_the_masked_model(embedded_model):
    task = Passkey(context_lengths=[128], depths=[0.3, 0.7], samples_per_cell=1, detect_samples_per_cell=1,
                   max_new_tokens=6)
    tokenizer = embedded_model.tokenizer
    detector = get_registry().create("detector", {"name": "attn_mass", "threshold": None, "top_k": 40})
    heads = detector.detect(embedded_model, task.build_samples(tokenizer, "detect", 1))
    edit = AttentionEdit.mask_heads(heads.selected)
    samples = task.build_samples(tokenizer, "eval", 2)
    pairs = contrast_pairs(embedded_model, task, samples, edit, batch_size=2)
    for sample, pair in zip(samples, pairs):
        assert pair.chosen == greedy_by_hand(embedded_model, sample.input_ids, task.max_new_tokens, None)
        assert pair.rejected == greedy_by_hand(embedded_model, sample.input_ids, task.max_new_tokens, edit)
        assert pair.chosen_score == task.score(sample, pair.chosen)
    assert any(pair.differ for pair in pairs)  # the mask does change what the model says
    triples = preference_triples(embedded_model, pairs)
    assert len(triples) == sum(p.differ and bool(p.chosen) and bool(p.rejected) for p in pairs)
    for (prompt, chosen, rejected), pair in zip(triples, [p for p in pairs if p.differ and p.chosen and p.rejected]):
        assert tokenizer.decode(chosen) == pair.chosen and tokenizer.decode(rejected) == pair.rejected


# --- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["train_seeds=[0]"], "must be distinct"),
    (["dpo.update=lora"], "dpo.update='lora' is unknown"),
    (["dpo.epochs=0"], "dpo.epochs=0 must be a whole number of at least 1"),
])
def test_impossible_settings_are_refused_before_any_run(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=message):
        run(compose_retmask(*overrides))
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.e2e
def test_command_builds_contrast_data_trains_and_compares(tmp_path, embedded_model):
    result = run_command(tmp_path, *TINY_COMMAND, module="framework.studies.retmask", env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    [run_] = client.search_runs([client.get_experiment_by_name("retmask").experiment_id])
    assert run_.info.status == "FINISHED"
    metrics = run_.data.metrics
    assert metrics["contrast/size"] == 2 and 0 < metrics["contrast/differ_fraction"] <= 1
    assert metrics["contrast/train_pairs"] >= 1 and metrics["heads/selected"] == 40
    for role in ("retrieval", "control"):
        for phase in ("before", "after"):
            assert 0 <= metrics[f"recall/{role}/{phase}"] <= 1
        for test in ("mcnemar", "permutation"):
            assert 0 <= metrics[f"{test}/{role}/after_vs_before/p_value"] <= 1
    assert len(client.get_metric_history(run_.info.run_id, "dpo/loss")) >= 1
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)} | {
        a.path for a in client.list_artifacts(run_.info.run_id, "contrast")}
    assert {"contrast/pairs.json", "samples.json", "config.yaml", "intervention"} <= artifacts
