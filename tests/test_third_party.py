"""Third-party plugins through the real entry-point group and Hydra's config search path: the
example package under examples/ installed (into a directory of its own, put on PYTHONPATH, so
the test environment is left as it was), and distributions made on the spot that misbehave."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from framework_cli import TINY_GRID, all_runs, environment, local_store, run

# One worker: the example package is installed once for the module
pytestmark = pytest.mark.xdist_group("test_third_party")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "retrieval_heads_example"


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory) -> dict[str, str]:
    """The environment of a process that has the example package installed."""
    root = tmp_path_factory.mktemp("example")
    source, target = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # pip builds in the copy
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return environment(pythonpath=target)


def make_distribution(root: Path, name: str, module: str, code: str, entry_points: dict[str, str]) -> Path:
    """An installed distribution ``name`` 0.1 with one module, on a path of its own: what pip
    leaves behind, so importlib.metadata (and so the framework) finds its entry points."""
    site = root / "site"
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[retrieval_heads]\n" + "".join(f"{ep} = {target}\n" for ep, target in entry_points.items()))
    (site / f"{module}.py").write_text(code)
    return site


def test_the_plugin_list_shows_each_plugin_with_its_distribution_and_options(tmp_path, example_installed):
    result = run(tmp_path, module="framework.list_plugins", env=example_installed)
    assert result.returncode == 0, result.stderr
    assert "wq_lowfreq  from wq_lowfreq (retrieval-heads-example 0.1.0)" in result.stdout
    assert "detector/wq_lowfreq (retrieval-heads-example): detector.n_dims=null detector.top_k=10" in result.stdout
    assert "query_scale  from query_scale (retrieval-heads-example 0.1.0)" in result.stdout
    assert "intervention.factor=0.25" in result.stdout
    assert "attn_mass  from attn_mass (retrieval-heads 0.1.0)" in result.stdout
    assert "config detector/attn_mass (main): detector.threshold=0.5" in result.stdout
    for kind in ("detector:", "intervention:", "task:", "stats:"):
        assert kind in result.stdout


@pytest.mark.e2e
def test_the_example_package_runs_end_to_end(tmp_path, example_installed, embedded_model):
    result = run(tmp_path, "+detector=wq_lowfreq", "+intervention=query_scale", "intervention.factor=0", *TINY_GRID,
                 env=example_installed)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    [finished] = all_runs(client)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["detector"] == "wq_lowfreq" and finished.data.tags["intervention"] == "query_scale"
    assert finished.data.params["detector.top_k"] == "10"  # from the example's own config
    assert finished.data.metrics["heads/selected"] == 10
    artifacts = Path(client.download_artifacts(finished.info.run_id, "", str(tmp_path / "download")))
    assert (artifacts / "detector/wq_lowfreq/heatmap.png").stat().st_size > 0
    edits = json.loads((artifacts / "intervention/edits.json").read_text())
    assert len(edits["treatment"]["query_dims"]) == len(edits["control"]["query_dims"]) == 10
    assert edits["treatment"]["query_dims"] != edits["control"]["query_dims"]


EXPLODING = '''
from framework import hookimpl
from framework.interfaces import Detector

class Exploding(Detector):
    def detect(self, model, samples):
        raise RuntimeError("the detector broke")

@hookimpl
def register_detectors(register):
    register("exploding", Exploding)
'''


@pytest.mark.e2e
def test_a_plugin_that_raises_is_named_and_its_run_marked_failed(tmp_path, embedded_model):
    site = make_distribution(tmp_path, "exploding-plugin", "exploding", EXPLODING, {"exploding": "exploding"})
    conf = tmp_path / "conf" / "detector"
    conf.mkdir(parents=True)
    (conf / "exploding.yaml").write_text("name: exploding\n")
    result = run(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+detector=exploding", *TINY_GRID,
                 env=environment(pythonpath=site))
    assert result.returncode != 0
    expected = "error: run failed in plugin exploding (exploding-plugin 0.1): RuntimeError: the detector broke"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    [failed] = all_runs(local_store(tmp_path))
    assert failed.info.status == "FAILED"
    assert f"run {failed.info.run_id} is marked FAILED" in result.stderr
    assert failed.data.tags["error.plugin"] == "exploding (exploding-plugin 0.1)"
    assert "recall/baseline" in failed.data.metrics  # what ran before the plugin failed is kept


IMPOSTOR = '''
from framework import hookimpl
from plugins.detectors.attn_mass import AttentionMass

@hookimpl
def register_detectors(register):
    register("attn_mass", AttentionMass)
'''


def test_a_taken_name_is_refused_naming_both_sources(tmp_path):
    site = make_distribution(tmp_path, "impostor-plugin", "impostor", IMPOSTOR, {"impostor": "impostor"})
    env = environment(pythonpath=site)
    runs = run(tmp_path, "+detector=attn_mass", env=env), run(tmp_path, module="framework.list_plugins", env=env)
    for result in runs:
        assert result.returncode != 0
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("error: detector 'attn_mass' from ")
        assert "is refused: the name is already taken by" in message
        assert "(impostor-plugin 0.1)" in message and "(retrieval-heads 0.1.0)" in message
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns").exists()  # refused before any run started


ROOT = EXAMPLE.parent.parent


def test_the_example_packages_own_tests_pass_with_it_installed(tmp_path, example_installed):
    """The example's tests (examples/retrieval_heads_example/tests), run as its author runs them."""
    result = subprocess.run([sys.executable, "-m", "pytest", str(EXAMPLE / "tests"), "-q", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=example_installed, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_the_registry_tests_pass_with_third_party_plugins_installed(tmp_path, example_installed):
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_registry.py", "-q", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=example_installed, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]


BROKEN = "import not_installed_dependency  # the plugin's dependency is missing\n"


@pytest.fixture
def broken_installed(tmp_path) -> dict[str, str]:
    site = make_distribution(tmp_path, "broken-plugin", "broken_task", BROKEN, {"broken_task": "broken_task"})
    return environment(pythonpath=site)


def test_a_plugin_whose_import_fails_is_listed_as_broken_and_the_rest_still_listed(tmp_path, broken_installed):
    result = run(tmp_path, module="framework.list_plugins", env=broken_installed)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    broken = result.stdout.split("broken (disabled; every other plugin works):", 1)[1]
    assert ("broken_task (broken-plugin 0.1): ModuleNotFoundError: No module named 'not_installed_dependency'"
            in broken)
    assert "niah  from niah (retrieval-heads 0.1.0)" in result.stdout


@pytest.mark.e2e
def test_a_plugin_whose_import_fails_leaves_the_default_run_working(tmp_path, broken_installed, embedded_model):
    result = run(tmp_path, *TINY_GRID, env=broken_installed)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "plugin broken_task (broken-plugin 0.1) is disabled: its import failed: ModuleNotFoundError" in output
    assert "Traceback" not in output
    [finished] = all_runs(local_store(tmp_path))
    assert finished.info.status == "FINISHED"


def test_a_test_that_does_not_fit_the_tasks_scores_is_refused_before_any_run(tmp_path, example_installed):
    result = run(tmp_path, "task=passage_qa", "stats=[permutation,mcnemar]", env=example_installed)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stats test 'mcnemar' accepts only binary scores, but task 'passage_qa'")
    assert "wilcoxon" in message and "sign_test" in message
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.e2e
def test_the_example_task_and_edit_run_a_fractional_dose_with_tests_for_continuous_scores(
        tmp_path, example_installed, embedded_model):
    result = run(tmp_path, "task=passage_qa", "task.context_lengths=[256]", "task.depths=[0.2,0.8]",
                 "task.samples_per_cell=1", "task.max_new_tokens=12", "+detector=retrieval_score",
                 "detector.threshold=null", "detector.top_k=6", "detector.min_recall=null",
                 "+intervention=output_scale", "dose.param=factor", "dose.values=[0,0.5]", "stats=[auto,sign_test]",
                 env=example_installed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[detection] 2/2 samples" in result.stdout + result.stderr
    client = local_store(tmp_path)
    [finished] = all_runs(client)
    assert finished.info.status == "FINISHED"
    metrics = finished.data.metrics
    for label in ("treatment.factor_0", "control.factor_0", "treatment.factor_0.5", "control.factor_0.5"):
        assert 0.0 <= metrics[f"recall/{label}"] <= 1.0
    for test in ("permutation", "bootstrap", "wilcoxon", "sign_test"):
        assert f"{test}/treatment.factor_0.5_vs_control.factor_0.5/effect_size" in metrics
    assert not any(name.startswith("mcnemar/") for name in metrics)
    assert metrics["detector/retrieval_score/trials"] == 2
    artifacts = Path(client.download_artifacts(finished.info.run_id, "", str(tmp_path / "download")))
    extra = json.loads((artifacts / "detector/retrieval_score/extra.json").read_text())
    assert len(extra["recall"]) == len(extra["outputs"]) == 2
    edits = json.loads((artifacts / "intervention/edits.json").read_text())
    assert set(edits["treatment.factor_0.5"]["output_scale"].values()) == {0.5}
    assert len(edits["control.factor_0.5"]["output_scale"]) == 6
    assert (artifacts / "recall_by_dose.png").stat().st_size > 0
