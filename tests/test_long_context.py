"""Long context: the planner's cost model and refusals, bring-your-own haystack and needles,
detection across lengths and the length x depth heatmap (end to end on the embedded model)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from framework_cli import run_here
from mlflow.tracking import MlflowClient

from framework.interfaces import ConfigError, Sample
from framework.planning import planner
from plugins.tasks.niah import NIAH
from plugins.tasks.passkey import Passkey

NEEDLE = {"needle": "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
          "question": "What is the best thing to do in San Francisco?",
          "real_needle": "eat a sandwich and sit in Dolores Park on a sunny day"}


def _calibration(**coefficients) -> planner.Calibration:
    return planner.Calibration(model="m", device="cpu", dtype="float32", threads=1, load_seconds=1.0,
                               weights_bytes=100, load_peak_bytes=150, points=[], **coefficients)


def _priced_points(truth: dict, shapes, sliding: bool) -> list[dict]:
    points = []
    for batch, length in shapes:
        masked = sliding or batch > 1
        points.append({"batch": batch, "length": length, "masked": float(masked),
                       "prefill_seconds": float(np.dot(truth["prefill"], planner._prefill_features(batch, length, masked))),
                       "decode_step_seconds": float(np.dot(truth["decode"], planner._decode_features(batch, length))),
                       "peak_bytes": float(np.dot(truth["memory"], planner._memory_features(batch, length, masked)))})
    return points


def test_cost_fit_recovers_known_coefficients():
    # no pass long enough for a rule mask: those are priced like dense masks (the 5th coefficient)
    truth = {"prefill": [0.1, 2e-3, 1e-6, 3e-6, 3e-6], "decode": [0.02, 0.01, 1e-5], "memory": [5e6, 8e4, 5.0]}
    fitted = planner.fit_costs(_priced_points(truth, planner.CALIBRATION_POINTS, sliding=False), mask_bytes=5.0)
    for key, expected in truth.items():
        np.testing.assert_allclose(fitted[key], expected, rtol=1e-6, atol=1e-12)


def test_a_sliding_models_long_passes_are_priced_as_rule_masks():
    # a sliding-window model: every pass masked; beyond masks.DENSE_LIMIT the mask is a rule, read
    # in chunks: its own quadratic coefficient (a window costs less) and no mask in memory
    truth = {"prefill": [0.1, 2e-3, 0.0, 3e-6, 5e-7], "decode": [0.02, 0.01, 1e-5], "memory": [5e6, 8e4, 5.0]}
    shapes = [*planner.CALIBRATION_POINTS, (1, 4096), (1, 8192)]
    assert [planner._ruled(n, True) for _, n in shapes] == [False] * 5 + [True, True]
    fitted = planner.fit_costs(_priced_points(truth, shapes, sliding=True), mask_bytes=5.0)
    for key, expected in truth.items():
        np.testing.assert_allclose(fitted[key], expected, rtol=1e-6, atol=1e-12)
    assert planner._memory_features(1, 8192, True)[2] == 0.0 and planner._memory_features(1, 2048, True)[2] == 2048**2


def test_generation_is_priced_per_batch_of_similar_length():
    cal = _calibration(prefill=[1.0, 0.01, 0.0, 0.001, 0.0001], decode=[0.5, 0.0, 0.0], memory=[0.0, 10.0, 1.0])
    samples = [Sample(str(i), [0] * n, "", [], (0, 1), 1, (0, 1)) for i, n in enumerate([100, 100, 100, 200, 1000])]
    step = planner._generation("baseline", samples, batch_size=2, new_tokens=5, sliding=False, cal=cal)
    # by hand: batches [100, 100], [100] ([100, 200] pads too much), [200], [1000]; none padded
    assert step.passes == 4 and step.tokens == 1500 and step.decode_steps == 4 * 4
    assert step.seconds == pytest.approx(4 * 1.0 + 0.01 * 1500 + 16 * 0.5)
    assert step.transient_bytes == pytest.approx(10.0 * 1000)
    # sliding-window attention always has a mask: the masked quadratic term applies
    step = planner._generation("sliding", samples[:2], batch_size=2, new_tokens=1, sliding=True, cal=cal)
    assert step.passes == 1 and step.seconds == pytest.approx(1 + 0.01 * 200 + 0.001 * 2 * 100**2)
    assert step.transient_bytes == pytest.approx(10.0 * 200 + 1.0 * 2 * 100**2)
    # a long sliding pass keeps its mask as a rule: the rule mask's coefficient, no mask held
    long = [Sample("long", [0] * 3000, "", [], (0, 1), 1, (0, 1))]
    step = planner._generation("sliding", long, batch_size=1, new_tokens=1, sliding=True, cal=cal)
    assert step.seconds == pytest.approx(1 + 0.01 * 3000 + 0.0001 * 3000**2)
    assert step.transient_bytes == pytest.approx(10.0 * 3000)


def test_bookkeeping_is_priced_from_the_runs_that_finished():
    assert planner.price_bookkeeping([], 5) is None  # nothing learned yet: not priced (the plan says so)
    same = [{"steps": 3, "seconds": 10.0}, {"steps": 3, "seconds": 14.0}]
    assert planner.price_bookkeeping(same, 7) == pytest.approx(12.0)  # one shape seen: its mean
    b0, b1 = 6.0, 0.5  # planted: 6 s per run and 0.5 s per step
    runs = [{"steps": n, "seconds": b0 + b1 * n} for n in (2, 3, 22, 9)]
    assert planner.price_bookkeeping(runs, 40) == pytest.approx(b0 + b1 * 40)


def _record_runs(cache: str, worker: int, start, count: int) -> None:
    os.environ["RETRIEVAL_HEADS_CACHE"] = cache
    start.wait()  # every process writes at once, as a sweep's parallel jobs ending together do
    for i in range(count):
        planner._record_bookkeeping(torch.device("cpu"), {"steps": worker, "seconds": float(i), "model": "m"})


def test_runs_that_finish_at_once_each_keep_their_bookkeeping(tmp_path):
    workers, each = 4, 5  # 20 records: all fit in the history
    assert workers * each <= planner.BOOKKEEPING_HISTORY
    context = multiprocessing.get_context("fork")
    start = context.Barrier(workers)
    processes = [context.Process(target=_record_runs, args=(str(tmp_path), w, start, each)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    runs = json.loads((tmp_path / "cost" / "bookkeeping-cpu.json").read_text())["runs"]
    assert sorted((r["steps"], r["seconds"]) for r in runs) == [(w, float(i)) for w in range(workers) for i in range(each)]


def test_long_runs_extend_the_calibration_to_their_length():
    assert planner._long_shapes(2048, 3000, 8180) == []  # within 1.5x the calibrated length
    assert planner._long_shapes(2048, 4100, 8180) == [(1, 4100)]
    assert planner._long_shapes(4100, 8000, 8180) == [(1, 8000)]  # the next, longer run
    assert planner._long_shapes(2048, 8000, 8180) == [(1, 4096), (1, 8000)]
    assert planner._long_shapes(2048, 32000, 32756) == [(1, 4096), (1, 8192), (1, planner.LONG_CALIBRATION_CAP)]
    assert planner._long_shapes(2048, 9000, 5000) == [(1, 5000)]  # never beyond the model's room


def test_context_lengths_beyond_the_positions_are_refused():
    model_cfg = SimpleNamespace(max_position_embeddings=8192)
    config = {"model": {"name": "smollm2_135m"}, "task": {"context_lengths": [1024, 100000], "max_new_tokens": 12}}
    with pytest.raises(ConfigError, match=r"context_lengths.*\[100000\].*8192 positions.*at most 8180"):
        planner.check_context_lengths(config, model_cfg)
    with pytest.raises(ConfigError, match=r"detect_lengths.*8192 positions"):
        planner.check_context_lengths({**config, "task": {"context_lengths": [512], "max_new_tokens": 12}, "detect_lengths": [8190]}, model_cfg)
    assert planner.check_context_lengths({**config, "task": {"context_lengths": [8180], "max_new_tokens": 12}}, model_cfg) == 8180


# --- bring your own haystack and needles ----------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return embedded_model.tokenizer


@pytest.fixture
def texts(tmp_path) -> Path:
    (tmp_path / "b.txt").write_text(" ".join(f"Orchards {i}." for i in range(200)))
    (tmp_path / "a.txt").write_text("\n".join(f"Rivers {i}!" for i in range(200)))
    (tmp_path / "needles.jsonl").write_text(json.dumps(NEEDLE) + "\n\n")
    return tmp_path


def test_text_haystack_is_read_in_order_and_holds_the_needle(tokenizer, texts):
    task = NIAH(context_lengths=[300], depths=[0.0, 0.5, 1.0], samples_per_cell=1, haystack=str(texts))
    for sample in task.build_samples(tokenizer, "eval", seed=3):
        assert len(sample.input_ids) == 300
        text = tokenizer.decode(sample.input_ids[: sample.query_start])
        order = [int(n) + (200 if word == "Orchards" else 0) for word, n in re.findall(r"(Rivers|Orchards) (\d+)[.!]", text)]
        assert len(order) > 20 and all(b == (a + 1) % 400 for a, b in zip(order, order[1:]))  # a.txt, then b.txt
        assert sample.answer in tokenizer.decode(sample.input_ids[slice(*sample.needle_span)])
        assert "magic number" in text  # the built-in needle in the user's haystack
    single = NIAH(context_lengths=[300], depths=[0.5], samples_per_cell=1, haystack=str(texts / "a.txt"))
    assert "Orchards" not in tokenizer.decode(single.build_samples(tokenizer, "eval", 0)[0].input_ids)
    assert Passkey(context_lengths=[300], depths=[0.5], haystack=str(texts)).build_samples(tokenizer, "eval", 0)


def test_sentence_needles_are_scored_by_stemmed_rouge1_recall(tokenizer, texts):
    task = NIAH(context_lengths=[300], depths=[0.5], samples_per_cell=2, haystack=str(texts),
                needles=str(texts / "needles.jsonl"))
    assert task.score_kind == "continuous"
    samples = task.build_samples(tokenizer, "eval", seed=0)
    for sample in samples:
        assert sample.answer == NEEDLE["real_needle"] and sample.answer_span is None  # copies count on the needle span
        assert tokenizer.decode(sample.input_ids[slice(*sample.needle_span)]).strip() == NEEDLE["needle"]
        assert NEEDLE["question"] in tokenizer.decode(sample.input_ids[sample.query_start:])
    # 12 reference words; "Eating" stems to eat: eat, a, sandwich, in, dolores, park = 6 of 12
    assert task.score(samples[0], "Eating a sandwich in Dolores Park") == pytest.approx(0.5)
    assert task.score(samples[0], NEEDLE["real_needle"].upper()) == 1.0
    assert task.score(samples[0], "no idea") == 0.0


@pytest.mark.parametrize("make, message", [
    (lambda p: NIAH(haystack=str(p / "missing")), "task.haystack=.*neither"),
    (lambda p: NIAH(haystack=str(p / "empty")), "folder without .txt"),
    (lambda p: NIAH(needles=str(p / "bad.jsonl")), r"line 2: needs the text field\(s\) real_needle"),
    (lambda p: NIAH(needles=str(p / "missing.jsonl")), "task.needles=.*not a file"),
    (lambda p: Passkey(needles=str(p / "bad.jsonl")), "belong to task=niah"),
])
def test_bad_haystack_and_needle_files_are_config_errors(tmp_path, make, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps(NEEDLE) + "\n" + json.dumps({"needle": "x", "question": "y"}) + "\n")
    with pytest.raises(ConfigError, match=message):
        make(tmp_path)


# --- end to end ---------------------------------------------------------------------------------
def _cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_here(cwd, *overrides)


def _runs(cwd: Path) -> list:
    db = cwd / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.e2e
def test_dry_run_prints_the_plan_and_creates_no_run(tmp_path):
    result = _cli(tmp_path, "dry_run=true", "+detector=attn_mass", "+intervention=head_mask", "controls=2",
                  "task.context_lengths=[256,512]", "task.depths=[0.5]", "task.samples_per_cell=3")
    assert result.returncode == 0, result.stderr
    assert "5 conditions (baseline included) on 6 evaluation samples" in result.stdout
    assert "estimated wall time" in result.stdout and "peak memory" in result.stdout
    assert _runs(tmp_path) == []


@pytest.mark.e2e
def test_a_dry_run_sweep_prints_every_plan_and_creates_no_run(tmp_path):
    result = _cli(tmp_path, "--multirun", "dry_run=true", "+detector=attn_mass", "task.context_lengths=[256],[512]",
                  "task.depths=[0.5]", "task.samples_per_cell=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("estimated wall time") == 2
    baseline_tokens = re.findall(r"^  baseline +2 +1 +(\d+) ", result.stdout, re.MULTILINE)
    assert baseline_tokens == ["512", "1024"]  # one batch of 2 samples at each length
    assert _runs(tmp_path) == []  # no parent run either


@pytest.mark.e2e
def test_context_length_beyond_the_positions_is_refused_before_a_run(tmp_path):
    result = _cli(tmp_path, "task.context_lengths=[100000]")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in ("context_lengths", "8192", "positions"))
    assert _runs(tmp_path) == []


@pytest.mark.e2e
def test_long_context_run_with_own_texts_lengths_and_heatmap(tmp_path, texts):
    result = _cli(tmp_path, f"task.haystack={texts}", f"task.needles={texts / 'needles.jsonl'}",
                  "task.context_lengths=[200,300]", "task.depths=[0.5]", "task.samples_per_cell=2",
                  "task.max_new_tokens=24", "stats=[permutation]",
                  "+detector=retrieval_score", "detector.min_recall=null", "detector.threshold=null", "detector.top_k=3",
                  "+detector@detectors.mass=attn_mass", "detect_lengths=[200,300]", "+intervention=head_mask")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _runs(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recall_by_length_depth.png", "lengths"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "lengths/detection.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    present = [r for r in rows if r.get("selected_fraction") is not None and not np.isnan(r["selected_fraction"])]
    fractions = {(r["detector"], r["length"]): r["selected_fraction"] for r in present}  # per-length rows
    assert fractions[("main", 200)] == pytest.approx(3 / 270)  # top 3 of 270 heads
    assert ("mass", 300) in fractions
    metrics = run.data.metrics
    assert -1.0 <= metrics["lengths/mass/200_vs_300/spearman"] <= 1.0
    assert metrics["lengths/main/200_vs_300/overlap"] in (0, 1, 2, 3)
    assert 0.0 <= metrics["recall/baseline"] <= 1.0  # ROUGE-1 recall, continuous
    assert metrics["estimate/time_ratio"] > 0 and metrics["estimate/memory_ratio"] > 0
    assert float(run.data.params["estimate.seconds"]) > 0 and run.data.params["estimate.conditions"] == "3"
    # its bookkeeping (wall time less model time and loading) is kept to price the next runs
    assert 0 < metrics["actual/bookkeeping_seconds"] < metrics["actual/seconds"] - metrics["cost/model_time_s"] + 1e-6
    records = json.loads((planner.cache_root() / "cost" / "bookkeeping-cpu.json").read_text())["runs"]
    assert {"steps": 1 + 2 + 2 * 2 + 2, "seconds": round(metrics["actual/bookkeeping_seconds"], 2),
            "model": "smollm2_135m"} in records
