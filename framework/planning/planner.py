"""Run planner: what a run will process and what it will cost, known before any weights load.

:func:`estimate_run` builds the run's samples with the tokenizer alone, counts the conditions,
forward passes and tokens of every step (baseline, detection, detection across lengths, each
condition), and prices them with a cost model of the model on this device:

* time of a prefill of ``batch`` sequences of ``length`` tokens:
  ``c0 + c1 * batch * length + c2 * batch * length^2`` (``c2`` separately for passes whose
  attention needs an explicit mask: padded batches, sliding-window layers; and separately again
  where that mask is kept as a rule and read in query chunks, beyond
  :data:`framework.model.masks.DENSE_LIMIT` entries, where a sliding-window layer costs only its
  window; until a calibration has measured such a pass it is priced like a dense mask); a decode step:
  ``d0 + d1 * batch + d2 * batch * keys``; generation is priced at ``max_new_tokens`` steps,
  an upper bound (it stops early when every sequence of a batch has ended);
* peak memory: the process before the run + the weights (the config's parameter count x the
  dtype's size, or what loading left resident in the calibration if more: the tokenizer and the
  loader's buffers, 0.29 GiB beyond the weights for Gemma-3-270m on CPU) + the largest pass's
  transient memory ``m0 + m1 * batch * length (+ m2 * batch * length^2 with a dense mask)``
  (activations, KV cache, masks; a rule mask's chunks are O(length)), or the peak of loading,
  whichever is larger.

The coefficients are measured once per model, device, dtype and thread count by a calibration
of a few short forward passes (:func:`calibrate`, logged point by point, each point kept as it is
measured so that an interrupted calibration resumes; ``python -m framework.planning calibrate``)
and cached as JSON in ``<model cache>/cost/``. A run longer than 1.5x the longest calibrated pass
first extends the calibration with single passes at doubling lengths up to its own (at most
``LONG_CALIBRATION_CAP`` tokens), so that the quadratic attention term is measured where it
dominates, not extrapolated. Each point records the machine's load and a reference pass (a
256-token prefill) timed just before it: points are scaled by their reference pass, points
measured while other work kept every core busy are flagged and measured again on a quiet
machine, and a real run times the reference pass again once its model is loaded and scales its
estimate (:func:`rescale`). A dry run never loads weights: it extrapolates a short calibration
(with the range of leave-one-out refits) or, without one, prices from the architecture
(:func:`architecture_calibration`).

What is not a forward pass (loading, MLflow logging, tables, figures, statistics) is priced as
*bookkeeping*: ``b0 + b1 * steps``, fitted on the runs this machine finished before (each run
records its wall time less its model time, :func:`framework.planning.cost.Meter`, and less loading, in
``<model cache>/cost/bookkeeping-<device>.json``); until one has finished it is not priced, and
the plan says so. ``dry_run=true`` prints the plan and stops before any MLflow run; a
real run logs the estimate as ``estimate.*`` parameters and, at its end, what it actually took
and the ratios ``estimate/time_ratio`` and ``estimate/memory_ratio`` (actual / estimated).

Context lengths beyond the model's positions, and runs whose estimated peak memory exceeds the
device's, are refused here, before any run is created (a dry run prints the plan with a note).
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import torch
from scipy.optimize import nnls

from framework.interfaces import Condition, ConfigError, Detector, Sample, Task
from framework.model import masks
from framework.model.attention import AttentionEdit, HeadEdit, StreamingWindow, instrumented
from framework.model.generation import length_batches
from framework.model.loading import (
    cache_root,
    intact_cache,
    load_model,
    load_tokenizer,
    model_config,
    prepare_source,
    resolve_device,
    resolve_dtype,
)
from framework.planning import cost
from framework.planning.cost import memory_now, memory_peak, reset_peak
from framework.registry import Registry

log = logging.getLogger(__name__)

# (batch, length) of the calibration's prefills; batch 2 is left-padded by one token, so that
# the explicit-mask path of attention is measured too
CALIBRATION_POINTS: tuple[tuple[int, int], ...] = ((1, 256), (1, 1024), (1, 2048), (2, 1024), (2, 2048))
CALIBRATION_DECODE_STEPS = 4
CALIBRATION_REPEATS = 2
# the cost model's features; a calibration of an older one is measured anew (v2: rule masks beyond
# masks.DENSE_LIMIT, whose passes cost differently from the dense masks the v1 points measured)
COST_MODEL = "v2"
LONG_CALIBRATION_CAP = 16384  # longest pass the calibration measures: 2 min for Gemma-3-270m on 2 cores
BOOKKEEPING_HISTORY = 20  # finished runs kept to price bookkeeping
BUSY_LOAD = 1.0  # other runnable threads per core above which a calibration point is flagged busy
MACHINE_FACTOR_DEADBAND = 0.1  # a reference pass within 10 % of the calibration's is noise, not a slower machine
_MAX_PADDING = 0.2  # greedy_generate's default: batches of similar length
_GIB = 2**30


# --- measuring ------------------------------------------------------------------------------
def release_memory() -> None:
    """Give freed memory back to the system, so that RSS tracks live memory (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@dataclass
class Stopwatch:
    """When a run started and on which device its memory is counted."""

    device: torch.device
    started: float = field(default_factory=time.perf_counter)


def start_measuring(device: torch.device) -> Stopwatch:
    release_memory()
    reset_peak(device)
    return Stopwatch(device)


def measure_actual(watch: Stopwatch) -> tuple[float, int]:
    """A run's actual cost so far: total wall seconds since ``watch`` started and peak memory
    in bytes (the process's peak RSS on CPU, peak allocated memory on CUDA)."""
    return time.perf_counter() - watch.started, memory_peak(watch.device)


def machine_load() -> dict[str, float]:
    """The machine's 1-minute load average, the cores this process may use and torch's threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"load_average": round(os.getloadavg()[0], 2), "cores": cores, "threads": torch.get_num_threads()}


def is_busy(load: Mapping[str, float]) -> bool:
    """Whether other work kept every core busy: the load beyond this process's own threads
    exceeds BUSY_LOAD per core."""
    return (load["load_average"] - load["threads"]) / load["cores"] > BUSY_LOAD


def _median_seconds(work: Any, device: torch.device, repeats: int = 5) -> float:
    def synced() -> None:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synced()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        synced()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def reference_pass(model: Any, device: torch.device) -> float:
    """Seconds of the reference pass: one prefill of 256 tokens (the faster of two). Measured
    before each calibration point and again when a run has loaded its model, its time says how
    fast this machine runs the model at that moment."""
    vocab = model.config.get_text_config().vocab_size
    ids = (torch.arange(256, device=device) * 7 + 3).remainder(vocab)[None]
    times = []
    with torch.inference_mode():
        for _ in range(2):
            started = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return min(times)


def machine_probe(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Seconds of fixed work on constant tensors, no model needed (about a second on a CPU): a
    matrix product (``gemm``, 2 * 256 * 1024 * 1024 FLOPs), causal attention with and without an
    explicit mask (``sdpa``, ``sdpa_masked``: 8 heads x 512 x 512 x 64), a matrix-vector product
    reading 64 MiB of float32 (``gemv``) and one tiny op (``op``: the per-op overhead)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    a, b = torch.ones(256, 1024, device=device, dtype=dtype), torch.ones(1024, 1024, device=device, dtype=dtype)
    q = torch.ones(1, 8, 512, 64, device=device, dtype=dtype)
    mask = torch.ones(512, 512, dtype=torch.bool, device=device).tril()
    vector, matrix = torch.full((1, 4096), 0.5, device=device), torch.full((4096, 4096), 0.5, device=device)
    tiny = torch.ones(1, 64, device=device)
    work = {"gemm": lambda: a @ b, "sdpa": lambda: sdpa(q, q, q, is_causal=True),
            "sdpa_masked": lambda: sdpa(q, q, q, attn_mask=mask), "gemv": lambda: vector @ matrix,
            "op": lambda: [tiny + 1 for _ in range(100)]}
    with torch.inference_mode():
        probe = {key: _median_seconds(run, device) for key, run in work.items()}
    return probe | {"op": probe["op"] / 100}


# --- calibration ----------------------------------------------------------------------------
@dataclass
class Calibration:
    """Measured cost coefficients of one model on one device (see the module docstring)."""

    model: str
    device: str
    dtype: str
    threads: int
    load_seconds: float
    weights_bytes: int  # resident after the first pass, measured (the estimate uses the config's count)
    load_peak_bytes: int
    prefill: list[float]  # c0, c1, c2 causal (no mask), c2 dense mask, c2 rule mask (read in chunks)
    decode: list[float]  # d0, d1, d2
    memory: list[float]  # m0, m1, m2 dense mask
    points: list[dict[str, float]]
    load_average: float = 0.0  # the machine's 1-minute load while calibrating: a busy machine inflates the times
    # the fastest reference pass among the points' (:func:`reference_seconds`): the points' times are
    # scaled to it, and a run scales its estimate by its own reference pass over this one
    reference_seconds: float = 0.0
    source: str = "measured"  # or "architecture": estimated from FLOPs and bytes, no pass of the model measured

    @property
    def longest(self) -> int:
        return max((int(p["length"]) for p in self.points), default=0)

    @property
    def busy_points(self) -> list[dict[str, float]]:
        return [p for p in self.points if p.get("busy")]


def _sliding(config: Any) -> bool:
    config = getattr(config, "text_config", config)
    return bool(getattr(config, "sliding_window", None)) and "sliding_attention" in (getattr(config, "layer_types", None) or [])


def _ruled(length: int, masked: bool) -> bool:
    """Whether a pass's explicit mask is kept as a rule (:func:`framework.model.masks.rule_mask`)."""
    return masked and length * length > masks.DENSE_LIMIT


def _prefill_features(batch: int, length: int, masked: bool) -> list[float]:
    square, ruled = batch * length**2, _ruled(length, masked)
    return [1.0, batch * length, 0.0 if masked else square, square if masked and not ruled else 0.0,
            square if ruled else 0.0]


def _decode_features(batch: int, keys: int) -> list[float]:
    return [1.0, batch, batch * keys]


def _memory_features(batch: int, length: int, masked: bool) -> list[float]:
    return [1.0, batch * length, batch * length**2 if masked and not _ruled(length, masked) else 0.0]


def _parameter_counts(model_cfg: Any) -> tuple[int, int]:
    """Parameters in all (tied embeddings once) and in the linear layers a token passes through
    (the output head excluded: a pass computes its logits for one position), no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_cfg)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return sum(p.numel() for p in model.parameters()), linear


def weights_bytes(model_cfg: Any, dtype: torch.dtype) -> int:
    """The weights' size from the config's parameter count (tied embeddings once), no weights read."""
    return _parameter_counts(model_cfg)[0] * torch.empty(0, dtype=dtype).element_size()


def architecture_calibration(spec: Mapping[str, Any], model_cfg: Any, device: torch.device,
                             dtype: torch.dtype) -> Calibration:
    """Cost coefficients estimated from the architecture, without the model: FLOPs over the
    machine's measured matrix-product rate, attention over its measured attention rate, bytes
    read per decode step over its measured memory bandwidth, and a per-op overhead per layer
    (:func:`machine_probe`, a second on random tensors). Rough (within a factor of about 2):
    a run calibrates the model itself before it starts."""
    probe = machine_probe(device, dtype)
    text = getattr(model_cfg, "text_config", model_cfg)
    layers, heads, hidden, vocab = text.num_hidden_layers, text.num_attention_heads, text.hidden_size, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    size = torch.empty(0, dtype=dtype).element_size()
    total, linear = _parameter_counts(model_cfg)
    flops_per_second = 2 * 256 * 1024 * 1024 / probe["gemm"]
    attention, attention_masked = (probe[key] / (8 * 512 * 512 * 64) for key in ("sdpa", "sdpa_masked"))
    bytes_per_second = 4096 * 4096 * 4 / probe["gemv"]
    per_pass = 30 * layers * probe["op"]  # the ops of a layer's norms, projections, rotary and attention
    streamed = (linear + vocab * hidden) * size  # weights a decode step reads
    kv_per_token = 2 * layers * kv_heads * head_dim * size
    prefill = [per_pass + 2 * hidden * vocab / flops_per_second, 2 * linear / flops_per_second,
               layers * heads * head_dim * attention, layers * heads * head_dim * attention_masked,
               layers * heads * head_dim * attention_masked]  # a rule mask's chunks: as a dense mask's, at most
    decode = [per_pass + streamed / bytes_per_second, 2 * (linear + vocab * hidden) / flops_per_second,
              kv_per_token / bytes_per_second + 4 * layers * heads * head_dim / flops_per_second]
    activations = kv_per_token + (6 * hidden + 2 * getattr(text, "intermediate_size", 4 * hidden)) * size
    weights = total * size
    return Calibration(
        model=spec["name"], device=device.type, dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        load_seconds=2.0 + 2 * weights / bytes_per_second, weights_bytes=weights, load_peak_bytes=weights,
        prefill=prefill, decode=decode, memory=[0.0, float(activations), float(_mask_bytes(dtype))], points=[],
        load_average=machine_load()["load_average"], source="architecture")


def _refits(cal: Calibration, mask_bytes: int) -> list[Calibration]:
    """The calibration refitted without each of its points in turn: how far the fit moves is the
    uncertainty of an extrapolation beyond the calibrated lengths."""
    if len(cal.points) < 5:
        return []
    return [replace(cal, **fit_costs(cal.points[:i] + cal.points[i + 1:], mask_bytes)) for i in range(len(cal.points))]




def _calibration_path(spec: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> Path:
    dtype_name = str(dtype).removeprefix("torch.")
    return cache_root() / "cost" / f"{spec['name']}-{device.type}-{dtype_name}-{torch.get_num_threads()}threads-{COST_MODEL}.json"


def _time_generation(model: Any, ids: torch.Tensor, mask: torch.Tensor, device: torch.device) -> tuple[float, float, int]:
    """One prefill and a few decode steps as generation runs them: prefill seconds, the median
    decode step's seconds and the peak memory growth over both."""
    release_memory()
    base = memory_now(device)
    reset_peak(device)
    started = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - started
    steps = []
    for _ in range(CALIBRATION_DECODE_STEPS):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        started = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
        steps.append(time.perf_counter() - started)
    peak = memory_peak(device) - base
    del out
    return prefill, float(np.median(steps)), peak


def _measure_points(model: Any, shapes: list[tuple[int, int]], masked_always: bool, device: torch.device,
                    keep: Any = None) -> list[dict[str, float]]:
    """Time generation's prefill and decode steps at each (batch, length); batches > 1 are
    left-padded by one token, so that the explicit-mask path of attention is measured too. Each
    point records the machine's load and a reference pass measured just before it, and is handed
    to ``keep`` as soon as it is measured (so that an interrupted calibration resumes)."""
    vocab = model.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)
    points = []
    with torch.inference_mode():
        for index, (batch, length) in enumerate(shapes, 1):
            reference = reference_pass(model, device)
            load = machine_load()
            ids = torch.tensor(rng.integers(vocab // 4, vocab // 2, size=(batch, length)), device=device)
            mask = torch.ones_like(ids)
            if batch > 1:
                mask[0, 0] = 0
            # the faster of the repeats: a shared machine's passing load inflates one, rarely both
            runs = [_time_generation(model, ids, mask, device) for _ in range(CALIBRATION_REPEATS)]
            prefill, step, peak = min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)
            point = {"batch": batch, "length": length, "masked": float(batch > 1 or masked_always),
                     "prefill_seconds": prefill, "decode_step_seconds": step, "peak_bytes": float(peak),
                     "reference_seconds": reference, **load, "busy": is_busy(load)}
            points.append(point)
            log.info("cost calibration %d/%d: batch %d x %d tokens: prefill %.2f s, decode step %.3f s, +%.0f MiB "
                     "(load %.1f on %d cores, %d threads%s)", index, len(shapes), batch, length, prefill, step,
                     peak / 2**20, load["load_average"], load["cores"], load["threads"],
                     ": busy, flagged" if point["busy"] else "")
            if keep is not None:
                keep(point)
    return points


def _long_shapes(calibrated: int, longest: int, limit: int) -> list[tuple[int, int]]:
    """Single passes for a run whose prompts reach ``longest`` tokens, more than 1.5x the longest
    calibrated pass: at doubling lengths while well short of it, then at its length (capped)."""
    top = min(longest, LONG_CALIBRATION_CAP, limit or LONG_CALIBRATION_CAP)
    if top <= 1.5 * calibrated:
        return []
    lengths, length = [], 2 * calibrated
    while length < top / 1.5:
        lengths.append(length)
        length *= 2
    return [(1, n) for n in [*lengths, top]]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(data, indent=1))
    staging.replace(path)  # atomic: concurrent runs writing at once each leave a whole file


def _mask_bytes(dtype: torch.dtype) -> int:
    return 1 + torch.empty(0, dtype=dtype).element_size()


def cached_calibration(spec: Mapping[str, Any]) -> Calibration | None:
    """The model's cached calibration on its configured device, if any (nothing is loaded)."""
    device = resolve_device(spec.get("device", "auto"))
    path = _calibration_path(spec, device, resolve_dtype(spec.get("dtype", "auto"), device))
    return Calibration(**json.loads(path.read_text())) if path.exists() else None


def _shape(point: Mapping[str, float]) -> tuple[int, int]:
    return int(point["batch"]), int(point["length"])


def calibrate(spec: Mapping[str, Any], longest: int = 0, limit: int = 0) -> Calibration:
    """The model's cost coefficients on its configured device, measured once and cached; extended
    with longer passes when a run needs prefills of ``longest`` tokens (at most ``limit``), and
    measured again where points were flagged busy and the machine is quiet now. Each point is
    kept as soon as it is measured, so an interrupted calibration resumes where it stopped."""
    device = resolve_device(spec.get("device", "auto"))
    dtype = resolve_dtype(spec.get("dtype", "auto"), device)
    path = _calibration_path(spec, device, dtype)
    cached = cached_calibration(spec)
    if cached is None:
        shapes = list(CALIBRATION_POINTS) + _long_shapes(max(n for _, n in CALIBRATION_POINTS), longest, limit)
    else:
        quiet_now = not is_busy(machine_load())
        shapes = [_shape(p) for p in cached.busy_points if quiet_now] + _long_shapes(cached.longest, longest, limit)
        if not shapes:
            return cached
    partial = path.with_suffix(".partial.json")
    resumed = [p for p in (json.loads(partial.read_text())["points"] if partial.exists() else []) if _shape(p) in shapes]
    todo = [shape for shape in shapes if shape not in {_shape(p) for p in resumed}]
    log.warning("cost calibration: %s on %s (%s, %d threads): loading it once for %d forward passes up to %d tokens%s; "
                "cached in %s", spec["name"], device.type, dtype, torch.get_num_threads(), len(todo),
                max(n for _, n in shapes), f" ({len(resumed)} kept from an interrupted calibration)" if resumed else "", path)
    prepare_source(spec)  # a first dequantisation is not what later loads cost
    release_memory()
    before = memory_now(device)
    reset_peak(device)
    started = time.perf_counter()
    model = load_model(spec)
    load_seconds = time.perf_counter() - started
    load_peak = memory_peak(device) - before
    vocab = model.model.config.get_text_config().vocab_size
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([[vocab // 3] * 64], device=device), logits_to_keep=1)  # warm-up, not measured
    release_memory()
    weights = memory_now(device) - before  # resident once used (a cached copy is mapped lazily)
    measured = list(resumed)

    def keep(point: dict[str, float]) -> None:
        measured.append(point)
        _write_json(partial, {"points": measured})

    _measure_points(model.model, todo, _sliding(model.model.config), device, keep)
    del model
    release_memory()
    redone = {_shape(p) for p in measured}
    points = [p for p in (cached.points if cached else []) if _shape(p) not in redone] + measured
    calibration = cached or Calibration(
        model=spec["name"], device=device.type, dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        load_seconds=load_seconds, weights_bytes=int(weights), load_peak_bytes=int(load_peak), prefill=[], decode=[],
        memory=[], points=[], load_average=machine_load()["load_average"])
    calibration.__dict__.update(fit_costs(points, _mask_bytes(dtype)))
    _write_json(path, asdict(calibration))
    partial.unlink(missing_ok=True)
    busy = calibration.busy_points
    if busy:
        log.warning("cost calibration: %d of %d points were measured while other work kept every core busy; they are "
                    "flagged, scaled by their reference pass, and measured again by a later run on a quiet machine",
                    len(busy), len(points))
    return calibration


def fit_costs(points: list[dict[str, float]], mask_bytes: float) -> dict[str, Any]:
    """Non-negative least-squares coefficients of the cost model from measured points (each with
    batch, length, masked, prefill_seconds, decode_step_seconds, peak_bytes).

    The masks' memory is not fitted: at the calibration's short lengths it is lost in the noise,
    and at 32K it dominates. It is ``mask_bytes`` per element of a [batch, length, length] mask
    (a boolean mask, plus the float copy SDPA makes of it on CPU); a rule mask (a longer pass) holds none."""

    def fit(features: list[list[float]], target: list[float]) -> list[float]:
        return nnls(np.array(features), np.array(target))[0].tolist()

    # times as at the calibration's typical reference pass: a point measured while the machine
    # was slower (its own reference pass slower) is scaled down, so one busy moment does not skew the fit
    references = [p["reference_seconds"] for p in points if p.get("reference_seconds")]
    typical = float(np.median(references)) if len(references) == len(points) else 0.0
    scale = [typical / p["reference_seconds"] if typical else 1.0 for p in points]
    dense = [mask_bytes * _memory_features(int(p["batch"]), int(p["length"]), bool(p["masked"]))[2] for p in points]
    prefill = fit([_prefill_features(p["batch"], p["length"], bool(p["masked"])) for p in points],
                  [p["prefill_seconds"] * f for p, f in zip(points, scale)])
    if not any(_ruled(int(p["length"]), bool(p["masked"])) for p in points):
        prefill[4] = prefill[3]  # no rule-mask pass measured yet: priced as a dense one (an upper bound)
    return {
        "prefill": prefill,
        "decode": fit([_decode_features(p["batch"], p["length"]) for p in points],
                      [p["decode_step_seconds"] * f for p, f in zip(points, scale)]),
        "memory": fit([[1.0, p["batch"] * p["length"]] for p in points],
                      [p["peak_bytes"] - m for p, m in zip(points, dense)]) + [mask_bytes],
        "points": points,
        "reference_seconds": typical,
    }


# --- the plan -------------------------------------------------------------------------------
@dataclass
class Step:
    """One step of a run: its forward passes (prefills), the tokens they process, decode steps."""

    name: str
    samples: int
    passes: int = 0
    tokens: int = 0
    decode_steps: int = 0
    seconds: float = 0.0
    transient_bytes: float = 0.0


@dataclass
class Estimate:
    """A run's plan and its predicted cost; ``watch`` measures the actual cost from its end."""

    model: str
    device: str
    dtype: str
    conditions: int
    samples: int
    steps: list[Step]
    load_seconds: float
    base_bytes: int
    weights_bytes: int
    load_peak_bytes: int
    notes: list[str] = field(default_factory=list)
    bookkeeping_steps: int = 0  # the run's steps, which the bookkeeping's price counts
    design: list[str] = field(default_factory=list)  # the claim's comparisons: smallest reachable p and power
    machine_factor: float = 1.0  # the model's times scaled by this (the machine slower or faster than at calibration)
    reference_seconds: float = 0.0  # the calibration's typical reference pass (0: none recorded)
    calibration_load: float = 0.0  # the 1-minute load average at the calibration's points (median)
    calibration: str = "measured"  # or "architecture" (a dry run without a calibration)
    model_seconds_range: tuple[float, float] | None = None  # extrapolated: the model time across leave-one-out refits
    bookkeeping_seconds: float | None = None  # None until a run finished on this machine
    watch: Stopwatch | None = None
    # the samples priced here, which the run then evaluates (built once, from the same tokenizer files)
    eval_samples: list[Sample] = field(default_factory=list, repr=False)
    detect_samples: list[Sample] = field(default_factory=list, repr=False)
    detect_samples_by_length: dict[int, list[Sample]] = field(default_factory=dict, repr=False)

    @property
    def seconds(self) -> float:
        return self.load_seconds + sum(s.seconds for s in self.steps) + (self.bookkeeping_seconds or 0.0)

    @property
    def peak_bytes(self) -> float:
        transient = max((s.transient_bytes for s in self.steps), default=0.0)
        return self.base_bytes + max(self.load_peak_bytes, self.weights_bytes + transient)

    @property
    def forward_passes(self) -> int:
        return sum(s.passes + s.decode_steps for s in self.steps)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    def params(self) -> dict[str, Any]:
        return {"estimate.seconds": round(self.seconds, 1), "estimate.peak_memory_gib": round(self.peak_bytes / _GIB, 3),
                "estimate.conditions": self.conditions, "estimate.samples": self.samples,
                "estimate.forward_passes": self.forward_passes, "estimate.tokens": self.tokens,
                "estimate.device": f"{self.device} {self.dtype}", "estimate.calibration": self.calibration,
                "estimate.bookkeeping_seconds": "not priced yet" if self.bookkeeping_seconds is None
                else round(self.bookkeeping_seconds, 1)}

    def report(self) -> str:
        lines = [f"plan for {self.model} on {self.device} ({self.dtype}): {self.conditions} conditions "
                 f"(baseline included) on {self.samples} evaluation samples",
                 f"  {'step':<28}{'samples':>8}{'prefills':>10}{'tokens':>12}{'decode steps':>14}{'est. time':>11}"]
        for s in self.steps:
            lines.append(f"  {s.name:<28}{s.samples:>8}{s.passes:>10}{s.tokens:>12}{s.decode_steps:>14}"
                         f"{_duration(s.seconds):>11}")
        lines.append(f"  {'load the model':<72}{_duration(self.load_seconds):>11}")
        bookkeeping = "not yet" if self.bookkeeping_seconds is None else _duration(self.bookkeeping_seconds)
        lines.append(f"  {'bookkeeping (logging, figures, statistics)':<72}{bookkeeping:>11}")
        lines.append(f"total: {self.forward_passes} forward passes over {self.tokens} prompt tokens; "
                     f"estimated wall time {_duration(self.seconds)}, peak memory {self.peak_bytes / _GIB:.2f} GiB")
        if self.model_seconds_range is not None:
            model_seconds = sum(s.seconds for s in self.steps)
            low, high = self.model_seconds_range
            lines.append(f"extrapolated: the forward passes' {_duration(model_seconds)} lie between {_duration(low)} and "
                         f"{_duration(high)} across the fits that leave out one calibration point each")
        lines.extend(self.design)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def check_context_lengths(config: Mapping[str, Any], model_cfg: Any, lengths_key: str = "detect_lengths") -> int:
    """Refuse context lengths beyond the model's positions (with room for the generated
    tokens); returns the usable limit."""
    text = getattr(model_cfg, "text_config", model_cfg)
    positions = getattr(text, "max_position_embeddings", None)
    if not positions:
        return 0
    new = int(config["task"].get("max_new_tokens") or Task.max_new_tokens)
    limit = positions - new
    for key, lengths in (("task.context_lengths", config["task"].get("context_lengths")),
                         (lengths_key, config.get(lengths_key))):
        too_long = [n for n in lengths or [] if n > limit]
        if too_long:
            raise ConfigError(
                f"{key}={list(lengths)}: {too_long} do not fit {config['model']['name']}, which has {positions} "
                f"positions (max_position_embeddings), each sample also generating task.max_new_tokens={new} "
                f"tokens; use lengths of at most {limit}")
    return limit


def _generation(name: str, samples: list[Sample], batch_size: int, new_tokens: int, sliding: bool,
                cal: Calibration) -> Step:
    """greedy_generate's work: batches of similar length, a prefill each, then decode steps."""
    lengths = [len(s.input_ids) for s in samples]
    step = Step(name, len(samples))
    for batch in length_batches(lengths, batch_size, _MAX_PADDING):
        width = max(lengths[i] for i in batch)
        masked = sliding or any(lengths[i] != width for i in batch)
        _add_prefill(step, len(batch), width, masked, cal)
        _add_decode(step, len(batch), width, new_tokens - 1, cal)
    return step


def _add_prefill(step: Step, batch: int, length: int, masked: bool, cal: Calibration) -> None:
    step.passes += 1
    step.tokens += batch * length
    step.seconds += float(np.dot(cal.prefill, _prefill_features(batch, length, masked)))
    step.transient_bytes = max(step.transient_bytes, float(np.dot(cal.memory, _memory_features(batch, length, masked))))


def _add_decode(step: Step, batch: int, keys: int, steps: int, cal: Calibration) -> None:
    step.decode_steps += steps
    step.seconds += steps * float(np.dot(cal.decode, _decode_features(batch, keys)))


def _detection(name: str, detector: Detector, samples: list[Sample], sliding: bool, cal: Calibration,
               notes: list[str]) -> Step:
    """A detector's work: Wu et al.'s score decodes each trial; the others run one teacher-forced
    forward pass per sample (qnorm none); a detector the planner does not know is priced as the latter."""
    step = Step(name, len(samples))
    kind = getattr(detector, "name", "")
    if kind == "qnorm":
        return step
    if detector.own_samples:
        notes.append(f"{name}: detector {kind!r} makes its own samples; their cost is not priced")
        return step
    for sample in samples:
        if kind == "retrieval_score":
            _add_prefill(step, 1, len(sample.input_ids) - 1, sliding, cal)
            _add_decode(step, 1, len(sample.input_ids), int(detector.max_new_tokens), cal)
        else:
            _add_prefill(step, 1, len(sample.input_ids) + len(sample.answer_ids), sliding, cal)
    if kind == "utility":
        notes.append(f"{name}: the utility fit after the forward passes (Adam on captured tensors) is not priced")
    elif kind not in ("attn_mass", "retrieval_score"):
        notes.append(f"{name}: detector {kind!r} is priced as one teacher-forced forward pass per sample")
    return step


def _bookkeeping_path(device: torch.device) -> Path:
    return cache_root() / "cost" / f"bookkeeping-{device.type}.json"


def _bookkeeping_runs(device: torch.device) -> list[dict[str, float]]:
    path = _bookkeeping_path(device)
    return json.loads(path.read_text())["runs"] if path.exists() else []


def price_bookkeeping(runs: list[dict[str, float]], steps: int) -> float | None:
    """Seconds of a run's bookkeeping with ``steps`` steps: ``b0 + b1 * steps`` fitted (non-negative
    least squares) on finished runs' records (``steps``, ``seconds``); their mean while all had
    the same number of steps; None before any run finished."""
    if not runs:
        return None
    if len({r["steps"] for r in runs}) < 2:
        return float(np.mean([r["seconds"] for r in runs]))
    coefficients = nnls(np.array([[1.0, r["steps"]] for r in runs]), np.array([r["seconds"] for r in runs]))[0]
    return float(coefficients @ [1.0, steps])


def _record_bookkeeping(device: torch.device, record: dict[str, Any]) -> None:
    """Keep a finished run's bookkeeping seconds for the next plans (the last BOOKKEEPING_HISTORY
    runs). Runs that end at once (a sweep's parallel jobs) each keep theirs: the file is read and
    rewritten under an exclusive lock."""
    path = _bookkeeping_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        runs = (_bookkeeping_runs(device) + [record])[-BOOKKEEPING_HISTORY:]
        _write_json(path, {"runs": runs})


@dataclass
class PlannedSamples:
    """A run's samples, built from the tokenizer alone, and the lengths they reach."""

    eval: list[Sample]
    detect: list[Sample]
    by_length: dict[int, list[Sample]]
    longest: int  # the longest prompt with its answer, in tokens
    limit: int  # the model's room for a prompt (its positions less the generated tokens); 0: unknown


def plan_samples(config: Mapping[str, Any], registry: Registry, task: Task, detector: Detector | None,
                 extra_detectors: Mapping[str, Detector], n_treatments: int) -> PlannedSamples:
    """Validate the run's lengths and build its samples from the tokenizer alone (no weights); the
    task's detection samples only where a detector or an intervention's ``prepare`` reads them."""
    spec = config["model"]
    limit = check_context_lengths(config, model_config(spec))
    if config.get("detect_lengths") and "context_lengths" not in config["task"]:
        raise ConfigError(f"detect_lengths={config['detect_lengths']} needs a task with context_lengths "
                          f"(niah, passkey); task {config['task']['name']!r} has none")
    if config.get("detect_lengths") and detector is None:
        raise ConfigError("detect_lengths runs the detector at each length: add +detector=<name>")
    tokenizer = load_tokenizer(spec)
    samples = task.build_samples(tokenizer, "eval", config["seed"])
    reads_samples = any(not d.own_samples for d in (detector, *extra_detectors.values()) if d is not None)
    detect = task.build_samples(tokenizer, "detect", config["detect_seed"]) if reads_samples or n_treatments else []
    by_length = {int(length): registry.create("task", {**config["task"], "context_lengths": [int(length)]})
                 .build_samples(tokenizer, "detect", config["detect_seed"]) for length in config.get("detect_lengths") or []}
    everything = samples + detect + [s for at_length in by_length.values() for s in at_length]
    longest = max((len(s.input_ids) + len(s.answer_ids) for s in everything), default=0)
    if limit and longest > limit:
        raise ConfigError(f"the task's longest prompt has {longest} tokens; {spec['name']} has room for {limit} "
                          f"(its positions less task.max_new_tokens): shorten the task")
    return PlannedSamples(samples, detect, by_length, longest, limit)


def _dry_run_calibration(spec: Mapping[str, Any], model_cfg: Any, longest: int, device: torch.device,
                         dtype: torch.dtype) -> tuple[Calibration, list[str]]:
    """A dry run's calibration, never loading weights: the cached one (extrapolated beyond its
    lengths), or without one an estimate from the architecture."""
    notes = []
    if spec.get("gguf_package") and intact_cache(spec) is None:
        notes.append(f"{spec['name']} is not in the model cache yet: a real run dequantises it first (not priced)")
    cal = cached_calibration(spec)
    command = f"python -m framework.planning calibrate model={spec['name']} --up-to {max(longest, 2048)}"
    if cal is None:
        notes.append(f"{spec['name']} on {device.type} is not calibrated yet: priced from its architecture (FLOPs and "
                     "bytes over this machine's matrix-product, attention and memory rates, measured on random tensors "
                     f"just now), a rough estimate; a real run calibrates first, or run `{command}`")
        return architecture_calibration(spec, model_cfg, device, dtype), notes
    if longest > 1.5 * cal.longest:
        notes.append(f"the calibration reaches {cal.longest} tokens, this run's prompts {longest}: the longer passes are "
                     f"extrapolated with the fitted model (a real run measures them first, or run `{command}`)")
    return cal, notes


def estimate_run(
    config: Mapping[str, Any], registry: Registry, task: Task, detector: Detector | None,
    extra_detectors: Mapping[str, Detector], n_treatments: int, planned: PlannedSamples | None = None,
    design: list[str] | None = None,
) -> Estimate:
    """Price every step of the run on its samples (``planned``, else built here) and print the
    plan with ``dry_run`` (``design``: the lines on the claim's power). A real run calibrates the
    model first where needed; a dry run never loads weights. The actual cost is measured from
    this call's end."""
    spec = config["model"]
    planned = planned or plan_samples(config, registry, task, detector, extra_detectors, n_treatments)
    model_cfg = model_config(spec)
    device = resolve_device(spec.get("device", "auto"))
    dtype = resolve_dtype(spec.get("dtype", "auto"), device)
    if config.get("dry_run"):
        cal, notes = _dry_run_calibration(spec, model_cfg, planned.longest, device, dtype)
    else:
        cal, notes = calibrate(spec, planned.longest, planned.limit), []
    weights = max(weights_bytes(model_cfg, dtype), cal.weights_bytes)  # what loading leaves resident
    sliding = _sliding(model_cfg)
    batch_size, new_tokens = int(config["batch_size"]), int(task.max_new_tokens)

    def price(cal: Calibration) -> list[Step]:
        steps = [_generation("baseline", planned.eval, batch_size, new_tokens, sliding, cal)]
        for key, plugin in ([("detection", detector)] if detector is not None else []) + \
                [(f"detection ({k})", d) for k, d in extra_detectors.items()]:
            steps.append(_detection(key, plugin, [] if plugin.own_samples else planned.detect, sliding, cal, notes))
        for length, detect_at in planned.by_length.items():
            for key, plugin in [(k, d) for k, d in [("main", detector), *extra_detectors.items()] if not d.own_samples]:
                steps.append(_detection(f"detection {key} @ {length}", plugin, detect_at, sliding, cal, notes))
        if n_treatments:  # every condition generates on the same samples: one step's work, n times
            each = _generation(f"{n_treatments} conditions", planned.eval, batch_size, new_tokens, sliding, cal)
            steps.append(Step(each.name, each.samples, each.passes * n_treatments, each.tokens * n_treatments,
                              each.decode_steps * n_treatments, each.seconds * n_treatments, each.transient_bytes))
        return steps

    steps = price(cal)
    model_seconds = None
    if cal.source == "measured" and planned.longest > 1.5 * cal.longest:
        totals = [sum(s.seconds for s in price(refit)) for refit in _refits(cal, _mask_bytes(dtype))]
        model_seconds = (min(totals), max(totals)) if totals else None
    if cal.busy_points:
        notes.append(f"{len(cal.busy_points)} of the calibration's {len(cal.points)} points were measured while other "
                     f"work kept every core busy (flagged in {_calibration_path(spec, device, dtype)}; a run on a quiet "
                     "machine measures them again)")
    counted = len(steps) - bool(n_treatments) + n_treatments  # each condition a step of its own
    bookkeeping = price_bookkeeping(_bookkeeping_runs(device), counted)
    if bookkeeping is None:
        notes.append("bookkeeping (MLflow logging, tables, figures, statistics) is not priced yet: it is learned from "
                     f"the runs that finish on this machine ({_bookkeeping_path(device)})")
    estimate = Estimate(
        model=spec["name"], device=cal.device, dtype=cal.dtype, conditions=1 + n_treatments, samples=len(planned.eval),
        eval_samples=planned.eval, detect_samples=planned.detect, detect_samples_by_length=planned.by_length,
        steps=steps, load_seconds=cal.load_seconds, base_bytes=0, weights_bytes=weights,
        load_peak_bytes=cal.load_peak_bytes, notes=notes, bookkeeping_steps=counted, bookkeeping_seconds=bookkeeping,
        design=design or [], calibration=cal.source, model_seconds_range=model_seconds,
        reference_seconds=cal.reference_seconds,
        calibration_load=float(np.median([p.get("load_average", cal.load_average) for p in cal.points] or [cal.load_average])),
    )
    estimate.watch = start_measuring(device)
    estimate.base_bytes = memory_now(device)
    room = device_memory(device)
    too_big = (f"the estimated peak memory, {estimate.peak_bytes / _GIB:.1f} GiB, exceeds the {room / _GIB:.1f} GiB of "
               f"{device.type}: lower batch_size or the longest context length, or choose a smaller model or dtype")
    if estimate.peak_bytes > room:
        estimate.notes.append(too_big)
    if config.get("dry_run"):
        print(estimate.report())
    elif estimate.peak_bytes > room:  # refused before the run: out of memory, a process is killed mid-run
        raise ConfigError(too_big)
    return estimate


def device_memory(device: torch.device) -> int:
    """Bytes the device has in all: the GPU's memory, or the machine's physical memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def log_estimate(estimate: Estimate) -> None:
    """The estimate as the run's parameters (``estimate.*``), and in its log."""
    mlflow.log_params(estimate.params())
    log.info("estimate: %s wall time, %.2f GiB peak memory (%d forward passes, %d prompt tokens)",
             _duration(estimate.seconds), estimate.peak_bytes / _GIB, estimate.forward_passes, estimate.tokens)


def rescale(estimate: Estimate, model: Any) -> float:
    """Scale the estimate's forward passes by how much slower (or faster) the machine runs the
    loaded model now than at calibration: the reference pass now over the calibration's. A pass
    is one moment, so the factor applies only where the 1-minute load average agrees (higher
    now for a slower pass, lower for a faster one) and outside MACHINE_FACTOR_DEADBAND (noise);
    else 1. Logged as ``estimate.machine_factor`` and ``estimate.scaled_seconds``; the run's
    ``estimate/time_ratio`` is against the scaled estimate."""
    if not estimate.reference_seconds:
        return 1.0
    now = reference_pass(model, estimate.watch.device)
    ratio = now / estimate.reference_seconds
    load = machine_load()
    agrees = load["load_average"] > estimate.calibration_load if ratio > 1 else load["load_average"] < estimate.calibration_load
    factor = ratio if abs(ratio - 1) > MACHINE_FACTOR_DEADBAND and agrees else 1.0
    before = estimate.seconds
    for step in estimate.steps:
        step.seconds *= factor
    estimate.machine_factor = factor
    mlflow.log_params({"estimate.machine_factor": round(factor, 3), "estimate.scaled_seconds": round(estimate.seconds, 1),
                       "estimate.load_average": load["load_average"]})
    log.info("reference pass: %.3f s, x%.2f its time at calibration (load %.1f on %d cores, %d threads; %.1f at "
             "calibration)%s", now, ratio, load["load_average"], load["cores"], load["threads"], estimate.calibration_load,
             f": estimate scaled from {_duration(before)} to {_duration(estimate.seconds)}" if factor != 1.0
             else ": estimate kept" + ("" if abs(ratio - 1) <= MACHINE_FACTOR_DEADBAND else ", the load average does not agree"))
    return factor


REPRICE_LENGTH = 1024  # the longest pass timed to price a biased edit (a few seconds at most)


def takes_manual_path(edit: AttentionEdit) -> bool:
    """Whether an edit's passes take the chunked manual path: a logit bias from any part other
    than a lone streaming window (which has an SDPA path of its own)."""
    biasing = [part for part in edit.compiled() if type(part).bias is not HeadEdit.bias]
    return bool(biasing) and not (len(biasing) == 1 and isinstance(biasing[0], StreamingWindow))


def _pass_seconds(model: Any, device: torch.device, length: int, edit: AttentionEdit | None) -> float:
    """The faster of two prefills of ``length`` tokens with ``edit``."""
    vocab = model.config.get_text_config().vocab_size
    ids = (torch.arange(length, device=device) * 7 + 3).remainder(vocab)[None]
    times = []
    with torch.inference_mode(), instrumented(model, edit):
        for _ in range(2):
            started = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return min(times)


def reprice_conditions(estimate: Estimate, model: Any, conditions: list[Condition]) -> float:
    """Price the conditions whose edits bias attention logits (the chunked manual path, several
    times a plain pass's cost) once they are built: one plain and one biased prefill at the run's
    evaluation length (at most ``REPRICE_LENGTH``) give the factor applied to those conditions'
    share of the estimate. Logged as ``estimate.bias_edit_factor`` and ``estimate.repriced_seconds``;
    1 (and nothing timed) when no edit biases."""
    manual = [c for c in conditions if takes_manual_path(c.edit)]
    step = next((s for s in estimate.steps if s.name.endswith(" conditions")), None)
    if not manual or step is None or not conditions:
        return 1.0
    length = min(REPRICE_LENGTH, max(len(s.input_ids) for s in estimate.eval_samples))
    device = estimate.watch.device
    plain = _pass_seconds(model, device, length, None)
    factor = max(1.0, _pass_seconds(model, device, length, manual[0].edit) / plain)
    before = estimate.seconds
    step.seconds += step.seconds / len(conditions) * len(manual) * (factor - 1)
    mlflow.log_params({"estimate.bias_edit_factor": round(factor, 3), "estimate.repriced_seconds": round(estimate.seconds, 1)})
    log.info("%d of %d conditions bias attention logits (the chunked manual path): a %d-token pass takes x%.2f a plain "
             "one here; estimate repriced from %s to %s", len(manual), len(conditions), length, factor,
             _duration(before), _duration(estimate.seconds))
    return factor


def log_accuracy(estimate: Estimate) -> dict[str, float]:
    """The run's actual cost next to the estimate, as metrics (ratios actual / estimated); its
    bookkeeping seconds (wall time less model time and loading) are kept to price later runs."""
    seconds, peak = measure_actual(estimate.watch)
    meter = cost.active()
    if meter is not None:
        loading = meter.steps["load_model"].wall_time_s if "load_model" in meter.steps else 0.0
        bookkeeping = max(0.0, seconds - meter.total.model_time_s - loading)
        _record_bookkeeping(estimate.watch.device, {"steps": estimate.bookkeeping_steps, "seconds": round(bookkeeping, 2),
                                                    "model": estimate.model})
        mlflow.log_metric("actual/bookkeeping_seconds", bookkeeping)
    metrics = {"actual/seconds": seconds, "actual/peak_memory_gib": peak / _GIB,
               "estimate/time_ratio": seconds / estimate.seconds if estimate.seconds else float("nan"),
               "estimate/memory_ratio": peak / estimate.peak_bytes if estimate.peak_bytes else float("nan")}
    mlflow.log_metrics(metrics)
    log.info("actual: %s wall time (x%.2f of the estimate), %.2f GiB peak memory (x%.2f)", _duration(seconds),
             metrics["estimate/time_ratio"], metrics["actual/peak_memory_gib"], metrics["estimate/memory_ratio"])
    return metrics

