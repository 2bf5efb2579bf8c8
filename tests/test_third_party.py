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
