"""A first run on a fresh machine, case by case: each command as a new user types it, in a new
process, on an empty model cache (a temporary ``RETRIEVAL_HEADS_CACHE``) and an empty working
folder; printed per case: the exit code, the wall time, the last line of its output (the
``error:`` line of a refusal) and whether a model folder was written to the cache.

Cases: a tracking server that does not answer; a 4K dry run; claim 4 at one sample per cell
(refused: its smallest reachable p), then the same with ``allow_underpowered=true`` (a real run,
which dequantises and calibrates first); then the README's main job (``+detector=attn_mass
+intervention=zero_lowfreq``), whose ``estimate/time_ratio``
and ``estimate/memory_ratio`` are printed. The load average is printed with each case: on a
shared machine the times depend on it.

Usage: python benchmarks/first_run.py [--cases server dry claim claim_run default] [--keep-cache DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CLAIM4_ONE_PER_CELL = ["+experiment=claim4_lowfreq_dose", "task.context_lengths=[256,384,512]", "task.depths=[0.5]",
                       "task.samples_per_cell=1", "dose.values=[0.03125,0.125,0.25]"]
CASES = {
    "server": (["MLFLOW_TRACKING_URI=http://127.0.0.1:9"], []),
    "dry": ([], ["dry_run=true", "task.context_lengths=[4096]"]),
    "claim": ([], CLAIM4_ONE_PER_CELL),
    "claim_run": ([], [*CLAIM4_ONE_PER_CELL, "allow_underpowered=true"]),
    "default": ([], ["+detector=attn_mass", "+intervention=zero_lowfreq"]),  # the README's first command
}


def run_case(name: str, cwd: Path, cache: Path) -> None:
    settings, overrides = CASES[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RETRIEVAL_HEADS_CACHE": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(setting.split("=", 1) for setting in settings)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "framework", *overrides], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    last = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name not in ("cost", "gguf")) if cache.exists() else []
    print(f"\n== {name}: {' '.join(settings + overrides) or '(no overrides)'}")
    print(f"exit {result.returncode} after {seconds:.1f} s (load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores); model folders in the cache: {folders or 'none'}")
    print(f"  {last}")
    if name == "dry":
        print("\n".join(f"  {line}" for line in result.stdout.splitlines()))
    if result.returncode == 0 and name in ("claim_run", "default"):
        client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"])
        params, metrics, tags = runs[0].data.params, runs[0].data.metrics, runs[0].data.tags
        print(f"  estimate {params['estimate.seconds']} s (scaled by the reference pass: "
              f"{params.get('estimate.scaled_seconds', 'not scaled')}, factor {params.get('estimate.machine_factor', 1)}), "
              f"actual {metrics['actual/seconds']:.1f} s: time ratio {metrics['estimate/time_ratio']:.2f}; memory ratio "
              f"{metrics['estimate/memory_ratio']:.2f}; underpowered tag: {tags.get('underpowered', 'no')}; "
              f"claim/verdict {metrics.get('claim/verdict', 'none')}")
    sys.stdout.flush()  # each case as it ends: the output often goes to a file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--keep-cache", type=Path, help="use (and keep) this cache folder instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache = args.keep_cache or Path(folder) / "cache"
        for name in args.cases:
            cwd = Path(folder) / name
            cwd.mkdir()
            run_case(name, cwd, cache)


if __name__ == "__main__":
    main()
