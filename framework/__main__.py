"""Front door: ``python -m framework +detector=attn_mass +intervention=zero_lowfreq``."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.interfaces import ConfigError

log = logging.getLogger("framework")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from framework import pipeline  # heavy imports after Hydra has parsed the command line

    try:
        context = pipeline.run(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as error:
        sys.exit(f"error: {error}")
    except Exception as error:  # the run is already marked FAILED in MLflow with its traceback
        log.debug("run failed", exc_info=True)
        sys.exit(f"error: run failed: {type(error).__name__}: {error}\n"
                 "(marked FAILED in MLflow; the traceback is in the run's error.txt artifact)")
    summary = ", ".join(f"{k}={v.mean():.3f}" for k, v in context.outcomes.items())
    print(f"run {context.run_id}: recall {summary}")
    for key, value in context.metrics.items():
        if key.endswith("p_value"):
            print(f"  {key} = {value:.4g}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
