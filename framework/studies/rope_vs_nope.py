"""Chiang & Yogatama (2025, Sec. 4) controlled study: ``python -m framework.studies.rope_vs_nope``.

The same small Llama (same initial weights, same training batches) is trained from scratch on
synthetic key-value retrieval (:mod:`framework.studies.synthetic_kv`) twice: with RoPE and with NoPE
(:func:`framework.studies.positional.remove_rope`). For both models the run measures

* retrieval accuracy on held-out samples, at the training positions and at contiguous ones,
  and with the highest- or the lowest-frequency quarter of every head's query pairs zeroed
  (the paper's Fig. 1b: removing the dims RoPE leaves unused costs little);
* per-dimension query utility (the ``utility`` detector, Eq. 4) and W_q row norms (``qnorm``),
  averaged per RoPE pair (both halves of a pair), per head, ordered from the highest frequency
  to the lowest; the NoPE model's dims are named by the pair they would form under RoPE.

Verdict metrics: for each measure, the lowest-frequency quarter's mean minus the highest's (row
norms divided by their head's mean first), RoPE minus NoPE. Positive means that RoPE shifts use
away from the high-frequency dims, as the paper finds. Everything goes to one MLflow run
(experiment ``rope-vs-nope``); ``rope_vs_nope_size=paper`` selects the paper's sizes (a GPU job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import hydra
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from framework.interfaces import ConfigError, LoadedModel  # noqa: E402
from framework.model.attention import AttentionEdit, Head  # noqa: E402
from framework.model.loading import info_from_config, prepare, resolve_device  # noqa: E402
from framework.model.rope import highest_frequency_dims, lowest_frequency_dims  # noqa: E402
from framework.registry import get_registry  # noqa: E402
from framework.runner.validation import check_device  # noqa: E402
from framework.studies.synthetic_kv import KVTask, build_model, retrieval_accuracy, retrieval_loss  # noqa: E402
from framework.studies.training import fit  # noqa: E402
from framework.tracking.runs import tracked_run  # noqa: E402
from plugins.detectors.qnorm import query_row_norms  # noqa: E402

log = logging.getLogger(__name__)

VARIANTS = {"rope": "RoPE", "nope": "NoPE"}  # name -> label
N_BANDS = 4  # frequency quarters


@dataclass
class VariantResult:
    """What one trained model measured: accuracies, per-pair profiles [heads, pairs] (highest
    frequency first), the training curve."""

    accuracy: dict[str, float]
    utility: np.ndarray
    qnorm: np.ndarray
    losses: list[float] = field(default_factory=list)

    def profile(self, measure: str) -> np.ndarray:
        """[heads, pairs] ``utility``, or ``qnorm`` relative to its head's mean (heads of
        different scale then weigh the same)."""
        if measure == "utility":
            return self.utility
        return self.qnorm / self.qnorm.mean(axis=1, keepdims=True)

    def bands(self, measure: str) -> np.ndarray:
        """Mean of ``measure``'s profile in each frequency quarter, the highest-frequency first."""
        return np.array([band.mean() for band in np.array_split(self.profile(measure), N_BANDS, axis=1)])

    def gap(self, measure: str) -> float:
        """Lowest-frequency quarter minus highest-frequency quarter."""
        bands = self.bands(measure)
        return float(bands[-1] - bands[0])


def pair_profile(per_dim: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """[layers, heads, head_dim] -> [layers * heads, head_dim / 2]: the mean of both halves of
    each RoPE pair, pairs ordered from the highest frequency to the lowest."""
    half = per_dim.shape[-1] // 2
    pairs = (per_dim[..., :half] + per_dim[..., half:]) / 2
    return pairs.reshape(-1, half)[:, np.argsort(-inv_freq, kind="stable")]


def check(config: Mapping[str, Any]) -> KVTask:
    """Refuse impossible settings before any training; the task they describe."""
    check_device(config.get("device", "auto"), option="device")
    task = KVTask(**config["data"])
    head_dim = config["model"]["head_dim"]
    if head_dim % (2 * N_BANDS):
        raise ConfigError(
            f"model.head_dim={head_dim} must be a multiple of {2 * N_BANDS}: the comparison splits the "
            f"{head_dim // 2} RoPE pairs into {N_BANDS} equal frequency bands"
        )
    train = config["train"]
    for key in ("steps", "batch_size", "log_every", "eval_every", "eval_samples", "utility_samples"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key}={train[key]!r} must be a whole number of at least 1")
    if train["lr"] <= 0:
        raise ConfigError(f"train.lr={train['lr']} must be positive")
    if config["seed"] == config["eval_seed"]:
        raise ConfigError("eval_seed must differ from seed: held-out samples must not be training batches")
    return task


def quarter_edits(model: LoadedModel) -> dict[str, AttentionEdit]:
    """Zero the highest- or the lowest-frequency quarter of the query pairs in every head."""
    info = model.info
    heads: list[Head] = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    quarter = info.head_dim // N_BANDS
    return {
        "zero_highfreq_quarter": AttentionEdit.zero_query_dims(
            {h: highest_frequency_dims(model.inv_freq, quarter) for h in heads}, info.head_dim),
        "zero_lowfreq_quarter": AttentionEdit.zero_query_dims(
            {h: lowest_frequency_dims(model.inv_freq, quarter) for h in heads}, info.head_dim),
    }


def train_variant(variant: str, task: KVTask, config: Mapping[str, Any], device: torch.device) -> VariantResult:
    """Train one model, log its curve under ``<variant>/``, and measure it."""
    train = config["train"]
    model = build_model(task, rope=variant == "rope", seed=config["seed"], **config["model"]).to(device)
    loaded = prepare(model, None, f"kv_llama_{variant}")
    batches = torch.Generator().manual_seed(config["seed"])  # the same batches for both variants
    held_out = task.batch(train["eval_samples"], torch.Generator().manual_seed(config["eval_seed"])).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=train["lr"])
    started = time.perf_counter()

    def step_loss(step: int) -> torch.Tensor:
        return retrieval_loss(model, task.batch(train["batch_size"], batches).to(device))

    def report(step: int, loss: float) -> None:
        done = step + 1
        if step % train["log_every"] == 0 or done == train["steps"]:
            mlflow.log_metric(f"{variant}/train_loss", loss, step=step)
        if done % train["eval_every"] == 0 or done == train["steps"]:
            accuracy = retrieval_accuracy(model, held_out)
            mlflow.log_metric(f"{variant}/eval_accuracy", accuracy, step=step)
            log.info("[%s] step %d/%d loss %.3f held-out accuracy %.3f (%.0f s)",
                     variant, done, train["steps"], loss, accuracy, time.perf_counter() - started)

    losses = fit(model, step_loss, train["steps"], optimiser, report)
    contiguous = task.batch(train["eval_samples"], torch.Generator().manual_seed(config["eval_seed"]), spread_positions=False)
    accuracy = {"held_out": retrieval_accuracy(model, held_out),
                "contiguous_positions": retrieval_accuracy(model, contiguous.to(device))}
    for name, edit in quarter_edits(loaded).items():
        accuracy[name] = retrieval_accuracy(model, held_out, edit)

    detector = get_registry().create("detector", config["utility"])
    detector.validate(loaded.info)
    utility = detector.detect(loaded, task.samples(train["utility_samples"], config["eval_seed"])).extra["utility"]
    return VariantResult(
        accuracy=accuracy,
        utility=pair_profile(utility, loaded.inv_freq),
        qnorm=pair_profile(query_row_norms(loaded), loaded.inv_freq),
        losses=losses,
    )


def comparison_figure(results: Mapping[str, VariantResult]) -> plt.Figure:
    """Utility and relative W_q row norm per RoPE pair (mean over heads, band = one SD), and the
    training curves, RoPE vs NoPE."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for variant, result in results.items():
        for ax, profile in zip(axes[:2], (result.profile("utility"), result.profile("qnorm"))):
            mean, spread = profile.mean(0), profile.std(0)
            pairs = np.arange(len(mean))
            ax.plot(pairs, mean, marker="o", ms=3, label=VARIANTS[variant])
            ax.fill_between(pairs, mean - spread, mean + spread, alpha=0.2)
        axes[2].plot(result.losses, lw=0.8, label=VARIANTS[variant])
    axes[0].set(ylabel="utility u (Eq. 4)", ylim=(-0.05, 1.05), title="Query utility per RoPE pair")
    axes[1].set(ylabel="W_q row L1 norm / head mean", title="Query-row norm per RoPE pair")
    for ax in axes[:2]:
        ax.set_xlabel("RoPE pair j (0 = highest frequency)")
    axes[2].set(xlabel="step", ylabel="training loss", yscale="log", title="Training curves")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    return fig


def summary_metrics(results: Mapping[str, VariantResult]) -> dict[str, float]:
    """Accuracies, band means and the verdict gaps (see the module docstring)."""
    metrics: dict[str, float] = {}
    for variant, result in results.items():
        for name, value in result.accuracy.items():
            metrics[f"{variant}/accuracy/{name}"] = value
        for measure in ("utility", "qnorm"):
            for band, value in enumerate(result.bands(measure), start=1):
                metrics[f"{variant}/{measure}/band{band}"] = float(value)
            metrics[f"{variant}/{measure}/low_minus_high"] = result.gap(measure)
    for measure in ("utility", "qnorm"):
        metrics[f"verdict/{measure}_gap_rope_minus_nope"] = (
            metrics[f"rope/{measure}/low_minus_high"] - metrics[f"nope/{measure}/low_minus_high"])
    return metrics


def band_table(results: Mapping[str, VariantResult]) -> pd.DataFrame:
    """Per head and frequency band (1 = highest-frequency quarter): utility and relative norm."""
    rows = []
    for variant, result in results.items():
        for head, (utility, norm) in enumerate(zip(result.profile("utility"), result.profile("qnorm"))):
            for band, (u, n) in enumerate(zip(np.array_split(utility, N_BANDS), np.array_split(norm, N_BANDS)), start=1):
                rows.append({"variant": variant, "head": head, "band": band, "utility": float(u.mean()),
                             "relative_qnorm": float(n.mean())})
    return pd.DataFrame(rows)


def run(config: Mapping[str, Any]) -> dict[str, float]:
    """Train and compare both variants; the summary metrics (also logged to MLflow)."""
    task = check(config)
    device = resolve_device(config.get("device", "auto"))
    info = info_from_config("kv_llama", build_model(task, rope=True, seed=config["seed"], **config["model"]).config)
    with tracked_run(config, info, config["experiment"], config.get("run_name"),
                              tags={"kind": "rope_vs_nope", "task": "synthetic_kv"}):
        results = {}
        for variant in VARIANTS:
            log.info("training the %s model (%d steps)", variant, config["train"]["steps"])
            results[variant] = train_variant(variant, task, config, device)
        metrics = summary_metrics(results)
        mlflow.log_metrics(metrics)
        mlflow.log_figure(comparison_figure(results), "rope_vs_nope.png")
        mlflow.log_table(band_table(results), "bands.json")
        mlflow.log_dict({variant: {"utility": r.utility.tolist(), "qnorm": r.qnorm.tolist()}
                         for variant, r in results.items()}, "per_pair.json")
    return metrics


@hydra.main(version_base="1.3", config_path="../../conf", config_name="rope_vs_nope")
def main(cfg: DictConfig) -> None:
    from framework.__main__ import run_or_exit

    metrics = run_or_exit(run, cfg)
    for key in sorted(metrics):
        if "/accuracy/" in key or "low_minus_high" in key or key.startswith("verdict/"):
            print(f"{key} = {metrics[key]:.4f}")


if __name__ == "__main__":
    main()
