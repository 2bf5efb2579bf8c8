"""A first run on a fresh machine: the dry run plans without weights (from the architecture, or
extrapolating a cached calibration with its uncertainty), calibrations record their load and
resume when interrupted, and a run scales its estimate by a reference pass. Each on a tiny random
model whose folder stands in for a model source, so no test loads real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from framework_cli import environment, run_here

from framework.planning import planner

TINY_SPEC = {"name": "tiny", "device": "cpu", "dtype": "float32"}


@pytest.fixture
def tiny_source(tmp_path) -> dict:
    """A tiny Llama saved as a model folder, with a config ``model=tiny`` naming it as its source."""
    from transformers import AutoTokenizer

    from framework.model.loading import cache_root

    folder = tmp_path / "tiny-model"
    tiny_llama().model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(cache_root() / "smollm2_135m").save_pretrained(folder)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "tiny.yaml").write_text(f"name: tiny\nhub_id: {folder}\ndevice: cpu\ndtype: float32\n")
    return {**TINY_SPEC, "hub_id": str(folder), "conf": tmp_path / "conf"}


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: what a dry run must never do."""
    def refuse(spec):
        raise AssertionError(f"weights of {spec['name']} loaded")

    monkeypatch.setattr(planner, "load_model", refuse)


def _dry_run(cwd: Path, source: dict, cache: Path, *overrides: str):
    env = {**environment(), "RETRIEVAL_HEADS_CACHE": str(cache)}
    return run_here(cwd, f"hydra.searchpath=[file://{source['conf']}]", "model=tiny", "dry_run=true",
                    "task.depths=[0.5]", "task.samples_per_cell=2", *overrides, env=env)


def _points(lengths: list[int], prefill: list[float], reference: float = 0.01) -> list[dict]:
    """Calibration points priced exactly by ``prefill`` coefficients (decode and memory flat)."""
    return [{"batch": 1, "length": n, "masked": 0.0, "prefill_seconds": float(np.dot(prefill, planner._prefill_features(1, n, False))),
             "decode_step_seconds": 0.01, "peak_bytes": 1e6 + 1e3 * n, "reference_seconds": reference,
             "load_average": 0.5, "cores": 2, "threads": 2, "busy": False} for n in lengths]


def test_a_dry_run_without_calibration_prices_from_the_architecture(tmp_path, tiny_source, no_weights):
    cache = tmp_path / "empty-cache"
    result = _dry_run(tmp_path, tiny_source, cache, "task.context_lengths=[400]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: tiny on cpu is not calibrated yet: priced from its architecture" in result.stdout
    assert "python -m framework.planning calibrate model=tiny --up-to 2048" in result.stdout
    assert "estimated wall time" in result.stdout
    assert not cache.exists()  # nothing written: no model folder, no calibration


def test_a_dry_run_extrapolates_a_short_calibration_and_says_how_far_it_may_be_off(tmp_path, tiny_source, no_weights):
    cache = tmp_path / "cache"
    truth = [0.01, 1e-5, 1e-8, 3e-8, 3e-8]
    noisy = _points([32, 64, 96, 128, 160, 192], truth)
    for point, wobble in zip(noisy, [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]):
        point["prefill_seconds"] *= wobble
    cal = planner.Calibration(model="tiny", device="cpu", dtype="float32", threads=torch.get_num_threads(),
                              load_seconds=0.1, weights_bytes=10**6, load_peak_bytes=10**6, prefill=[], decode=[],
                              memory=[], points=[])
    cal.__dict__.update(planner.fit_costs(noisy, 5))
    path = cache / "cost" / f"tiny-cpu-float32-{torch.get_num_threads()}threads-{planner.COST_MODEL}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(cal.__dict__))
    result = _dry_run(tmp_path, tiny_source, cache, "task.context_lengths=[480]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: the calibration reaches 192 tokens, this run's prompts 48" in result.stdout  # 480 + the answer
    line = next(line for line in result.stdout.splitlines() if line.startswith("extrapolated: "))
    assert "across the fits that leave out one calibration point each" in line
    assert sorted(p.name for p in cache.rglob("*")) == ["cost", path.name]  # nothing else written


def test_leave_one_out_refits_bracket_the_extrapolation():
    truth = [0.01, 1e-5, 1e-8, 3e-8, 3e-8]
    points = _points([32, 64, 96, 128, 160, 192], truth)
    for point, wobble in zip(points, [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]):
        point["prefill_seconds"] *= wobble
    cal = planner.Calibration(model="m", device="cpu", dtype="float32", threads=1, load_seconds=0, weights_bytes=0,
                              load_peak_bytes=0, prefill=[], decode=[], memory=[], points=[])
    cal.__dict__.update(planner.fit_costs(points, 5))
    at = planner._prefill_features(1, 2048, False)
    refitted = [float(np.dot(refit.prefill, at)) for refit in planner._refits(cal, 5)]
    assert len(refitted) == len(points) and min(refitted) < max(refitted)  # the fit moves: an honest range
    assert min(refitted) <= float(np.dot(cal.prefill, at)) * 1.0001 and float(np.dot(cal.prefill, at)) <= max(refitted) * 1.0001


def test_points_measured_on_a_slower_machine_are_scaled_by_their_reference_pass():
    truth = [0.05, 2e-4, 1e-7, 3e-7, 3e-7]
    points = _points([256, 512, 1024, 1536, 2048], truth)
    busy = points[2]  # measured while the machine ran at a third of its speed: its reference pass too
    busy["prefill_seconds"] *= 3
    busy["decode_step_seconds"] *= 3
    busy["reference_seconds"] *= 3
    fitted = planner.fit_costs(points, 5)
    np.testing.assert_allclose(fitted["prefill"][:3], truth[:3], rtol=1e-6, atol=1e-12)  # no masked point: c2 masked is 0
    assert fitted["reference_seconds"] == pytest.approx(0.01)


def test_a_busy_machine_is_told_from_its_load_and_cores():
    assert not planner.is_busy({"load_average": 2.2, "cores": 2, "threads": 2})  # this process's own threads
    assert planner.is_busy({"load_average": 6.5, "cores": 2, "threads": 2})  # others keep both cores busy
    load = planner.machine_load()
    assert load["cores"] >= 1 and load["threads"] == torch.get_num_threads()


def test_a_run_on_a_slower_machine_scales_its_estimate(monkeypatch):
    logged = {}
    monkeypatch.setattr(planner.mlflow, "log_params", logged.update)

    def estimate() -> planner.Estimate:
        return planner.Estimate(model="m", device="cpu", dtype="float32", conditions=1, samples=2,
                                steps=[planner.Step("baseline", 2, seconds=10.0), planner.Step("detection", 2, seconds=4.0)],
                                load_seconds=1.0, base_bytes=0, weights_bytes=0, load_peak_bytes=0, bookkeeping_seconds=3.0,
                                reference_seconds=0.2, calibration_load=2.0, watch=planner.Stopwatch(torch.device("cpu")))

    monkeypatch.setattr(planner, "machine_load", lambda: {"load_average": 6.0, "cores": 2, "threads": 2})
    monkeypatch.setattr(planner, "reference_pass", lambda model, device: 0.5)  # the machine runs at 2/5 its speed
    slower = estimate()
    assert planner.rescale(slower, model=None) == pytest.approx(2.5)
    assert [s.seconds for s in slower.steps] == pytest.approx([25.0, 10.0]) and slower.seconds == pytest.approx(39.0)
    assert logged["estimate.machine_factor"] == 2.5 and logged["estimate.scaled_seconds"] == 39.0
    monkeypatch.setattr(planner, "reference_pass", lambda model, device: 0.21)  # within the noise: unchanged
    same = estimate()
    assert planner.rescale(same, model=None) == 1.0 and same.seconds == pytest.approx(18.0)
    # a slow pass while the load average is lower than at calibration: a passing moment, not a slower machine
    monkeypatch.setattr(planner, "machine_load", lambda: {"load_average": 1.0, "cores": 2, "threads": 2})
    monkeypatch.setattr(planner, "reference_pass", lambda model, device: 0.5)
    spike = estimate()
    assert planner.rescale(spike, model=None) == 1.0 and spike.seconds == pytest.approx(18.0)
    monkeypatch.setattr(planner, "reference_pass", lambda model, device: 0.1)  # faster, and the load agrees
    assert planner.rescale(estimate(), model=None) == pytest.approx(0.5)


def test_the_reference_pass_and_the_probe_run_on_random_tensors_and_a_tiny_model():
    probe = planner.machine_probe(torch.device("cpu"), torch.float32)
    assert set(probe) == {"gemm", "sdpa", "sdpa_masked", "gemv", "op"} and all(v > 0 for v in probe.values())
    assert planner.reference_pass(tiny_llama().model, torch.device("cpu")) > 0  # its vocabulary of 256 suffices


def test_an_interrupted_calibration_resumes_where_it_stopped(tmp_path, tiny_source, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    spec = {k: v for k, v in tiny_source.items() if k != "conf"}
    measured: list[list[tuple[int, int]]] = []

    def fake_measure(model, shapes, masked_always, device, keep=None, stop_after=None):
        measured.append(list(shapes))
        for index, (batch, length) in enumerate(shapes):
            if stop_after is not None and index == stop_after:
                raise KeyboardInterrupt
            keep(_points([length], [0.01, 1e-5, 1e-8, 3e-8, 3e-8])[0] | {"batch": batch, "masked": float(batch > 1)})

    monkeypatch.setattr(planner, "_measure_points", lambda *args, **kwargs: fake_measure(*args, **kwargs, stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        planner.calibrate(spec)
    partial = next((tmp_path / "cache" / "cost").glob("*.partial.json"))
    assert len(json.loads(partial.read_text())["points"]) == 2
    monkeypatch.setattr(planner, "_measure_points", fake_measure)
    cal = planner.calibrate(spec)
    assert measured[-1] == list(planner.CALIBRATION_POINTS)[2:]  # only what the first attempt did not measure
    assert sorted(planner._shape(p) for p in cal.points) == sorted(planner.CALIBRATION_POINTS)
    assert not partial.exists() and cal.reference_seconds == pytest.approx(0.01)


def test_the_calibrate_command_refuses_lengths_beyond_the_model(tmp_path):
    result = run_here(tmp_path, "calibrate", "model=smollm2_135m", "--up-to", "100000", module="framework.planning")
    assert result.returncode == 1
    assert "error: --up-to 100000 exceeds the 8192 positions of smollm2_135m; choose at most 8192" in result.stderr
