"""The planner's estimate next to the actual cost of real runs, side by side, on this machine.

For each context length, one real run of the embedded model in a fresh process (a temporary
MLflow store): a NIAH baseline and attention-mass detection at that length. Each run logs the
planner's estimate (``estimate.seconds``, ``estimate.peak_memory_gib``) before it starts and its
actual wall time and peak memory at its end (``actual/*``, ``estimate/*_ratio``); this script
prints them side by side, with the factor by which each run scaled its estimate after timing the
reference pass (``estimate.machine_factor``: the machine slower or faster than at calibration)
and the load average. The ratios are against the scaled estimate. The cost calibration is the
cached one (``--recalibrate`` measures it again first, with ``python -m framework.planning
calibrate``); the planner extends it on its own when a run is longer. The planner
prices bookkeeping (logging, figures) from the runs finished before on this machine, so one
short unmeasured run goes first, as a user's first run would. Targets on a 2-core CPU: time
within +-25 %, memory within +-15 %.

Usage: python benchmarks/planner_accuracy.py [--lengths 1024 2048 4096 8000] [--samples 2]
       [-- extra overrides, e.g. +intervention=head_mask model=gemma3_270m]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def run(cwd: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout's framework
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "framework", *overrides], cwd=cwd, env=env, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--samples", type=int, default=2, help="evaluation samples per length (one needle depth)")
    parser.add_argument("--recalibrate", action="store_true", help="measure the cost calibration again first")
    parser.add_argument("overrides", nargs="*", help="further overrides for every run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        if args.recalibrate:
            from framework.model.loading import cache_root

            model = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model=")), "smollm2_135m")
            for cached in (cache_root() / "cost").glob(f"{model}-*.json"):
                cached.unlink()
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "framework.planning", "calibrate", *args.overrides,
                            "--up-to", str(max(args.lengths))], cwd=cwd, env=env, check=True)
        run(cwd, ["task.context_lengths=[256]", "task.depths=[0.5]", "+detector=attn_mass", *args.overrides])  # warm-up
        for length in args.lengths:
            overrides = [f"task.context_lengths=[{length}]", "task.depths=[0.5]", f"task.samples_per_cell={args.samples}",
                         "+detector=attn_mass", f"run_name=planner-accuracy-L{length}", *args.overrides]
            result = run(cwd, overrides)
            if result.returncode:
                print(f"{length}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
            experiment = client.get_experiment_by_name("retrieval-heads")
            (found,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = 'planner-accuracy-L{length}'")
            params, metrics = found.data.params, found.data.metrics
            rows.append((length, float(params.get("estimate.scaled_seconds", params["estimate.seconds"])),
                         float(params.get("estimate.machine_factor", 1.0)), metrics["actual/seconds"],
                         float(params["estimate.peak_memory_gib"]), metrics["actual/peak_memory_gib"],
                         params.get("estimate.load_average", "?")))
            print(f"  {length} tokens done: {rows[-1]}", file=sys.stderr)
    print(f"\n{'tokens':>6} | {'est. s':>7} | {'factor':>6} | {'actual s':>8} | {'time ratio':>10} | {'est. GiB':>8} | "
          f"{'actual GiB':>10} | {'memory ratio':>12} | load")
    print("-" * 100)
    for length, est_s, factor, act_s, est_m, act_m, load in rows:
        print(f"{length:>6} | {est_s:7.1f} | {factor:6.2f} | {act_s:8.1f} | {act_s / est_s:10.2f} | {est_m:8.2f} | "
              f"{act_m:10.2f} | {act_m / est_m:12.2f} | {load}")
    print("\nratios are actual / estimated; targets: time 0.75-1.25, memory 0.85-1.15")


if __name__ == "__main__":
    main()
