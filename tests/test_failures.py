"""Every way a command can go wrong, driven through the real CLI as a user meets it on a laptop
or a Slurm cluster: bad input refused before any run is created, runs stopped by Ctrl-C or
SIGTERM, a tracking store that is missing, unwritable or goes away mid-run, a damaged model
cache, misbehaving plugins, concurrent runs. Each test asserts the exit status, the message, and
the final state of every run in the store: none left RUNNING, nothing that was logged lost.

Refusals, which end before any model work, run the command inside the test's interpreter
(``run_here``: the same ``python -m`` entry point, environment and working directory); runs that
load the model, are signalled or load plugins from a new path get an interpreter of their own."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from framework_cli import (
    TINY_GRID,
    TrackingServer,
    all_runs,
    command,
    environment,
    free_port,
    local_store,
    run,
    run_here,
    run_until_signalled,
    run_watching,
    summary,
    sweep_runs,
)
from mlflow import MlflowClient
from test_third_party import EXPLODING, IMPOSTOR, make_distribution

from framework.model.loading import cache_problem, cache_root

TOP5 = ["+detector=attn_mass", "detector.threshold=null", "detector.top_k=5"]


def final_states(client: MlflowClient) -> list[str]:
    """The status of every run in the store; none may be left RUNNING."""
    experiment = client.get_experiment_by_name("retrieval-heads")
    statuses = [r.info.status for r in all_runs(client)] if experiment else []
    assert "RUNNING" not in statuses
    return statuses


def sample_conditions(client: MlflowClient, run_id: str, folder: Path) -> set[str]:
    """The conditions whose per-sample outputs the run's samples.json holds."""
    table = json.loads(Path(client.download_artifacts(run_id, "samples.json", str(folder))).read_text())
    return {row[table["columns"].index("condition")] for row in table["data"]}


def refused(result: subprocess.CompletedProcess, cwd: Path, message: str) -> None:
    """Refused before any run was created, in one ``error:`` line naming what is wrong."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (cwd / "mlruns" / "mlflow.db").exists()


# ---------------------------------------------------------------- bad input, refused up front

CUDA = "cuda, cuda:0" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("overrides, message", [
    (["seed=abc"], "error: seed='abc' is impossible: seed expects a non-negative integer"),
    (["detect_seed=-1"], "error: detect_seed=-1 is impossible: detect_seed expects a non-negative integer"),
    (["batch_size=0"], "error: batch_size=0 is impossible: batch_size expects an integer >= 1"),
    (["controls=-2", "+detector=attn_mass", "+intervention=head_mask"],
     "error: controls=-2 is impossible: controls expects a non-negative integer"),
    (["model.dtype=int8"], "error: model.dtype='int8' is unknown; choose one of auto, float32, bfloat16, float16"),
    (["model.device=tpu"], "error: model.device='tpu' is not available on this machine; choose one of auto, cpu"),
    (["run_name=' '"], "error: run_name=' ' is impossible: run_name expects a non-empty name (or null)"),
    (["seed=1"], "error: detect_seed must differ from seed"),
    (["+detector=nope"], "Could not find 'detector/nope'"),
    (["seeed=3"], "Could not override 'seeed'"),  # a typo in an option's name
    (["+detector=attn_mass", "detector.top_k=1000"], "top_k=1000 is impossible: smollm2_135m has 270 heads"),
    (["+detector=attn_mass", "+intervention=zero_lowfreq", "intervention.n_dims=100"],
     "n_dims=100 is impossible: it must be an even number between 2 and the head dimension 64"),
    (["task=multidoc_qa", "task.path=missing.jsonl.gz"], "error: path='missing.jsonl.gz' is not a file"),
    (["+experiment=claim1_causal_heads", "controls=5"],  # a verdict this run could not reach: refused, not failed hours later
     "error: claim 'causal_heads' needs controls >= 19 (a null of 20 random head sets) in the run's config"),
    # claim 4 at one sample per cell (3 cells, 3 doses): 3 pairs allow a Holm-adjusted McNemar p of 0.75 at best
    (["+experiment=claim4_lowfreq_dose", "task.context_lengths=[256]", "task.depths=[0.2,0.5,0.8]",
      "task.samples_per_cell=1", "dose.values=[0.03125,0.125,0.25]"],
     "error: claim 'lowfreq_dose' cannot reach its verdict with this design: treatment below its control at the seed's "
     "dose has 3 samples, so its smallest reachable p is 0.75, not below 0.05"),
    (["+detector=retrieval_score", "task=closed_book"],  # no needle in any detection sample: nothing to score
     "error: retrieval_score has nothing to score: none of the "),
])
def test_bad_input_is_refused_before_any_run(tmp_path, overrides, message):
    refused(run_here(tmp_path, *overrides), tmp_path, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_that_is_not_here_is_refused_naming_the_ones_that_are(tmp_path):
    refused(run_here(tmp_path, "model.device=cuda"), tmp_path,
            "error: model.device='cuda' is not available on this machine; choose one of auto, cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("module, option", [("framework.studies.rope_vs_nope", "device"),
                                            ("framework.studies.retmask", "model.device")])
def test_a_training_study_refuses_a_device_that_is_not_here(tmp_path, module, option):
    result = run_here(tmp_path, f"{option}=cuda", module=module)
    refused(result, tmp_path, f"error: {option}='cuda' is not available on this machine; choose one of auto, cpu")


def test_a_context_longer_than_the_model_is_refused(tmp_path):
    result = run_here(tmp_path, "task.context_lengths=[100000]")
    refused(result, tmp_path, "context_lengths")
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "8192" in line and "positions" in line


def test_a_run_that_would_not_fit_in_memory_is_refused(tmp_path):
    """One padded batch of 2K-token prompts sized to need about 1.5x this machine's memory (at
    least 50 kB per prompt token in SmolLM2's pass; the planner measures ~130 kB)."""
    from framework.planning.planner import device_memory

    batch = int(1.5 * device_memory(torch.device("cpu")) / (2048 * 50e3)) + 1
    result = run_here(tmp_path, f"batch_size={batch}", "task.context_lengths=[2048]", "task.depths=[0.5]",
                 f"task.samples_per_cell={batch}")
    refused(result, tmp_path, "error: the estimated peak memory, ")
    assert "GiB of cpu: lower batch_size or the longest context length" in result.stderr


def test_a_plugin_name_taken_twice_is_refused(tmp_path):
    site = make_distribution(tmp_path, "impostor-plugin", "impostor", IMPOSTOR, {"impostor": "impostor"})
    refused(run(tmp_path, "+detector=attn_mass", env=environment(pythonpath=site)), tmp_path,
            "is refused: the name is already taken by")


# ---------------------------------------------------------------- the tracking store

def test_a_tracking_server_that_does_not_answer_fails_at_once(tmp_path):
    """On a fresh machine too: the server is asked before the model is dequantised or calibrated,
    so nothing is written to the (empty) model cache."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cache = tmp_path / "empty-cache"
    result = run_here(tmp_path, env={**environment(tracking_uri=uri), "RETRIEVAL_HEADS_CACHE": str(cache)})
    refused(result, tmp_path, f"error: the tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: ")
    assert "Connection refused" in result.stderr and "unset MLFLOW_TRACKING_URI" in result.stderr
    assert not cache.exists()


@pytest.mark.parametrize("store", ["mlruns is a file", "sqlite:////proc/no-store-here/mlflow.db"])
def test_an_unwritable_local_store_fails_at_once(tmp_path, store):
    if store == "mlruns is a file":
        (tmp_path / "mlruns").write_text("")
        uri, env = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", environment()
    else:
        uri, env = store, environment(tracking_uri=store)
    result = run_here(tmp_path, env=env)
    refused(result, tmp_path, f"error: the tracking store {uri} cannot be written (")
    assert "set MLFLOW_TRACKING_URI to a writable store" in result.stderr


def test_underpowered_claim_runs_are_planned_with_a_note(tmp_path):
    """A dry run of a design that cannot reach its verdict prints the plan, its power and why."""
    result = run_here(tmp_path, "dry_run=true", "+experiment=claim4_lowfreq_dose", "task.context_lengths=[256]",
                      "task.depths=[0.2,0.5,0.8]", "task.samples_per_cell=1", "dose.values=[0.03125,0.125,0.25]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("design: treatment below its control at the seed's dose (exact McNemar on 3 pairs, Holm over 3): smallest "
            "reachable p 0.75; power 0.00") in result.stdout
    assert "note: claim 'lowfreq_dose' cannot reach its verdict" in result.stdout
    assert "7 evaluation samples would make it reachable" in result.stdout
    assert not (tmp_path / "mlruns").exists()


def test_a_detection_that_kept_no_trial_names_its_cause_and_remedies():
    from framework.interfaces import HeadScores
    from plugins.detectors.retrieval_score import RetrievalScore

    none_kept = HeadScores("retrieval_score", np.zeros((2, 3)), [], {"trials": 2, "kept_trials": 0, "recall": [0.44, 0.2]})
    message = RetrievalScore(min_recall=0.5).why_no_heads(none_kept)
    assert message.startswith("no trial retrieved the needle: 0 of 2 detection trials reached min_recall=0.5 (the best "
                              "trial's recall was 0.44), so every score is 0")
    assert all(remedy in message for remedy in ("task.detect_samples_per_cell", "detector.min_recall", "shorter contexts"))
    low = HeadScores("retrieval_score", np.full((2, 3), 0.05), [], {"trials": 2, "kept_trials": 1, "recall": [1.0, 0.2]})
    assert RetrievalScore().why_no_heads(low) == "max score 0.050; lower its threshold or set top_k (1 of 2 trials kept)"


@pytest.mark.e2e
def test_a_server_that_goes_away_mid_run_loses_nothing(tmp_path, embedded_model):
    server = TrackingServer(tmp_path / "server")
    server.start()
    work = tmp_path / "work"
    work.mkdir()
    try:  # the server stops once the run is under way, and is back only after the run has ended
        code, output = run_watching(work, *TOP5, "+intervention=head_mask", *TINY_GRID, after=["step 2/4: detection"],
                                    action=lambda _: server.stop(), env=environment(tracking_uri=server.url))
        assert code == 1, output[-3000:]
        [folder] = (work / "mlruns" / "pending").iterdir()
        assert f"error: the tracking server {server.url} did not take the run's results" in output
        assert (f"they are kept in {folder}: upload them with `python -m framework.tracking.upload {folder}` "
                "once the server is back") in output
        assert "Traceback" not in output

        still_down = run_here(work, str(folder), module="framework.tracking.upload")
        assert still_down.returncode == 1 and folder.is_dir()
        assert f"error: {folder}: " in still_down.stderr and "the folder is kept" in still_down.stderr

        server.start()
        client = MlflowClient(server.url)
        [waiting] = all_runs(client)
        assert waiting.info.run_id == folder.name and waiting.info.status == "RUNNING"  # until its results arrive
        uploaded = run_here(work, str(folder), module="framework.tracking.upload")
        assert uploaded.returncode == 0, uploaded.stderr[-3000:]
        assert not folder.exists()
        [done] = all_runs(client)
        assert final_states(client) == ["FINISHED"] and done.info.run_id == folder.name
        assert done.data.params["intervention.name"] == "head_mask" and done.data.tags["model.family"] == "llama"
        for condition in ("baseline", "treatment", "control"):
            assert 0 <= done.data.metrics[f"recall/{condition}"] <= 1
        assert done.data.metrics["heads/selected"] == 5
        assert sample_conditions(client, done.info.run_id, tmp_path / "samples") == {"baseline", "treatment", "control"}
        assert (server.artifacts / done.info.experiment_id / done.info.run_id / "artifacts" / "config.yaml").is_file()
    finally:
        server.stop()


# ---------------------------------------------------------------- runs stopped from outside

@pytest.mark.e2e
@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_stopped_run_ends_killed_keeping_what_it_logged(tmp_path, embedded_model, sig, code, line):
    status, output = run_until_signalled(tmp_path, *TOP5, "+intervention=head_mask", *TINY_GRID,
                                         after=["step 3/4: treatment"], sig=sig)
    assert status == code, output[-3000:]
    assert f"{line}: the run is marked KILLED in MLflow and keeps what it logged so far" in output
    assert "Traceback" not in output
    client = local_store(tmp_path)
    assert final_states(client) == ["KILLED"]
    [killed] = all_runs(client)
    assert "recall/baseline" in killed.data.metrics and killed.data.metrics["heads/selected"] == 5
    assert killed.data.tags["error"].startswith("Terminated: SIGTERM" if sig == signal.SIGTERM else "KeyboardInterrupt")
    assert sample_conditions(client, killed.info.run_id, tmp_path / "samples") == {"baseline"}


@pytest.mark.e2e
def test_a_sweep_stopped_by_sigterm_says_what_did_not_finish_and_resumes(tmp_path, embedded_model):
    sweep = ["--multirun", "seed=0,2,3", *TINY_GRID]
    code, output = run_until_signalled(tmp_path, *sweep, after=["sweep job 2/3", "step 1/1: baseline"],
                                       sig=signal.SIGTERM)
    assert code == 143, output[-3000:]
    assert "did not finish: job 2 (seed=2), 3 (seed=3); run the same command again to resume the sweep" in output
    client = local_store(tmp_path)
    parent, children = sweep_runs(client)
    assert parent.info.status == "KILLED" and sorted(final_states(client)) == ["FINISHED", "KILLED", "KILLED"]
    rows = summary(client, parent, tmp_path / "first")
    assert [(r["name"], r["outcome"]) for r in rows] == [
        ("seed=0", "finished"), ("seed=2", "killed"), ("seed=3", "not started")]

    result = run_here(tmp_path, *sweep)  # after a preemption, the same command resumes the sweep
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep job 1/3 (seed=0): skipped, it finished before" in result.stdout + result.stderr
    resumed, children = sweep_runs(client)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert sorted(final_states(client)) == ["FINISHED", "FINISHED", "FINISHED", "FINISHED", "KILLED"]
    assert [r["outcome"] for r in summary(client, resumed, tmp_path / "second")] == ["skipped", "finished", "finished"]


def test_a_training_study_stopped_by_sigterm_ends_killed(tmp_path):
    from test_rope_vs_nope import TINY_COMMAND

    code, output = run_until_signalled(tmp_path, *TINY_COMMAND, "train.steps=400", after=["training the rope model"],
                                       sig=signal.SIGTERM, module="framework.studies.rope_vs_nope")
    assert code == 143, output[-3000:]
    assert "terminated (SIGTERM): the run is marked KILLED" in output and "Traceback" not in output
    client = local_store(tmp_path)
    [killed] = client.search_runs([client.get_experiment_by_name("rope-vs-nope").experiment_id])
    assert killed.info.status == "KILLED" and killed.data.params["seed"] == "0"


# ---------------------------------------------------------------- faults inside a run

@pytest.mark.e2e
def test_a_plugin_that_raises_fails_its_run_keeping_what_came_before(tmp_path, embedded_model):
    site = make_distribution(tmp_path, "exploding-plugin", "exploding", EXPLODING, {"exploding": "exploding"})
    (tmp_path / "conf" / "detector").mkdir(parents=True)
    (tmp_path / "conf" / "detector" / "exploding.yaml").write_text("name: exploding\n")
    result = run(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+detector=exploding", *TINY_GRID,
                 env=environment(pythonpath=site))
    assert result.returncode == 1
    assert "error: run failed in plugin exploding (exploding-plugin 0.1): RuntimeError: the detector broke" in result.stderr
    client = local_store(tmp_path)
    assert final_states(client) == ["FAILED"]
    assert "recall/baseline" in all_runs(client)[0].data.metrics


@pytest.mark.e2e
def test_concurrent_runs_share_one_store(tmp_path, embedded_model):
    processes = [subprocess.Popen(command(*TINY_GRID, f"seed={seed}"), cwd=tmp_path, env=environment(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 2)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    client = local_store(tmp_path)
    assert final_states(client) == ["FINISHED", "FINISHED"]
    assert sorted(r.data.params["seed"] for r in all_runs(client)) == ["0", "2"]




# ---------------------------------------------------------------- the model cache

def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)


@pytest.fixture
def tiny_cache(tmp_path) -> Path:
    """A cache folder holding a tiny random Llama as the entry ``tiny`` (what a first run leaves)."""
    from transformers import AutoTokenizer

    entry = tmp_path / "cache" / "tiny"
    tiny_llama().model.save_pretrained(entry)
    AutoTokenizer.from_pretrained(cache_root() / "smollm2_135m").save_pretrained(entry)
    return entry


def test_the_cache_check_tells_a_complete_entry_from_a_damaged_one(tiny_cache):
    assert cache_problem(tiny_cache) is None
    weights = tiny_cache / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    truncate(weights, weights.stat().st_size - 1)  # one byte short: transformers would fail on it
    assert cache_problem(tiny_cache) == (f"model.safetensors has {weights.stat().st_size} bytes where its header "
                                         f"describes {weights.stat().st_size + 1}")
    truncate(weights, header - 1)
    assert cache_problem(tiny_cache) == f"model.safetensors is truncated ({header - 1} bytes)"
    (tiny_cache / "config.json").unlink()
    assert cache_problem(tiny_cache) == "config.json missing"


def test_a_damaged_entry_that_cannot_be_rebuilt_names_the_folder_to_remove(tmp_path, tiny_cache):
    truncate(tiny_cache / "model.safetensors", 1000)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "tiny.yaml").write_text("name: tiny\ngguf_package: no_such_package\ngguf_file: tiny.gguf\n")
    env = {**environment(), "RETRIEVAL_HEADS_CACHE": str(tiny_cache.parent)}
    result = run_here(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=tiny", env=env)
    refused(result, tmp_path, f"error: the cached copy of model 'tiny' in {tiny_cache} is damaged "
                              "(model.safetensors is truncated (1000 bytes)) and cannot be rebuilt here: ")
    assert f"remove the folder {tiny_cache}" in result.stderr


@pytest.mark.e2e
def test_a_damaged_entry_is_rebuilt_before_the_run(tmp_path, embedded_model):
    # a copy of the embedded model's entry with its weights cut short, as a full disk leaves it
    entry = tmp_path / "cache" / "smollm2_135m"
    entry.mkdir(parents=True)
    for file in (cache_root() / "smollm2_135m").iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, entry)
    with (cache_root() / "smollm2_135m" / "model.safetensors").open("rb") as whole:
        (entry / "model.safetensors").write_bytes(whole.read(1 << 20))
    # the planner's calibration is not under test: copied where there is one, so the run does not
    # measure it again
    if (cache_root() / "cost").is_dir():
        shutil.copytree(cache_root() / "cost", entry.parent / "cost")
    env = {**environment(), "RETRIEVAL_HEADS_CACHE": str(entry.parent)}
    result = run_here(tmp_path, *TINY_GRID, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = result.stdout + result.stderr
    whole = (cache_root() / "smollm2_135m" / "model.safetensors").stat().st_size
    assert (f"the cached copy of model 'smollm2_135m' in {entry} is damaged (model.safetensors has {1 << 20} bytes "
            f"where its header describes {whole}); rebuilding it") in logged
    assert cache_problem(entry) is None
    assert final_states(local_store(tmp_path)) == ["FINISHED"]
