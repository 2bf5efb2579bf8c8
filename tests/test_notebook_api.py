"""framework.run / load_model / detect / load_run / runs: the command line's runs from Python, in
one process, on the embedded model, against a real MLflow store and real Hydra composition."""

from __future__ import annotations

import signal
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

import framework
from framework.hookspecs import hookimpl
from framework.notebook import CONFIG_DIR, compose
from framework.registry import get_registry
from framework.tracking.runs import config_hash, failed_run_id
from framework_cli import TINY_GRID, environment, serving

DETECTOR = ["+detector=attn_mass", "detector.threshold=null", "detector.top_k=5"]

# One worker: its runs are shared by the tests that read them
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("test_notebook_api")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The runs of this module go to a local store in a folder of their own."""
    folder = tmp_path_factory.mktemp("notebook_api")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        yield MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def loaded():
    return framework.load_model("smollm2_135m")


@pytest.fixture(scope="module")
def two_runs(store, loaded):
    """Two runs in one process that differ only in their intervention, on one loaded model."""
    return {name: framework.run(*DETECTOR, f"+intervention={name}", *TINY_GRID, model=loaded)
            for name in ("head_mask", "zero_lowfreq")}


def test_two_runs_with_different_interventions_both_finish(store, two_runs):
    for name, result in two_runs.items():
        stored = store.get_run(result.run_id)
        assert stored.info.status == result.status == "FINISHED"
        assert stored.data.tags["intervention"] == name and stored.data.tags["detector"] == "attn_mass"
        # two samples under each of baseline, treatment, control; recall is the mean of the rows
        assert len(result.samples) == 2 * 3
        assert list(result.conditions["condition"]) == ["baseline", "treatment", "control"]
        per_condition = result.samples.groupby("condition")["correct"].mean()
        for condition, recall in result.recall.items():
            assert recall == pytest.approx(per_condition[condition])
            assert stored.data.metrics[f"recall/{condition}"] == pytest.approx(recall)
        assert result.head_scores["selected"].sum() == 5 and set(result.head_scores["detector"]) == {"attn_mass"}
        assert {"detector/attn_mass/heatmap.png", "recall_by_depth.png"} <= set(result.figures)
    assert mlflow.active_run() is None
    # the same loaded model, unedited between runs: the baselines generated the same outputs
    baselines = [r.samples.query("condition == 'baseline'")["output"].tolist() for r in two_runs.values()]
    assert baselines[0] == baselines[1]


def test_load_run_returns_the_same_result(two_runs):
    for result in two_runs.values():
        again = framework.load_run(result.run_id)
        assert len(again.samples) == len(result.samples)
        assert again.samples.equals(result.samples)
        assert again.metrics == result.metrics
        assert again.head_scores.equals(result.head_scores)
        assert again.conditions.equals(result.conditions)
        assert again.figures.keys() == result.figures.keys() and again.config == result.config


def test_the_config_is_the_command_lines(store, two_runs):
    """`--cfg job --resolve` prints the config the command line would run; the run's hash is its."""
    overrides = [*DETECTOR, "+intervention=head_mask", *TINY_GRID]
    printed = subprocess.run([sys.executable, "-m", "framework", "--cfg", "job", "--resolve", *overrides],
                             capture_output=True, text=True, env=environment(), timeout=300)
    assert printed.returncode == 0, printed.stderr
    cli_config = yaml.safe_load(printed.stdout)
    assert compose(*overrides) == cli_config
    run = store.get_run(two_runs["head_mask"].run_id)
    assert run.data.tags["config_hash"] == config_hash(cli_config)


def _run_count(store: MlflowClient) -> int:
    return len(store.search_runs([e.experiment_id for e in store.search_experiments()]))


def test_an_unknown_plugin_lists_the_available_ones(store, loaded):
    before = _run_count(store)
    available = get_registry().names("detector")
    with pytest.raises(framework.ConfigError) as composed:
        framework.run("+detector=no_such_detector", model=loaded)
    with pytest.raises(framework.ConfigError) as named:  # a config node naming a plugin nobody registers
        framework.run(*DETECTOR, "detector.name=no_such_detector", model=loaded)
    for error in (composed, named):
        assert "no_such_detector" in str(error.value) and all(name in str(error.value) for name in available)
    assert _run_count(store) == before  # refused before any run was created


def test_a_model_other_than_the_configs_is_refused(loaded):
    with pytest.raises(framework.ConfigError, match="bfloat16"):
        framework.run(*DETECTOR, "model.dtype=bfloat16", model=loaded)


def test_detect_scores_every_head_on_the_runs_detection_samples(loaded, two_runs):
    found = framework.detect(loaded, "attn_mass", "detector.threshold=null", "detector.top_k=5", *TINY_GRID)
    assert found.scores.shape == (loaded.info.n_layers, loaded.info.n_heads)
    top = {divmod(int(i), loaded.info.n_heads) for i in np.argsort(found.scores, axis=None)[-5:]}
    assert set(found.selected) == top
    assert len(found.table) == found.scores.size and found.table["selected"].sum() == 5
    # a run with the same detector on the same overrides detected on the same samples
    logged = two_runs["head_mask"].head_scores
    np.testing.assert_allclose(found.scores.ravel(), logged["score"].to_numpy(), rtol=1e-5, atol=1e-7)


def test_runs_lists_both_runs_with_their_parameters_and_metrics(two_runs):
    table = framework.runs(filter_string="tags.detector = 'attn_mass'")
    rows = table.set_index("run_id").loc[[r.run_id for r in two_runs.values()]]
    assert list(rows["intervention"]) == ["head_mask", "zero_lowfreq"] and set(rows["status"]) == {"FINISHED"}
    for run_id, result in zip(rows.index, two_runs.values()):
        assert rows.loc[run_id, "recall/treatment"] == pytest.approx(result.metrics["recall/treatment"])
    assert "intervention.name" in table and table["seed"].dtype.kind == "i"
    only = framework.runs(filter_string="tags.intervention = 'head_mask'")
    assert two_runs["head_mask"].run_id in set(only["run_id"]) and two_runs["zero_lowfreq"].run_id not in set(only["run_id"])


class _Interrupt:
    """Ctrl-C (the notebook's stop button) once the run is open and its model in place."""

    @hookimpl
    def run_started(self, context):
        signal.raise_signal(signal.SIGINT)


def test_an_interrupted_run_is_killed_in_process(store, loaded):
    manager = get_registry().manager
    manager.register(_Interrupt(), name="test-interrupt")
    # Python's Ctrl-C handler, as in a notebook: a suite started in the background (`pytest &`)
    # inherits SIGINT ignored from its shell, and the raised signal would then do nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            framework.run(*DETECTOR, *TINY_GRID, model=loaded)
    finally:
        signal.signal(signal.SIGINT, previous)
        manager.unregister(name="test-interrupt")
    run_id = failed_run_id(interrupted.value)
    assert store.get_run(run_id).info.status == "KILLED" and mlflow.active_run() is None
    assert framework.load_run(run_id).status == "KILLED"


def test_compose_keeps_the_callers_hydra():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert compose("seed=3")["seed"] == 3 and compose()["seed"] == 0
        assert GlobalHydra.instance().is_initialized()
    assert not GlobalHydra.instance().is_initialized()


def test_load_run_reads_a_run_back_from_a_tracking_server(tmp_path, loaded, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the run keeps its results until they are uploaded
    with serving(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        result = framework.run(*TINY_GRID, model=loaded)  # a baseline-only run: the cheapest there is
        again = framework.load_run(result.run_id)
        assert MlflowClient(server.url).get_run(result.run_id).info.status == again.status == "FINISHED"
        assert len(again.samples) == len(result.samples) == 2 and again.metrics == result.metrics
        assert list(framework.runs()["run_id"]) == [result.run_id]
