"""What measuring a run's cost costs, side by side in one process on the embedded model.

(a) Forward passes with and without framework/planning/cost.py's counting hook, taking turns pass by pass:
    single-token passes (the cheapest pass a run makes: one decoding step) and 256-token prompts.
    Each mode keeps its median, so that the machine's drifts hit both alike.
(b) Opening and closing an MLflow run (local SQLite store in a temporary directory) with MLflow's
    system metrics on and off, taking turns.

Usage: python benchmarks/cost_overhead.py [--passes 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import mlflow
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from framework.model.loading import load_model
from framework.planning import cost

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")


def forward_times(model: torch.nn.Module, positions: int, passes: int) -> tuple[float, float]:
    """Median seconds per pass without and with the hook, alternating."""
    ids = torch.randint(100, 1000, (1, positions))
    meter, times = cost.Meter(), {False: [], True: []}
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(passes):
            for hooked in (False, True):
                if hooked:
                    meter.watch(model)
                started = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                times[hooked].append(time.perf_counter() - started)
                if hooked:
                    meter.close()
    return statistics.median(times[False]), statistics.median(times[True])


def run_times(runs: int) -> tuple[float, float]:
    """Median seconds to open and close a run without and with system metrics, alternating."""
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        experiment = mlflow.create_experiment("overhead")
        for _ in range(runs):
            for system in (False, True):
                started = time.perf_counter()
                with mlflow.start_run(experiment_id=experiment, log_system_metrics=system):
                    mlflow.log_metric("x", 1.0)
                times[system].append(time.perf_counter() - started)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        spec = OmegaConf.to_container(compose("config")["model"], resolve=True)
    model = load_model(spec).model
    for positions in (1, 256):
        plain, hooked = forward_times(model, positions, args.passes)
        print(f"forward pass, {positions:>3} tokens: {plain * 1e3:8.2f} ms plain, {hooked * 1e3:8.2f} ms counted"
              f" (ratio {hooked / plain:.3f})")
    plain, system = run_times(args.runs)
    print(f"open + close a run: {plain:.2f} s without system metrics, {system:.2f} s with (ratio {system / plain:.2f})")


if __name__ == "__main__":
    main()
