"""RetMask (seed 001) on the embedded model: ``python -m framework.studies.retmask``.

1. **Detect** retrieval heads with a detector plugin on detection samples of the task.
2. **Contrast data**: for training prompts of the task, the model's greedy output is the
   preferred answer and the greedy output of the same model with those heads masked (the
   intervention plugin's treatment, e.g. ``head_mask``) is the rejected one. The dataset is
   logged as ``contrast/pairs.json`` with its size and the share of prompts where the two differ.
3. **Evaluate before**: recall on held-out samples of the retrieval task and of the control task
   (``control_task``, default ``closed_book``: no long-range retrieval).
4. **DPO** on the prompts whose two outputs differ (:mod:`framework.studies.training`), updating all
   weights or only the attention projections, the reference being the model before training.
5. **Evaluate after** on the same held-out samples, and compare after vs before per task with the
   paired statistics plugins (``stats`` group). RetMask's claim: long-context gains without a
   general loss.

Responses are the generated texts re-tokenised (the end-of-sequence token is not part of them).
All of it goes to one MLflow run (experiment ``retmask``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import hydra
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from framework.interfaces import ConfigError, LoadedModel, Sample, Task
from framework.model.attention import AttentionEdit
from framework.model.generation import greedy_generate
from framework.model.loading import load_model, model_info
from framework.registry import get_registry
from framework.runner import validation
from framework.studies.training import UPDATES, Triple, train_dpo
from framework.tracking.runs import tracked_run

log = logging.getLogger(__name__)


@dataclass
class ContrastPair:
    """One prompt's preferred (unmasked model) and rejected (retrieval heads masked) output."""

    sample: Sample
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float

    @property
    def differ(self) -> bool:
        return self.chosen != self.rejected


def contrast_pairs(
    model: LoadedModel, task: Task, samples: list[Sample], edit: AttentionEdit, batch_size: int = 8
) -> list[ContrastPair]:
    """Greedy outputs of ``model`` as it is (chosen) and under ``edit`` (rejected), scored by ``task``."""
    log.info("contrast data: %d outputs of the model as it is", len(samples))
    chosen = greedy_generate(model, samples, task.max_new_tokens, None, batch_size)
    log.info("contrast data: %d outputs with the retrieval heads masked", len(samples))
    rejected = greedy_generate(model, samples, task.max_new_tokens, edit, batch_size)
    return [ContrastPair(s, c, r, task.score(s, c), task.score(s, r)) for s, c, r in zip(samples, chosen, rejected)]


def contrast_table(model: LoadedModel, pairs: list[ContrastPair]) -> pd.DataFrame:
    return pd.DataFrame([{
        "sample": p.sample.id, "prompt": model.tokenizer.decode(p.sample.input_ids), "answer": p.sample.answer,
        "chosen": p.chosen, "rejected": p.rejected, "differ": p.differ,
        "chosen_correct": p.chosen_score, "rejected_correct": p.rejected_score,
    } for p in pairs])


def preference_triples(model: LoadedModel, pairs: list[ContrastPair]) -> list[Triple]:
    """(prompt, chosen, rejected) token ids of the pairs that differ, both outputs non-empty."""
    encode = model.tokenizer.encode
    triples = []
    for pair in pairs:
        chosen, rejected = encode(pair.chosen, add_special_tokens=False), encode(pair.rejected, add_special_tokens=False)
        if pair.differ and chosen and rejected:
            triples.append((pair.sample.input_ids, chosen, rejected))
    return triples


def log_dpo_step(step: int, loss: float) -> None:
    mlflow.log_metric("dpo/loss", loss, step=step)
    log.info("[dpo] step %d loss %.4f", step + 1, loss)


def evaluate(model: LoadedModel, task: Task, samples: list[Sample], batch_size: int) -> tuple[list[str], np.ndarray]:
    outputs = greedy_generate(model, samples, task.max_new_tokens, None, batch_size)
    return outputs, np.array([task.score(s, o) for s, o in zip(samples, outputs)])


def check(config: Mapping[str, Any]) -> None:
    """Refuse impossible settings before any model work."""
    validation.check_model_device(config["model"])
    seeds = [config["seed"], config["detect_seed"], *config["train_seeds"]]
    if not config["train_seeds"] or len(set(seeds)) < len(seeds):
        raise ConfigError(
            f"seed={config['seed']}, detect_seed={config['detect_seed']} and train_seeds={config['train_seeds']} "
            "must be distinct (and train_seeds non-empty): evaluation, detection and training need different samples"
        )
    dpo = config["dpo"]
    if dpo["update"] not in UPDATES:
        raise ConfigError(f"dpo.update={dpo['update']!r} is unknown; choose one of {UPDATES}")
    if dpo["beta"] <= 0 or dpo["lr"] <= 0:
        raise ConfigError(f"dpo.beta={dpo['beta']} and dpo.lr={dpo['lr']} must be positive")
    for key in ("epochs", "pairs_per_step"):
        if not isinstance(dpo[key], int) or dpo[key] < 1:
            raise ConfigError(f"dpo.{key}={dpo[key]!r} must be a whole number of at least 1")


def run(config: Mapping[str, Any]) -> dict[str, float]:
    """Detect, build contrast data, evaluate, train with DPO, evaluate again; the metrics."""
    registry = get_registry()
    check(config)
    tasks = {"retrieval": registry.create("task", config["task"]), "control": registry.create("task", config["control_task"])}
    detector = registry.create("detector", config["detector"])
    intervention = registry.create("intervention", config["intervention"])
    stats = {key: registry.create("stats", node) for key, node in (config.get("stats") or {}).items()}
    info = model_info(config["model"])
    detector.validate(info)
    intervention.validate(info)
    batch_size, task = config["batch_size"], tasks["retrieval"]
    metrics: dict[str, float] = {}

    with tracked_run(config, info, config["experiment"], config.get("run_name"), tags={"kind": "retmask"}):
        mlflow.set_tags({"task": task.name, "control_task": tasks["control"].name, "detector": detector.name,
                         "intervention": intervention.name})
        model = load_model(config["model"])
        tokenizer = model.tokenizer

        detect_samples = task.build_samples(tokenizer, "detect", config["detect_seed"])
        log.info("detecting retrieval heads (%s) on %d samples", detector.name, len(detect_samples))
        heads = detector.detect(model, detect_samples)
        if not heads.selected:
            raise ConfigError(f"detector {detector.name!r} selected no heads: {detector.why_no_heads(heads)}")
        intervention.prepare(model, detect_samples)
        edit = intervention.treatment(model, heads.selected)
        mlflow.log_dict({"scores": heads.scores.tolist(), "selected_heads": [list(h) for h in heads.selected]},
                        f"detector/{detector.name}/heads.json")
        mlflow.log_dict(edit.describe(), "intervention/edit.json")
        metrics["heads/selected"] = len(heads.selected)
        mlflow.log_metric("heads/selected", len(heads.selected))

        prompts = []
        for seed in config["train_seeds"]:
            for sample in task.build_samples(tokenizer, "eval", seed):
                sample.id = f"train{seed}-{sample.id}"
                prompts.append(sample)
        log.info("building contrast data on %d prompts", len(prompts))
        pairs = contrast_pairs(model, task, prompts, edit, batch_size)
        triples = preference_triples(model, pairs)
        mlflow.log_table(contrast_table(model, pairs), "contrast/pairs.json")
        contrast = {
            "contrast/size": len(pairs),
            "contrast/differ_fraction": float(np.mean([p.differ for p in pairs])),
            "contrast/chosen_recall": float(np.mean([p.chosen_score for p in pairs])),
            "contrast/rejected_recall": float(np.mean([p.rejected_score for p in pairs])),
            "contrast/train_pairs": len(triples),
        }
        mlflow.log_metrics(contrast)
        metrics.update(contrast)
        if not triples:
            raise ConfigError("no contrast pair differs: masking the detected heads changes no output; "
                              "select more heads (detector.top_k) or use more training prompts")

        held_out = {role: t.build_samples(tokenizer, "eval", config["seed"]) for role, t in tasks.items()}
        outputs: dict[tuple[str, str], list[str]] = {}
        outcomes: dict[tuple[str, str], np.ndarray] = {}

        def evaluate_held_out(phase: str) -> None:
            for role, samples in held_out.items():
                outputs[role, phase], outcomes[role, phase] = evaluate(model, tasks[role], samples, batch_size)
                metrics[f"recall/{role}/{phase}"] = float(outcomes[role, phase].mean())
                mlflow.log_metric(f"recall/{role}/{phase}", metrics[f"recall/{role}/{phase}"])
                log.info("[%s] %s recall %.3f", phase, role, metrics[f"recall/{role}/{phase}"])

        evaluate_held_out("before")
        dpo = config["dpo"]
        log.info("DPO on %d pairs (%s update)", len(triples), dpo["update"])
        train_dpo(model.model, triples, dpo["beta"], dpo["lr"], dpo["epochs"], dpo["pairs_per_step"], dpo["update"],
                  dpo["seed"], report=log_dpo_step)
        evaluate_held_out("after")

        compared = {}
        for role in tasks:
            compared[f"recall/{role}/after_minus_before"] = metrics[f"recall/{role}/after"] - metrics[f"recall/{role}/before"]
            for key, test in stats.items():
                for name, value in test.compare(outcomes[role, "after"], outcomes[role, "before"]).items():
                    compared[f"{key}/{role}/after_vs_before/{name}"] = value
        mlflow.log_metrics(compared)
        metrics.update(compared)
        mlflow.log_table(pd.DataFrame([
            {"sample": s.id, "role": role, "phase": phase, "answer": s.answer, "output": output, "correct": float(correct)}
            for (role, phase), texts in outputs.items()
            for s, output, correct in zip(held_out[role], texts, outcomes[role, phase])
        ]), "samples.json")
    return metrics


@hydra.main(version_base="1.3", config_path="../../conf", config_name="retmask")
def main(cfg: DictConfig) -> None:
    from framework.__main__ import run_or_exit

    metrics = run_or_exit(run, cfg)
    for key in sorted(metrics):
        if key.startswith(("contrast/", "recall/")) or key.endswith("p_value"):
            print(f"{key} = {metrics[key]:.4g}")


if __name__ == "__main__":
    main()
