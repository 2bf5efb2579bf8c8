"""Where the default run's wall time goes, and what the model cache saves.

Prints, measured side by side in one process:
* the default run (``+detector=attn_mass +intervention=zero_lowfreq`` on the embedded model):
  wall time, time inside the model's forward passes, and their ratio;
* loading the embedded model uncached (dequantise GGUF + save) vs cached (safetensors), and
  their ratio.

Usage: python benchmarks/default_run.py [hydra overrides...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from framework import hookimpl
from framework.model.loading import load_model
from framework.registry import get_registry  # noqa: E402
from framework.runner import pipeline  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


class ForwardTimer:
    """A lifecycle plugin that sums the wall time spent inside the model's forward passes."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    @hookimpl
    def run_started(self, context) -> None:
        model = context.model.model
        model.register_forward_pre_hook(lambda *_: setattr(self, "_started", time.perf_counter()))
        model.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._started))


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+detector=attn_mass", "+intervention=zero_lowfreq", *overrides])
    config = OmegaConf.to_container(cfg, resolve=True)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["RETRIEVAL_HEADS_CACHE"] = cache
        start = time.perf_counter()
        load_model(config["model"])
        uncached = time.perf_counter() - start
        start = time.perf_counter()
        load_model(config["model"])
        cached = time.perf_counter() - start
    del os.environ["RETRIEVAL_HEADS_CACHE"]

    timer = ForwardTimer()
    get_registry().manager.register(timer, name="benchmark-forward-timer")
    load_model(config["model"])  # make sure the default cache is warm, as on a second run
    with tempfile.TemporaryDirectory() as store:
        os.chdir(store)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        context = pipeline.run(config)
        wall = time.perf_counter() - start

    recalls = ", ".join(f"{k} {v.mean():.3f}" for k, v in context.outcomes.items())
    print(f"\ndefault run: {recalls}")
    print(f"{'default run wall time':<40}{wall:8.1f} s")
    print(f"{'  inside model forward passes':<40}{timer.seconds:8.1f} s")
    print(f"{'  everything else':<40}{wall - timer.seconds:8.1f} s")
    print(f"{'  ratio model compute / wall':<40}{timer.seconds / wall:8.2f}")
    print(f"{'model load, uncached (dequantise+save)':<40}{uncached:8.1f} s")
    print(f"{'model load, cached':<40}{cached:8.1f} s")
    print(f"{'  ratio uncached / cached':<40}{uncached / cached:8.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
