"""Training pieces shared by the training experiments: a minimal optimisation loop, response
log-probabilities, and the DPO objective (Rafailov et al. 2023) that RetMask trains with.

Everything is plain torch on transformers models, small enough to read in one sitting: the
experiments need a few hundred steps on a CPU, not a trainer framework (TRL is not a dependency).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from framework.interfaces import ConfigError

UPDATES = ("full", "attention")
Triple = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt, chosen, rejected) token ids
Report = Callable[[int, float], None]  # (step, loss)


def fit(
    model: torch.nn.Module,
    step_loss: Callable[[int], torch.Tensor],
    steps: int,
    optimiser: torch.optim.Optimizer,
    report: Report | None = None,
    max_grad_norm: float | None = 1.0,
) -> list[float]:
    """Minimise ``step_loss(step)`` for ``steps`` optimiser steps; the loss of every step.

    ``report(step, loss)`` is called after each step (e.g. to log a training curve); gradients
    are clipped to ``max_grad_norm`` (None: no clipping). The model is left in eval mode.
    """
    losses = []
    parameters = [p for group in optimiser.param_groups for p in group["params"]]
    model.train()
    try:
        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = step_loss(step)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimiser.step()
            losses.append(float(loss.detach()))
            if report is not None:
                report(step, losses[-1])
    finally:
        model.eval()
    return losses


def trainable_parameters(model: torch.nn.Module, update: str) -> list[torch.nn.Parameter]:
    """The parameters an update trains, the others frozen: ``full`` (all) or ``attention``
    (the attention projections of every layer, ``*.self_attn.*``)."""
    if update not in UPDATES:
        raise ConfigError(f"update={update!r} is unknown; choose one of {UPDATES}")
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(update == "full" or ".self_attn." in name)
        if parameter.requires_grad:
            chosen.append(parameter)
    return chosen


def response_logprob(model: torch.nn.Module, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
    """Summed log-probability of ``response_ids`` following ``prompt_ids`` (a scalar; 0 for an
    empty response), differentiable unless called under no_grad."""
    if not response_ids:
        return torch.zeros((), device=next(model.parameters()).device)
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    # the last len(response) + 1 positions: each predicts the next token, the final one nothing
    logits = model(input_ids=ids, logits_to_keep=len(response_ids) + 1).logits[0, :-1].float()
    targets = torch.tensor(list(response_ids), device=device)
    return F.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  from summed
    response log-probabilities of the policy and the frozen reference model."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def reference_logprobs(model: torch.nn.Module, triples: Sequence[Triple]) -> torch.Tensor:
    """[pairs, 2] (chosen, rejected) log-probabilities under ``model`` as it is now: the DPO
    reference, computed once before training so that no second copy of the model is kept."""
    with torch.no_grad():
        return torch.stack([torch.stack([response_logprob(model, p, c), response_logprob(model, p, r)])
                            for p, c, r in triples]).cpu()


def train_dpo(
    model: torch.nn.Module,
    triples: Sequence[Triple],
    beta: float,
    lr: float,
    epochs: int,
    pairs_per_step: int,
    update: str,
    seed: int,
    report: Report | None = None,
) -> list[float]:
    """DPO of ``model`` against its own state before training (the reference); the loss per
    optimiser step. Each step averages ``pairs_per_step`` pairs, shuffled per epoch with
    ``seed``; ``update`` picks the trained parameters (see :func:`trainable_parameters`)."""
    reference = reference_logprobs(model, triples)
    optimiser = torch.optim.AdamW(trainable_parameters(model, update), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(triples)) for _ in range(epochs)])
    steps = [order[i : i + pairs_per_step] for i in range(0, len(order), pairs_per_step)]

    def step_loss(step: int) -> torch.Tensor:
        losses = []
        for index in steps[step]:
            prompt, chosen, rejected = triples[index]
            policy = [response_logprob(model, prompt, chosen), response_logprob(model, prompt, rejected)]
            losses.append(dpo_loss(*policy, *reference[index].to(policy[0].device), beta))
        return torch.stack(losses).mean()

    return fit(model, step_loss, len(steps), optimiser, report)
