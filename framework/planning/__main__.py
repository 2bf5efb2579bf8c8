"""Calibrate the planner's cost model as a step of its own, before a long run or a dry run:

    python -m framework.planning calibrate model=smollm2_135m --up-to 8192 [model.device=cpu ...]

It loads the model once, times prefills and decode steps at the calibration's shapes and at
doubling lengths up to ``--up-to`` tokens (each point logged as it is measured, with the
machine's load), and caches the fit where every run and dry run reads it. An interrupted
calibration resumes where it stopped; points measured while other work kept every core busy
are flagged, and measured again by a later calibration on a quiet machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hydra.errors import HydraException

from framework.interfaces import ConfigError, Task

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def calibrate(overrides: list[str], up_to: int) -> str:
    """Calibrate the composed config's model up to ``up_to`` tokens; a summary of the points."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from framework.model.loading import model_config
    from framework.planning import planner
    from framework.runner.validation import check_model_device

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        spec = OmegaConf.to_container(compose("config", overrides=overrides).model, resolve=True)
    check_model_device(spec)
    text = model_config(spec)
    positions = getattr(getattr(text, "text_config", text), "max_position_embeddings", 0) or 0
    limit = positions - Task.max_new_tokens if positions else 0
    if limit and up_to > positions:
        raise ConfigError(f"--up-to {up_to} exceeds the {positions} positions of {spec['name']}; "
                          f"choose at most {positions}")
    cal = planner.calibrate(spec, up_to, limit)
    rows = [f"{'batch':>5} {'tokens':>7} {'prefill s':>10} {'decode step s':>14} {'load':>6} {'cores':>5} "
            f"{'threads':>7}  busy"]
    for p in sorted(cal.points, key=lambda p: (p["length"], p["batch"])):
        rows.append(f"{p['batch']:>5.0f} {p['length']:>7.0f} {p['prefill_seconds']:>10.3f} {p['decode_step_seconds']:>14.4f} "
                    f"{p.get('load_average', float('nan')):>6.1f} {p.get('cores', 0):>5.0f} {p.get('threads', 0):>7.0f}  "
                    f"{'yes' if p.get('busy') else 'no'}")
    return (f"{spec['name']} on {cal.device} ({cal.dtype}, {cal.threads} threads) is calibrated up to {cal.longest} "
            "tokens:\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m framework.planning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["calibrate"])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=gemma3_270m model.device=cpu")
    parser.add_argument("--up-to", type=int, default=2048, help="the longest prompt to calibrate for, in tokens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        print(calibrate(args.overrides, args.up_to))
    except (ConfigError, HydraException) as error:  # a bad option or override: one line, no traceback
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("stopped: the points measured so far are kept; the same command resumes the calibration")


if __name__ == "__main__":
    main()
