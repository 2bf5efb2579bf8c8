"""benchmarks/gpu_check.py on CPU (``--tiny``): the GPU check's code paths run on every test run, so
the script cannot rot before a GPU is lent. Its JSON is checked for content, never for speed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One worker: one tiny run of the script is shared by the tests that read it
pytestmark = pytest.mark.xdist_group("test_gpu_check")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
FAMILIES = {"llama31_8b", "qwen25_7b", "gemma2_9b"}


def _check(tmp: Path, *args: str) -> tuple[dict, str]:
    out = tmp / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, str]:
    return _check(tmp_path_factory.mktemp("gpu_check"))


def _cases(report: dict, kind: str) -> list[dict]:
    return [case for case in report["cases"] if case["kind"] == kind]


def test_every_case_is_measured_and_lengths_beyond_positions_are_not_run(tiny):
    report, stdout = tiny
    assert report["tiny"] and report["dtype"] == "bfloat16" and report["device"].startswith("cpu")
    assert [c["status"] for c in report["cases"]] == ["measured"] * len(report["cases"])
    assert {c["model"] for c in _cases(report, "exactness")} == {c["model"] for c in _cases(report, "prefill")} == FAMILIES
    lengths = {name: [c["tokens"] for c in _cases(report, "prefill") if c["model"] == name] for name in FAMILIES}
    # 8K, 32K and 128K divided by 128, each within the positions less the 12 generated tokens:
    # Llama-3.1 has 1024 positions here, Qwen2.5 256, Gemma-2 64
    assert lengths == {"llama31_8b": [64, 256, 1012], "qwen25_7b": [64, 244], "gemma2_9b": [52]}
    assert [(b["model"], b["tokens"]) for b in report["beyond_positions"]] == [("gemma2_9b", 256)]
    assert "not run, beyond gemma2_9b's 64 positions: 256 tokens" in stdout
    # most informative first: exactness, then every model's shortest length, then the end-to-end run
    kinds = [c["kind"] for c in report["cases"]]
    assert kinds[:3] == ["exactness"] * 3 and kinds[3:7] == ["prefill"] * 3 + ["end_to_end"]


def test_memory_predictions_and_time_ratios_are_finite(tiny):
    report, _ = tiny
    for case in _cases(report, "prefill"):
        predicted = case["predicted_peak_gib"]
        assert predicted["capture"] >= predicted["plain"] > 0  # the capture adds to the attention phase, if that is the peak
        for numbers in (case["peak_gib"], case["memory_ratio"], case["seconds"], case["time_ratio"]):
            assert numbers and all(math.isfinite(v) and v > 0 for v in numbers.values()), case
        assert case["memory_ratio"]["plain"] == pytest.approx(case["peak_gib"]["plain"] / predicted["plain"])
        assert math.isfinite(case["decode_step_s"]) and case["decode_step_s"] > 0
        assert case["attention"] == ("manual (soft-capping)" if case["model"] == "gemma2_9b" else "sdpa")


def test_exactness_numbers_are_small(tiny):
    report, _ = tiny
    for case in _cases(report, "exactness"):
        scale = case["logit_scale"]
        assert all(case["exact"].values()), case
        # the edit changes the logits far more than bfloat16 rounding does
        assert case["edited_bf16_vs_fp32"] < 0.05 * scale < case["edit_effect_fp32"]
        # a masked head equals the hand-zeroed eager model: to float32 precision, and in bfloat16 to its rounding
        assert case["fp32"]["masked_vs_eager"] < 1e-5 * scale + 1e-6
        assert case["bf16"]["masked_vs_eager"] < 0.05 * scale < case["bf16"]["mask_effect"]


def test_end_to_end_run_finished_and_logged_its_ratios(tiny):
    report, stdout = tiny
    (run,) = _cases(report, "end_to_end")
    assert run["status"] == "measured" and run["run_status"] == "FINISHED" and run["returncode"] == 0
    assert run["device"] == "cpu" and run["dtype"] == "float32"  # model.device / model.dtype auto on a CPU machine
    for name in ("estimate/time_ratio", "estimate/memory_ratio", "cost/wall_time_s"):
        assert math.isfinite(run["metrics"][name]) and run["metrics"][name] > 0
    assert run["wall_s"] >= run["metrics"]["cost/wall_time_s"]
    # one printed table with a row per case
    assert sum(line.split(" | ")[0].strip() in {c["case"] for c in report["cases"]} for line in stdout.splitlines()) \
        == len(report["cases"])


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module, for its parts (loaded as test_memory_model loads the memory model)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_spent_budget_skips_every_case_and_still_writes_the_results(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    gpu_check.check(gpu_check.Setup(torch.device("cpu"), tiny=True), gpu_check.Budget(0), out)
    statuses = [c["status"] for c in json.loads(out.read_text())["cases"]]
    assert statuses == ["skipped: budget"] * (3 + 6 + 1)  # exactness per model, lengths within positions, end to end
    assert "skipped: budget" in capsys.readouterr().out


def test_out_of_memory_marks_the_case_with_its_predicted_peak(gpu_check, monkeypatch):
    setup = gpu_check.Setup(torch.device("cpu"), tiny=True)
    configs = gpu_check.model_configs(setup)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_check, "measure_prefill", out_of_memory)
    case = gpu_check.Case("prefill", "llama31_8b", 256)
    gpu_check.run_case(setup, case, configs, gpu_check.Budget(60))
    assert case.status == "oom"
    expected = gpu_check.predicted_peaks(setup, configs["llama31_8b"], 256)
    assert case.result["predicted_peak_gib"] == {mode: b / gpu_check.GIB for mode, b in expected.items()}
