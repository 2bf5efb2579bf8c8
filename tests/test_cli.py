"""The front door, run as a user runs it: ``python -m framework ...`` with real Hydra composition
and a real MLflow store (SQLite under the working directory's mlruns/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from framework_cli import run_here
from mlflow.tracking import MlflowClient

from framework.model.rope import lowest_frequency_dims

# One worker: the default run is shared by the tests that read it
pytestmark = pytest.mark.xdist_group("test_cli")

SMALL_GRID = ["task.context_lengths=[256]", "task.depths=[0.2,0.8]", "task.samples_per_cell=2"]


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m framework overrides`` in ``cwd``, offline, to the local store there; run inside
    this interpreter (:func:`framework_cli.run_here`), which spares each run an interpreter start."""
    return run_here(cwd, *overrides)


def store(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def only_run(cwd: Path):
    client = store(cwd)
    experiment = client.get_experiment_by_name("retrieval-heads")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_unknown_detector_lists_available_ones(tmp_path):
    result = run_here(tmp_path, "+detector=nope")
    assert result.returncode != 0
    assert "Could not find 'detector/nope'" in result.stderr
    assert "Available options in 'detector'" in result.stderr and "attn_mass" in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+detector=attn_mass", "+intervention=zero_lowfreq", "intervention.n_dims=100"],
         "n_dims=100 is impossible: it must be an even number between 2 and the head dimension 64"),
        (["+detector=attn_mass", "detector.top_k=1000"], "top_k=1000 is impossible: smollm2_135m has 270 heads"),
        (["+intervention=head_mask"], "intervention 'head_mask' needs heads to act on: add +detector=<name>"),
    ],
)
def test_impossible_parameters_fail_before_any_model_work(tmp_path, overrides, message):
    result = run_here(tmp_path, *overrides)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing was started


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, embedded_model):
    """The README's main command on a small grid, run once for the tests below."""
    folder = tmp_path_factory.mktemp("default_run")
    result = run_cli(folder, "+detector=attn_mass", "+intervention=zero_lowfreq", *SMALL_GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result


@pytest.mark.e2e
def test_default_command_logs_a_complete_run(default_run):
    tmp_path, result = default_run
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["model.family"] == "llama" and float(tags["model.rope_theta"]) == 100000.0
    assert (tags["model.layers"], tags["model.heads"], tags["model.kv_heads"], tags["model.head_dim"]) == ("30", "9", "3", "64")
    assert run.data.params["intervention.name"] == "zero_lowfreq" and run.data.params["seed"] == "0"

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    for name in ["config.yaml", "detector/attn_mass/heatmap.png", "recall_by_depth.png", "samples.json"]:
        assert (artifacts / name).stat().st_size > 0, name
    scores = np.array(json.loads((artifacts / "detector/attn_mass/scores.json").read_text())["scores"])
    selected = json.loads((artifacts / "detector/attn_mass/selected_heads.json").read_text())["selected_heads"]
    assert scores.shape == (30, 9)
    assert sorted(map(list, zip(*np.nonzero(scores > 0.5)))) == sorted(selected)  # the paper's threshold
    assert metrics["heads/selected"] == len(selected)

    # the treatment zeroes, in every selected head, the 8 lowest-frequency rotate_half pairs:
    # inv_freq[j] = theta^(-2j/64) falls with j, so pairs j = 24..31, i.e. dims 24-31 and 56-63
    edits = json.loads((artifacts / "intervention/edits.json").read_text())
    expected = list(range(24, 32)) + list(range(56, 64))
    inv_freq = 100000.0 ** (-np.arange(0, 64, 2) / 64)
    assert lowest_frequency_dims(inv_freq, 16).tolist() == expected
    assert edits["treatment"]["query_dims"] == {f"{l}.{h}": expected for l, h in sorted(map(tuple, selected))}
    control = edits["control"]["query_dims"]
    assert control.keys() == edits["treatment"]["query_dims"].keys()
    for dims in control.values():  # random whole pairs of the same size
        assert len(dims) == 16 and {d + 32 for d in dims if d < 32} == {d for d in dims if d >= 32}
    assert any(dims != expected for dims in control.values())

    table = json.loads((artifacts / "samples.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 3 * 4
    for condition in ("baseline", "treatment", "control"):
        outcomes = [r["correct"] for r in rows if r["condition"] == condition]
        assert metrics[f"recall/{condition}"] == pytest.approx(np.mean(outcomes))
    for key in ("mcnemar", "permutation"):
        for comparison in ("treatment_vs_baseline", "control_vs_baseline", "treatment_vs_control"):
            assert 0 <= metrics[f"{key}/{comparison}/p_value"] <= 1
    assert "recall baseline=" in result.stdout


@pytest.mark.e2e
def test_a_failing_run_is_marked_failed_and_keeps_what_it_logged(tmp_path, embedded_model):
    result = run_cli(tmp_path, "+detector=attn_mass", "detector.threshold=0.999", "+intervention=head_mask", *SMALL_GRID)
    assert result.returncode != 0
    assert "selected no heads" in result.stderr and "Traceback" not in result.stderr
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "selected no heads" in run.data.tags["error"]
    assert "recall/baseline" in run.data.metrics  # finished work is kept
    kept = {f.path for f in client.list_artifacts(run.info.run_id, "detector/attn_mass")}
    assert "detector/attn_mass/scores.json" in kept


@pytest.mark.e2e
def test_compare_reads_runs_back_and_logs_a_comparison_run(default_run):
    folder, _ = default_run
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "framework.analysis.compare", "--out", "compared"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(folder)
    table = pd.read_csv(folder / "compared" / "comparison.csv")
    assert len(table) == 1 and table.loc[0, "run_id"] == run.info.run_id
    row = table.loc[0]
    assert row["family"] == "llama" and row["rope_theta"] == 100000.0
    assert row["heads_selected"] == run.data.metrics["heads/selected"]
    assert row["recall_drop"] == pytest.approx(run.data.metrics["recall/baseline"] - run.data.metrics["recall/treatment"])
    assert row["drop_ci_low"] <= row["recall_drop"] <= row["drop_ci_high"]
    assert (folder / "compared" / "theta_vs_heads.png").stat().st_size > 0
    comparison_runs = client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    assert [r.data.metrics["runs_compared"] for r in comparison_runs] == [1.0]
