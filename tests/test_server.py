"""A real shared tracking server: ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts
served from a local directory), a sweep run against it through MLFLOW_TRACKING_URI, and
everything read back through the client API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from framework_cli import TINY_GRID, TrackingServer, environment, run_here, summary, sweep_runs
from mlflow import MlflowClient


@pytest.fixture
def tracking_server(tmp_path):
    """The server's URL and its artifact directory; the server is stopped afterwards."""
    server = TrackingServer(tmp_path / "server")
    server.start()
    try:
        yield server.url, server.artifacts
    finally:
        server.stop()


@pytest.mark.e2e
def test_a_sweep_against_a_tracking_server(tmp_path, tracking_server, embedded_model):
    url, artifact_root = tracking_server
    work = tmp_path / "work"
    work.mkdir()
    result = run_here(work, "--multirun", "+detector=attn_mass", "detector.threshold=null", "detector.top_k=5",
                 "+intervention=zero_lowfreq,head_mask", *TINY_GRID, env=environment(tracking_uri=url))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (work / "mlruns" / "mlflow.db").exists()  # nothing went to the local store
    assert not list((work / "mlruns" / "pending").iterdir())  # every run's results reached the server
    assert result.stdout.count(f"run page: {url}/#/experiments/") == 2  # each job's page, on the server

    client = MlflowClient(tracking_uri=url)
    parent, children = sweep_runs(client)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert [row["outcome"] for row in summary(client, parent, tmp_path / "summary")] == ["finished", "finished"]
    for child in children:
        run_id, metrics = child.info.run_id, child.data.metrics
        assert child.info.status == "FINISHED" and child.info.artifact_uri.startswith("mlflow-artifacts:")
        assert child.data.params["intervention.name"] in {"zero_lowfreq", "head_mask"}
        assert metrics["heads/selected"] == 5 and metrics["samples"] == 2
        for condition in ("baseline", "treatment", "control"):
            assert 0 <= metrics[f"recall/{condition}"] <= 1
        assert 0 <= metrics["permutation/treatment_vs_control/p_value"] <= 1

        artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        for name in ["config.yaml", "samples.json", "recall_by_depth.png", "detector/attn_mass/heatmap.png"]:
            assert (artifacts / name).stat().st_size > 0, name
            assert (artifact_root / child.info.experiment_id / run_id / "artifacts" / name).is_file()  # on the server
        selected = json.loads((artifacts / "detector/attn_mass/selected_heads.json").read_text())["selected_heads"]
        edits = json.loads((artifacts / "intervention/edits.json").read_text())
        edited = edits["treatment"]["head_masks"] or edits["treatment"]["query_dims"]
        assert sorted(edited) == sorted(f"{layer}.{head}" for layer, head in selected)
