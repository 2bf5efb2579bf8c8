"""Sweeps as a user runs them: ``python -m framework --multirun ...`` with real Hydra
composition and launchers, against the local SQLite store. One parent run per sweep, one child
run per job, a summary on the parent; Ctrl-C, resuming, redoing, failed jobs, parallel jobs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from framework_cli import TINY_GRID, local_store, run, run_here, run_until_signalled, summary, sweep_runs

TWO_BY_TWO = ["--multirun", "seed=0,2", "+intervention=zero_lowfreq,head_mask",
              "+detector=attn_mass", "detector.threshold=null", "detector.top_k=5", *TINY_GRID]


@pytest.mark.e2e
def test_a_two_by_two_sweep_nests_its_jobs_and_resumes_after_ctrl_c(tmp_path, embedded_model):
    # Ctrl-C during the third job, once its baseline is done
    code, output = run_until_signalled(tmp_path, *TWO_BY_TWO, after=["sweep job 3/4", "step 2/4: detection"])
    assert code == 130, output[-3000:]
    assert "interrupted: the run is marked KILLED" in output and "Traceback" not in output
    client = local_store(tmp_path)
    parent, children = sweep_runs(client)
    assert parent.info.status == "KILLED" and parent.data.tags["sweep"] == "parent"
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED", "KILLED"]
    killed = next(c for c in children if c.info.status == "KILLED")
    assert "recall/baseline" in killed.data.metrics and "KeyboardInterrupt" in killed.data.tags["error"]
    samples = json.loads(Path(client.download_artifacts(killed.info.run_id, "samples.json", str(tmp_path))).read_text())
    assert {row[samples["columns"].index("condition")] for row in samples["data"]} == {"baseline"}  # partial, kept
    rows = summary(client, parent, tmp_path / "first")
    assert [row["outcome"] for row in rows] == ["finished", "finished", "killed", "not started"]
    assert rows[2]["run_id"] == killed.info.run_id and rows[3]["name"] == "seed=2 +intervention=head_mask"
    assert "did not finish: job 3 (seed=2 +intervention=zero_lowfreq), 4 (seed=2 +intervention=head_mask)" in output
    first = {c.data.tags["config_hash"]: c.info.run_id for c in children if c.info.status == "FINISHED"}

    # the same command again: the two finished jobs are skipped, the other two run
    result = run_here(tmp_path, *TWO_BY_TWO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("skipped, it finished before") == 2
    resumed, children = sweep_runs(client)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(children) == 5 and len(finished) == 4
    assert len({c.data.tags["config_hash"] for c in finished}) == 4
    assert killed.data.tags["config_hash"] in {c.data.tags["config_hash"] for c in finished}  # redone
    assert sorted(c.info.run_name for c in finished) == [
        "seed=0 +intervention=head_mask", "seed=0 +intervention=zero_lowfreq",
        "seed=2 +intervention=head_mask", "seed=2 +intervention=zero_lowfreq"]
    assert {c.data.tags["sweep.job"] for c in finished} == {"0", "1", "2", "3"}

    rows = summary(client, resumed, tmp_path / "second")
    assert [r["outcome"] for r in rows] == ["skipped", "skipped", "finished", "finished"]
    assert {r["config_hash"]: r["run_id"] for r in rows[:2]} == first  # the earlier runs stand for them
    for row in rows:
        assert row["status"] == "FINISHED" and 0 <= row["recall/treatment"] <= 1
        assert 0 <= row["mcnemar/treatment_vs_control/p_value"] <= 1
    figure = Path(client.download_artifacts(resumed.info.run_id, "sweep/recall.png", str(tmp_path / "figure")))
    assert figure.stat().st_size > 0
    assert resumed.data.metrics == {"sweep/finished": 2, "sweep/skipped": 2, "sweep/failed": 0, "sweep/killed": 0,
                                    "sweep/not_started": 0}


@pytest.mark.e2e
def test_parallel_jobs_share_the_store_a_failed_job_fails_the_sweep_and_redo_reruns(tmp_path, embedded_model):
    # joblib runs the jobs in two worker processes; seed=1 equals detect_seed, so that job fails
    args = ["--multirun", "hydra/launcher=parallel", "seed=0,1,2", *TINY_GRID]
    result = run(tmp_path, *args)
    assert result.returncode != 0
    assert "error: sweep job 2/3 (seed=1): detect_seed must differ from seed" in result.stderr
    assert "Traceback" not in result.stderr
    client = local_store(tmp_path)
    parent, children = sweep_runs(client)
    assert parent.info.status == "FAILED"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    rows = summary(client, parent, tmp_path / "first")
    assert [(r["name"], r["outcome"]) for r in rows] == [
        ("seed=0", "finished"), ("seed=1", "failed"), ("seed=2", "finished")]
    assert "detect_seed must differ" in rows[1]["error"] and rows[1]["run_id"] is None

    result = run(tmp_path, *args, "+redo=true")  # finished jobs run again
    assert result.returncode != 0 and "skipped, it finished before" not in result.stdout + result.stderr
    assert "resuming its parent run" in result.stdout
    again, children = sweep_runs(client)
    assert again.info.run_id == parent.info.run_id
    assert Counter(c.data.params["seed"] for c in children if c.info.status == "FINISHED") == {"0": 2, "2": 2}
    assert all("redo" not in c.data.params for c in children)
