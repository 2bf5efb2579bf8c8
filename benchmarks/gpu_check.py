"""The GPU check: 8B-shaped models at 8K-128K tokens, measured against the memory model, in one run.

GPUs are lent rarely and briefly, so this one command answers every GPU question of the project
within a time limit (``--budget-s``), with nothing downloaded. On CUDA, in bfloat16:

* **exactness** on a short prompt, per model: logits of the edited pass (head mask + zeroed RoPE
  pairs) in bfloat16 against the same edit in float32, next to the unedited pass's bfloat16 error
  (the yardstick) and the edit's own effect; and a zero-masked head against an eager-attention
  copy of the model whose head is zeroed by hand at ``o_proj``'s input, in bfloat16 and float32;
* **prefill cases** of Llama-3.1-8B, Qwen2.5-7B and Gemma-2-9B shapes (the architecture numbers of
  ``benchmarks/gpu_memory_model.py``) at 8K, 32K and the longest length their positions (less the
  12 tokens the planner keeps for generation) and the GPU's memory allow, up to 128K: the peak
  memory of a batch-1 prefill (``torch.cuda.max_memory_allocated``, KV cache kept, one row of
  logits) next to the memory model's prediction for the same pass, as a ratio; the time of a
  plain prefill (SDPA; Gemma-2's soft-capping takes the framework's chunked manual path) against
  the framework's row capture (64 rows) and an edited pass, as ratios; one decode step;
* **the default command end to end** (``python -m framework +detector=attn_mass
  +intervention=zero_lowfreq``, device and dtype ``auto``) on the embedded model, in a fresh
  local MLflow store: its wall time, run status and ``estimate/*_ratio`` read from MLflow (it starts
  with at least 90 s of budget left and is stopped after 240 s).

The models have random weights built directly on the device, with transformers' weight
initialisation skipped (``no_init_weights``): time and memory do not depend on the values, so the
prefill cases run on whatever the allocator hands out; only the exactness check, which compares
values, initialises its model (the model's own init, on the device). Cases run in order of how
much they tell: exactness, every model at 8K, the end-to-end run, 32K, the longest lengths. A case
that hits CUDA out-of-memory is marked ``oom`` with its predicted peak, one that the remaining
budget cannot hold ``skipped: budget``, and the check goes on; lengths beyond a model's positions
are listed with their prediction, not run. The JSON is rewritten before and after every case, so an
interrupted check keeps what it measured.

``--tiny`` runs the same code on CPU (still bfloat16) in well under a minute: tiny configs of the
same three families (2 layers, head_dim 16, the published GQA ratios, positions and sliding
window divided by 128), lengths divided by 128, 8 captured rows, and the end-to-end step kept but
cut to a baseline-only run of one 128-token sample (the default command's model, planner, MLflow
logging and the reading of its metrics, without its detection and conditions). On CPU the peak is the weights plus the
process's resident-memory growth over the pass, so its memory ratios are not the GPU's.

Usage: python benchmarks/gpu_check.py [--budget-s 480] [--out gpu_check.json] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_memory_model, next to this file

import gpu_memory_model as memory_model  # noqa: E402 (puts this checkout's framework first on the path)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PretrainedConfig  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

from framework.api import AttentionEdit, LoadedModel, RowCapture, instrumented, lowest_frequency_dims, prepare  # noqa: E402
from framework.planning.cost import memory_now, memory_peak, reset_peak  # noqa: E402
from framework.planning.planner import device_memory  # noqa: E402

MODELS = ("llama31_8b", "qwen25_7b", "gemma2_9b")
LENGTHS = (8192, 32768, 131072)  # the memory model's table; the last is a ceiling, see longest_length
NEW_TOKENS = 12  # positions the planner keeps free for generation (niah's max_new_tokens)
ROWS = 64  # attn_mass's question/answer rows, as in the memory model's table
EXACT_PROMPT = 64  # tokens of the exactness check's prompt
DECODE_STEPS = 4  # decode steps timed after a prefill; the median counts
MAX_ROUNDS = 3  # timed rounds of the three prefill modes; the fastest pass per mode counts
RESERVE_S = 15.0  # kept free at the end of the budget for writing the results
E2E_MIN_S = 90.0  # the end-to-end run starts only with this much budget left (dequantise, calibrate, run)
E2E_MAX_S = 240.0  # and is stopped after this long, so that the longer prefill cases keep their time
MEMORY_MARGIN = 0.95  # a length is tried only if its predicted peak is within this share of the GPU's memory
TINY_SCALE = 128  # --tiny divides lengths, positions and windows by this
TINY_HEAD_DIM = 16
TINY_ROWS = 8
PREFILL_MODES = ("plain", "capture", "edited")
GIB = 2**30
DEFAULT_COMMAND = ("+detector=attn_mass", "+intervention=zero_lowfreq")
TINY_COMMAND = ("task.context_lengths=[128]", "task.depths=[0.5]", "task.samples_per_cell=1")  # baseline only


@dataclass(frozen=True)
class Setup:
    """Where and at what size the check runs."""

    device: torch.device
    tiny: bool
    dtype: torch.dtype = torch.bfloat16

    @property
    def rows(self) -> int:
        return TINY_ROWS if self.tiny else ROWS

    def scaled(self, tokens: int) -> int:
        return tokens // TINY_SCALE if self.tiny else tokens


@dataclass
class Case:
    """One line of the results: what was run, its status and its numbers."""

    kind: str  # exactness, prefill or end_to_end
    model: str | None = None
    tokens: int | None = None
    note: str = ""  # why a prefill case has this length
    status: str = "not reached"  # then running; measured, oom, failed: ..., killed: ... or skipped: budget
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join(str(part) for part in (self.kind, self.model, self.tokens) if part is not None)


class Budget:
    """The check's deadline."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started) - RESERVE_S

    def allows(self, estimate: float) -> bool:
        return estimate < self.left()


# --- models ----------------------------------------------------------------------------------
def tiny_config(config: PretrainedConfig) -> PretrainedConfig:
    """The same family at a tiny size: 2 layers, head_dim 16, a quarter of the heads (the GQA ratio
    kept), positions and sliding window divided by TINY_SCALE, soft-capping and biases as they are."""
    heads = max(2, config.num_attention_heads // 4)
    data = config.to_dict()
    data.update(num_attention_heads=heads, num_key_value_heads=max(1, config.num_key_value_heads // 4),
                hidden_size=heads * TINY_HEAD_DIM, intermediate_size=config.intermediate_size // 64,
                num_hidden_layers=2, vocab_size=512, max_position_embeddings=config.max_position_embeddings // TINY_SCALE)
    if "head_dim" in data:
        data["head_dim"] = TINY_HEAD_DIM
    if data.get("sliding_window"):
        data["sliding_window"] //= TINY_SCALE
    if data.get("query_pre_attn_scalar"):
        data["query_pre_attn_scalar"] = TINY_HEAD_DIM
    data.pop("layer_types", None)  # rebuilt for the new layer count
    return type(config).from_dict(data)


def model_configs(setup: Setup) -> dict[str, PretrainedConfig]:
    """The three families' configs, from the memory model (tiny ones with --tiny)."""
    hub = memory_model.hub_configs()
    return {name: tiny_config(hub[name][1]) if setup.tiny else hub[name][1] for name in MODELS}


def build(setup: Setup, name: str, config: PretrainedConfig, initialise: bool = False) -> LoadedModel:
    """The model with random weights allocated directly on the device, transformers' weight init
    skipped (``initialise`` runs the model's own init there, for checks that compare values)."""
    with torch.device(setup.device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=setup.dtype)
    model.tie_weights()  # no_init_weights skips init_weights, which also ties the embeddings
    if initialise:
        torch.manual_seed(0)
        model.init_weights()
    count = sum(p.numel() for p in model.parameters())
    if count != memory_model.meta_parameter_count(config):
        raise RuntimeError(f"{name}: built {count} parameters, the memory model counts {memory_model.meta_parameter_count(config)}")
    return prepare(model, None, name)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied ones once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def release() -> None:
    """Give back what a finished case held before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- what the passes run with ----------------------------------------------------------------
def prompt(config: PretrainedConfig, tokens: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids [1, tokens] (BOS-like id 1 first)."""
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(3, config.vocab_size, (1, tokens), generator=generator)
    ids[0, 0] = 1
    return ids.to(device)


def check_edit(loaded: LoadedModel) -> AttentionEdit:
    """What an intervention run applies: head 0 of every layer masked (zero), and the lowest-
    frequency quarter of head 1's query dims zeroed in every layer (claim 4's 32 of 128)."""
    layers, head_dim = loaded.info.n_layers, loaded.info.head_dim
    dims = lowest_frequency_dims(loaded.inv_freq, head_dim // 4)
    edit = AttentionEdit.zero_query_dims({(layer, 1): dims for layer in range(layers)}, head_dim)
    edit.head_masks = {(layer, 0): "zero" for layer in range(layers)}
    return edit


def row_capture(tokens: int, rows: int, device: torch.device, kept: list[torch.Tensor]) -> RowCapture:
    """attn_mass's capture: the last ``rows`` positions, reduced at once to each head's attention
    mass on the context before them (BOS excluded)."""
    start = tokens - rows
    return RowCapture(torch.arange(start, tokens, device=device),
                      lambda layer, probs: kept.append(probs[0, :, :, 1:start].sum(-1).mean(-1)))


def prefill(loaded: LoadedModel, ids: torch.Tensor, mode: str, edit: AttentionEdit, rows: int) -> Any:
    """One batch-1 prefill as generation runs it (KV cache kept, one row of logits) in ``mode``."""
    if mode == "plain":
        return loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    kept: list[torch.Tensor] = []
    capture = row_capture(ids.shape[1], rows, ids.device, kept) if mode == "capture" else None
    with instrumented(loaded.model, edit if mode == "edited" else None, capture):
        out = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if capture is not None and len(kept) != loaded.info.n_layers:
        raise RuntimeError(f"the capture saw {len(kept)} layers of {loaded.info.n_layers}")
    return out


# --- measurements ----------------------------------------------------------------------------
def timed(device: torch.device, run: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    started = time.perf_counter()
    result = run()
    sync(device)
    return time.perf_counter() - started, result


def peak_of(setup: Setup, model: torch.nn.Module, run: Callable[[], Any]) -> tuple[int, float, Any]:
    """Peak bytes while ``run`` runs, its seconds and its result. CUDA: max_memory_allocated (weights
    and everything else allocated included). CPU: the weights plus the process's resident-memory
    growth over the pass (the interpreter's own memory left out)."""
    if setup.device.type == "cuda":
        gc.collect()  # tensors of earlier passes held in reference cycles would count as this pass's
    before = memory_now(setup.device)
    reset_peak(setup.device)
    seconds, result = timed(setup.device, run)
    peak = memory_peak(setup.device)
    if setup.device.type != "cuda":
        peak = model_bytes(model) + max(0, peak - before)
    return peak, seconds, result


def decode_step_seconds(setup: Setup, loaded: LoadedModel, out: Any) -> float:
    """The median of DECODE_STEPS greedy decode steps on the prefill's cache."""
    steps = []
    for _ in range(DECODE_STEPS):
        token = out.logits[:, -1:].argmax(-1)
        seconds, out = timed(setup.device, lambda: loaded.model(input_ids=token, cache=out.cache, use_cache=True))
        steps.append(seconds)
    return sorted(steps)[len(steps) // 2]


def predicted_peaks(setup: Setup, config: PretrainedConfig, tokens: int) -> dict[str, int]:
    """The memory model's peak for each mode's pass: with the row capture, and without it (plain
    and edited passes; the memory model has no term for edits)."""
    arch = memory_model.Architecture.from_config(config)
    weights = memory_model.meta_parameter_count(config) * torch.empty(0, dtype=setup.dtype).element_size()
    with_capture = memory_model.prefill_memory(arch, weights, tokens, setup.rows)
    without = replace(with_capture, capture=0).total
    return {"plain": without, "capture": with_capture.total, "edited": without}


def warm_up(setup: Setup, loaded: LoadedModel, edit: AttentionEdit) -> None:
    """Each mode once at a short length: kernel loading and first-call costs out of the timings."""
    ids = prompt(loaded.model.config, 4 * setup.rows, setup.device)
    with torch.inference_mode():
        for mode in PREFILL_MODES:
            prefill(loaded, ids, mode, edit, setup.rows)


def measure_prefill(setup: Setup, name: str, config: PretrainedConfig, tokens: int, budget: Budget) -> dict[str, Any]:
    """Peak memory and time of the three prefill modes at ``tokens``, a decode step, and the
    memory model's predictions. Round 1 measures memory and time; further rounds (time only, the
    modes taking turns) run while the budget allows; the fastest pass per mode counts."""
    started = time.perf_counter()
    loaded = build(setup, name, config)
    edit = check_edit(loaded)
    warm_up(setup, loaded, edit)
    ids = prompt(config, tokens, setup.device)
    predicted = predicted_peaks(setup, config, tokens)
    result: dict[str, Any] = {"build_and_warm_up_s": time.perf_counter() - started,
                              "predicted_peak_gib": {mode: predicted[mode] / GIB for mode in PREFILL_MODES}}
    peaks, seconds = {}, {mode: [] for mode in PREFILL_MODES}
    with torch.inference_mode():
        for mode in PREFILL_MODES:
            peaks[mode], first, out = peak_of(setup, loaded.model, lambda: prefill(loaded, ids, mode, edit, setup.rows))
            seconds[mode].append(first)
            if mode == "plain":
                result["decode_step_s"] = decode_step_seconds(setup, loaded, out)
            del out
        round_s = sum(s[0] for s in seconds.values())
        for _ in range(MAX_ROUNDS - 1):
            if not budget.allows(2 * round_s):
                break
            for mode in PREFILL_MODES:
                seconds[mode].append(timed(setup.device, lambda: prefill(loaded, ids, mode, edit, setup.rows))[0])
    fastest = {mode: min(s) for mode, s in seconds.items()}
    result.update(
        rounds=len(seconds["plain"]),
        peak_gib={mode: peaks[mode] / GIB for mode in PREFILL_MODES},
        memory_ratio={mode: peaks[mode] / predicted[mode] for mode in PREFILL_MODES},
        seconds=fastest,
        time_ratio={"capture_vs_plain": fastest["capture"] / fastest["plain"], "edited_vs_plain": fastest["edited"] / fastest["plain"]},
        attention="manual (soft-capping)" if memory_model.Architecture.from_config(config).softcap else "sdpa",
    )
    return result


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _zero_head_at_o_proj(model: torch.nn.Module, layer: int, head: int, head_dim: int) -> Any:
    """A hook that zeroes one head's slice of ``o_proj``'s input: the mask written by hand."""
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        inputs = args[0].clone()
        inputs[..., head * head_dim:(head + 1) * head_dim] = 0
        return (inputs, *args[1:])

    return model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)


def masked_vs_eager(loaded: LoadedModel, ids: torch.Tensor, head: tuple[int, int]) -> dict[str, float]:
    """Logits of a zero-masked head (the framework's edit) against the same weights run with
    transformers' eager attention and the head zeroed by hand; the unmasked difference beside it."""
    model = loaded.model
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with instrumented(model, AttentionEdit.mask_heads([head])):
            masked = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        try:
            eager = model(input_ids=ids).logits
            handle = _zero_head_at_o_proj(model, *head, loaded.info.head_dim)
            try:
                eager_masked = model(input_ids=ids).logits
            finally:
                handle.remove()
        finally:
            prepare(model, None, loaded.info.name)  # back to the instrumented attention
    return {"masked_vs_eager": _max_diff(masked, eager_masked), "plain_vs_eager": _max_diff(plain, eager),
            "mask_effect": _max_diff(masked, plain)}


def check_exactness(setup: Setup, name: str, config: PretrainedConfig) -> dict[str, Any]:
    """bfloat16 against float32 for the edited and the plain pass, and a masked head against eager
    attention, on a short prompt (see the module docstring); ``exact`` applies the criteria of
    :func:`exactness_verdict`."""
    loaded = build(setup, name, config, initialise=True)
    wide = prepare(copy.deepcopy(loaded.model).float(), None, name)
    ids = prompt(config, min(EXACT_PROMPT, config.max_position_embeddings - NEW_TOKENS), setup.device)
    edit = check_edit(loaded)
    logits = {}
    with torch.inference_mode():
        for label, model in (("bf16", loaded), ("fp32", wide)):
            logits[f"plain_{label}"] = model.model(input_ids=ids).logits
            with instrumented(model.model, edit):
                logits[f"edited_{label}"] = model.model(input_ids=ids).logits
    head = (loaded.info.n_layers // 2, 1)
    result = {
        "prompt_tokens": ids.shape[1],
        "logit_scale": logits["plain_fp32"].abs().max().item(),
        "edited_bf16_vs_fp32": _max_diff(logits["edited_bf16"], logits["edited_fp32"]),
        "plain_bf16_vs_fp32": _max_diff(logits["plain_bf16"], logits["plain_fp32"]),
        "edit_effect_fp32": _max_diff(logits["edited_fp32"], logits["plain_fp32"]),
        "masked_head": list(head),
        "bf16": masked_vs_eager(loaded, ids, head),
        "fp32": masked_vs_eager(wide, ids, head),
    }
    result["exact"] = exactness_verdict(result)
    return result


def exactness_verdict(result: dict[str, Any]) -> dict[str, bool]:
    """The criteria: an edit adds no bfloat16 error of its own (within 2x the unedited pass's error
    plus 1 % of the logits' scale) and its effect stands above that error; a masked head matches
    the hand-zeroed eager model to float32 precision (1e-4 of the scale) in float32, and in
    bfloat16 within 2x the unmasked eager difference plus 1 % of the scale, while the mask's
    effect stands above it."""
    scale = result["logit_scale"]
    bf16, fp32 = result["bf16"], result["fp32"]
    return {
        "edits_bf16": result["edited_bf16_vs_fp32"] <= 2 * result["plain_bf16_vs_fp32"] + 0.01 * scale
        and result["edit_effect_fp32"] > result["edited_bf16_vs_fp32"],
        "mask_vs_eager_fp32": fp32["masked_vs_eager"] <= 1e-4 * scale and fp32["mask_effect"] > fp32["masked_vs_eager"],
        "mask_vs_eager_bf16": bf16["masked_vs_eager"] <= 2 * bf16["plain_vs_eager"] + 0.01 * scale
        and bf16["mask_effect"] > bf16["masked_vs_eager"],
    }


def run_end_to_end(setup: Setup, budget: Budget) -> dict[str, Any]:
    """The front door as a user runs it, in a fresh directory (its own local MLflow store),
    stopped with SIGTERM (the run then ends KILLED) after E2E_MAX_S or when the budget runs out."""
    from mlflow import MlflowClient

    command = [sys.executable, "-m", "framework", *(TINY_COMMAND if setup.tiny else DEFAULT_COMMAND)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as cwd:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=max(1.0, min(budget.left(), E2E_MAX_S)))
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            output, _ = process.communicate(timeout=60)
            stopped = True
        wall = time.perf_counter() - started
        result: dict[str, Any] = {"command": " ".join(command[1:]), "returncode": process.returncode, "wall_s": wall,
                                  "stopped": stopped}
        client = MlflowClient(tracking_uri=f"sqlite:///{Path(cwd) / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("retrieval-heads") if (Path(cwd) / "mlruns").exists() else None
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs:
            run = runs[0]
            keep = ("cost/wall_time_s", "actual/seconds", "actual/peak_memory_gib", "cost/cuda_peak_mb")
            result.update(run_status=run.info.status, device=run.data.tags.get("device"), dtype=run.data.tags.get("dtype"),
                          metrics={k: v for k, v in run.data.metrics.items()
                                   if k.startswith(("estimate/", "recall/")) or k in keep})
        if process.returncode != 0 or not runs:
            result["output_tail"] = output[-3000:]
    return result


# --- the plan --------------------------------------------------------------------------------
def longest_length(setup: Setup, config: PretrainedConfig) -> tuple[int, str]:
    """The longest prefill the model's positions (less NEW_TOKENS, as the planner counts them) and
    the device's memory (by the memory model's prediction) allow, up to LENGTHS[-1]; and what
    limits it."""
    tokens = min(setup.scaled(LENGTHS[-1]), config.max_position_embeddings - NEW_TOKENS)
    limit = "positions" if tokens < setup.scaled(LENGTHS[-1]) else f"ceiling {setup.scaled(LENGTHS[-1])} less {NEW_TOKENS}"
    room = MEMORY_MARGIN * device_memory(setup.device)
    while predicted_peaks(setup, config, tokens)["capture"] > room and tokens > setup.scaled(LENGTHS[0]):
        tokens, limit = tokens // 2, "memory"
    return tokens, limit


def plan(setup: Setup, configs: dict[str, PretrainedConfig]) -> tuple[list[Case], list[dict[str, Any]]]:
    """The cases, most informative first: exactness, each model at 8K, the end-to-end run, 32K,
    then each model's longest length (a length at the model's limit is cut to its positions less
    NEW_TOKENS, as the planner would); and the lengths beyond a model's positions, not run, with
    the memory model's prediction."""
    lengths: dict[str, dict[int, str]] = {name: {} for name in configs}
    beyond = []
    for name, config in configs.items():
        positions = config.max_position_embeddings
        longest, limit = longest_length(setup, config)
        if memory_model.planner_refusal(name, config, longest, NEW_TOKENS) is not None:
            raise RuntimeError(f"{name}: the planner refuses {longest} tokens")
        for tokens in (setup.scaled(n) for n in LENGTHS[:-1]):
            if tokens + NEW_TOKENS <= positions:
                lengths[name][tokens] = ""
            elif tokens <= positions:  # the last few positions are the generated tokens'
                lengths[name][positions - NEW_TOKENS] = f"positions {positions} less {NEW_TOKENS}"
            else:
                peaks = predicted_peaks(setup, config, tokens)
                beyond.append({"model": name, "tokens": tokens, "positions": positions,
                               "predicted_peak_gib": {mode: b / GIB for mode, b in peaks.items()}})
        lengths[name].setdefault(longest, f"longest: {limit}")
    cases = [Case("exactness", name) for name in configs]
    for index in range(max(len(v) for v in lengths.values())):
        cases += [Case("prefill", name, tokens, note) for name, v in lengths.items()
                  for tokens, note in list(v.items())[index:index + 1]]
        if index == 0:
            cases.append(Case("end_to_end"))
    return cases, beyond


def guess_seconds(setup: Setup, case: Case, done: list[Case]) -> float:
    """What a case is expected to take, to decide whether the budget can hold it. A prefill case:
    from the same model's longest measured case, one round of three passes with the plain pass's
    time extended half linearly, half quadratically in the length (0 when none is measured yet).
    The end-to-end run on a GPU: E2E_MIN_S, enough to learn whether the front door works."""
    if case.kind == "end_to_end":
        return 0.0 if setup.tiny else E2E_MIN_S
    measured = [c for c in done if c.kind == "prefill" and c.model == case.model and c.status == "measured"]
    if case.kind != "prefill" or not measured:
        return 0.0
    last = max(measured, key=lambda c: c.tokens)
    growth = case.tokens / last.tokens
    return 3 * last.result["seconds"]["plain"] * (growth + growth**2) / 2 + last.result["build_and_warm_up_s"]


def run_case(setup: Setup, case: Case, configs: dict[str, PretrainedConfig], budget: Budget) -> None:
    """Run one case in place: measured, oom (with its predicted peak) or failed (with the error)."""
    try:
        if case.kind == "exactness":
            case.result = check_exactness(setup, case.model, configs[case.model])
        elif case.kind == "prefill":
            case.result = measure_prefill(setup, case.model, configs[case.model], case.tokens, budget)
        else:
            case.result = run_end_to_end(setup, budget)
        case.status = "measured"
    except torch.OutOfMemoryError:
        case.status = "oom"
    except Exception as error:  # one broken case must not cost the rest of a rare GPU session
        case.status = f"failed: {type(error).__name__}: {str(error)[:300]}"
    if case.kind == "prefill" and case.status != "measured":
        case.result["predicted_peak_gib"] = {m: b / GIB for m, b in predicted_peaks(setup, configs[case.model], case.tokens).items()}
    if case.kind == "end_to_end" and case.status == "measured" and case.result.get("run_status") != "FINISHED":
        case.status = "killed: time limit" if case.result["stopped"] else "failed: the run did not finish"
    release()


# --- report ----------------------------------------------------------------------------------
def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)} ({device_memory(device) / GIB:.1f} GiB)"
    return f"cpu ({os.cpu_count()} cores, {device_memory(device) / GIB:.1f} GiB)"


def write_json(path: Path, setup: Setup, budget: Budget, cases: list[Case], beyond: list[dict[str, Any]]) -> None:
    import transformers

    report = {"device": describe_device(setup.device), "tiny": setup.tiny, "dtype": str(setup.dtype).removeprefix("torch."),
              "budget_s": budget.seconds, "elapsed_s": time.perf_counter() - budget.started, "rows": setup.rows,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "cases": [{"case": c.label, "kind": c.kind, "model": c.model, "tokens": c.tokens, "note": c.note,
                         "status": c.status, **c.result} for c in cases],
              "beyond_positions": beyond}
    path.write_text(json.dumps(report, indent=1, default=float))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def case_notes(case: Case) -> str:
    r = case.result
    if case.kind == "exactness" and case.status == "measured":
        return (f"edits bf16-fp32 {r['edited_bf16_vs_fp32']:.3g} (plain {r['plain_bf16_vs_fp32']:.3g}, effect "
                f"{r['edit_effect_fp32']:.3g}); mask vs eager bf16 {r['bf16']['masked_vs_eager']:.3g} (plain "
                f"{r['bf16']['plain_vs_eager']:.3g}), fp32 {r['fp32']['masked_vs_eager']:.2g}; scale {r['logit_scale']:.3g}; "
                f"exact: {', '.join(k for k, ok in r['exact'].items() if ok) or 'none'}")
    if case.kind == "end_to_end" and r:
        metrics = r.get("metrics", {})
        return (f"wall {r['wall_s']:.0f} s, run {r.get('run_status', 'none')} on {r.get('device')}/{r.get('dtype')}, "
                f"time x{_fmt(metrics.get('estimate/time_ratio'), '.2f')}, "
                f"memory x{_fmt(metrics.get('estimate/memory_ratio'), '.2f')} of the estimate")
    if case.kind == "prefill" and case.status == "measured":
        return "; ".join(filter(None, [case.note, f"{r['attention']}, {r['rounds']} timed rounds"]))
    if case.kind == "prefill":
        return case.note
    return ""


def print_table(setup: Setup, cases: list[Case], beyond: list[dict[str, Any]]) -> None:
    unit, scale = ("MiB", 1024) if setup.tiny else ("GiB", 1)
    header = (f"{'case':<28} | {'status':<24} | {'peak ' + unit:>8} | {'pred. ' + unit:>9} | {'mem x':>5} | "
              f"{'capt. mem x':>11} | {'plain s':>8} | {'capture x':>9} | {'edited x':>8} | {'decode ms':>9} | notes")
    print(f"\nGPU check on {describe_device(setup.device)}, {str(setup.dtype).removeprefix('torch.')}"
          f"{' (--tiny)' if setup.tiny else ''}")
    print(header)
    print("-" * len(header))
    for case in cases:
        r = case.result
        peak, ratio, seconds, times = (r.get(k, {}) for k in ("peak_gib", "memory_ratio", "seconds", "time_ratio"))
        predicted = r.get("predicted_peak_gib", {}).get("plain")
        decode = r.get("decode_step_s")
        print(f"{case.label:<28} | {case.status[:24]:<24} | {_fmt(peak.get('plain', math.nan) * scale, '8.2f'):>8} | "
              f"{_fmt(math.nan if predicted is None else predicted * scale, '9.2f'):>9} | "
              f"{_fmt(ratio.get('plain'), '5.2f'):>5} | {_fmt(ratio.get('capture'), '11.2f'):>11} | "
              f"{_fmt(seconds.get('plain'), '8.3f'):>8} | {_fmt(times.get('capture_vs_plain'), '9.2f'):>9} | "
              f"{_fmt(times.get('edited_vs_plain'), '8.2f'):>8} | {_fmt(None if decode is None else 1000 * decode, '9.1f'):>9} | "
              f"{case_notes(case)}")
    print(f"\npeak: the plain prefill's peak memory ({'weights + resident-memory growth on CPU' if setup.tiny else 'max allocated'}); "
          f"pred.: the memory model's; mem x, capt. mem x: measured / predicted for the plain pass and the {setup.rows}-row "
          "capture; capture x, edited x: time / the plain prefill's; every number in the JSON.")
    for skipped in beyond:
        print(f"not run, beyond {skipped['model']}'s {skipped['positions']} positions: {skipped['tokens']} tokens "
              f"(predicted {skipped['predicted_peak_gib']['plain'] * scale:.2f} {unit})")


def check(setup: Setup, budget: Budget, out: Path) -> list[Case]:
    """Every case of the plan that the budget holds, in order; the JSON rewritten before and after
    each case (an interrupted check keeps what it measured), the table printed at the end."""
    configs = model_configs(setup)
    cases, beyond = plan(setup, configs)
    done: list[Case] = []
    for case in cases:
        if budget.allows(guess_seconds(setup, case, done)):
            case.status = "running"
            write_json(out, setup, budget, cases, beyond)
            print(f"[{time.perf_counter() - budget.started:6.0f} s] {case.label}", file=sys.stderr, flush=True)
            run_case(setup, case, configs, budget)
        else:
            case.status = "skipped: budget"
        done.append(case)
        write_json(out, setup, budget, cases, beyond)
    print_table(setup, cases, beyond)
    print(f"\nwritten: {out}")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time limit in seconds (default 480)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON written (default gpu_check.json)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the same code paths in under a minute")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here; --tiny runs the same check on CPU with tiny shapes")
    if args.tiny:
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and threads on a busy CPU wait for each other
    check(Setup(torch.device("cpu") if args.tiny else torch.device("cuda"), args.tiny), Budget(args.budget_s), args.out)


if __name__ == "__main__":
    main()
