"""Streaming heads in ``cache: masked`` mode against plain SDPA: time and peak memory of one
whole-model forward of the embedded SmolLM2 (the prefill of a prompt, ``logits_to_keep=1``), at
each length, side by side in one run, printed as ratios (goal: at most 1.15x in both).

Modes: ``sdpa`` (no edit: the registered attention function, plain SDPA), ``masked`` (a third of
the KV heads of every layer kept full, the rest streaming with sink 4 + recent 256, the
intervention's defaults: :class:`framework.model.attention.StreamingWindow`'s SDPA path) and, with
``--manual``, the same window forced onto the chunked manual path (what a logit-bias edit costs).
Times come from one subprocess per length that alternates the modes round by round (a change in
the machine's load then hits every mode alike) and keeps each mode's fastest round. Peak memory
comes from a fresh subprocess per mode: the growth of its peak RSS over one forward after a
warm-up one (VmHWM reset just before, glibc's mmap threshold fixed so freed tensors leave at once).

``--decode N``: also time one decode step after a prefill of ``N`` tokens, with the model's full
KV cache against ``cache: evicted`` (:mod:`framework.model.kv_cache`: the streaming KV heads keep
sink + recent entries, the kept ones everything), the steps of both caches alternating in one
process, the median step of each.

``--threads`` sets torch's intra-op threads in every measurement (both modes alike): on a machine
that other processes keep busy, many small ops each wait for a second thread's time slice, which
penalises the chunked window far more than one large SDPA; one thread measures the work itself.

Usage: python benchmarks/streaming_heads.py [--lengths 2048 8192] [--repeats 3] [--manual] [--threads N]
       [--decode 8192] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's framework, not an installed one
SINK, RECENT = 4, 256


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _models_and_edits(threads: int | None) -> tuple[object, dict[str, object]]:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from framework.api import AttentionEdit, HeadEdit, StreamingWindow, load_model

    class ForceManual(HeadEdit):
        heads: list = []

        def bias(self, layer, rows, key_length, where):
            return torch.zeros(1, 1, len(rows), key_length)

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        spec = OmegaConf.to_container(compose("config"), resolve=True)["model"]
    model = load_model(spec)
    info = model.info
    group = info.n_heads // info.n_kv_heads
    kept = max(1, info.n_kv_heads // 3)
    streaming = [(layer, h) for layer in range(info.n_layers) for h in range(kept * group, info.n_heads)]
    window = StreamingWindow(streaming, info.n_heads, SINK, RECENT)
    evicting = StreamingWindow(streaming, info.n_heads, SINK, RECENT, prefill=False, evict=True)
    return model, {"sdpa": None, "masked": AttentionEdit(parts=[window]),
                   "manual": AttentionEdit(parts=[window, ForceManual()]), "evicted": AttentionEdit(parts=[evicting])}


def _forward(model, edit, length: int) -> None:
    import torch

    from framework.api import instrumented

    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    with instrumented(model.model, edit):
        model.model(input_ids=ids, use_cache=False, logits_to_keep=1)


def measure_times(modes: list[str], length: int, repeats: int, threads: int | None) -> dict[str, float]:
    """Seconds per forward of each mode, alternating modes round by round (so a change in the
    machine's load hits every mode alike), the fastest round of each."""
    model, edits = _models_and_edits(threads)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for mode in modes:
        _forward(model, edits[mode], length)  # warm-up
    for _ in range(repeats):
        for mode in modes:
            start = time.perf_counter()
            _forward(model, edits[mode], length)
            times[mode].append(time.perf_counter() - start)
    return {mode: min(values) for mode, values in times.items()}


def measure_decode(length: int, steps: int, threads: int | None) -> dict[str, float]:
    """Median seconds of a decode step after a ``length``-token prefill: the full cache against
    the evicted one, their steps alternating (a change in load hits both alike)."""
    import contextlib

    import numpy as np
    import torch

    from framework.api import instrumented

    model, edits = _models_and_edits(threads)
    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    token = ids[:, -1:]
    times: dict[str, list[float]] = {"full": [], "evicted": []}
    with contextlib.ExitStack() as stack:
        caches = {"full": None, "evicted": stack.enter_context(edits["evicted"].kv_cache(model.model))}
        plan = {"full": None, "evicted": edits["evicted"]}
        for mode in times:
            with instrumented(model.model, plan[mode]):
                caches[mode] = model.model(input_ids=ids, cache=caches[mode], use_cache=True, logits_to_keep=1).cache
        for step in range(steps + 1):
            for mode in times:
                start = time.perf_counter()
                with instrumented(model.model, plan[mode]):
                    model.model(input_ids=token, cache=caches[mode], use_cache=True)
                if step:  # the first step of each warms up
                    times[mode].append(time.perf_counter() - start)
        kept = {mode: float(caches[mode].layers[0].nbytes()) if hasattr(caches[mode].layers[0], "nbytes") else
                float(caches[mode].layers[0].keys.nbytes * 2) for mode in times}
    return {**{mode: float(np.median(values)) for mode, values in times.items()},
            **{f"{mode}_layer_bytes": value for mode, value in kept.items()}}


def measure_memory(mode: str, length: int, threads: int | None) -> float:
    """MiB the peak RSS grows by over one forward (after a warm-up one)."""
    model, edits = _models_and_edits(threads)
    _forward(model, edits[mode], length)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS")
    _forward(model, edits[mode], length)
    return (_kib("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--manual", action="store_true", help="also time the window on the chunked manual path")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--decode", type=int, default=None, help="also time a decode step after this many tokens")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per cache (with --decode)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: WHAT LENGTH in this process
    args = parser.parse_args()
    modes = ["sdpa", "masked"] + (["manual"] if args.manual else [])
    if args.one:
        what, length = args.one[0], int(args.one[1])
        if what == "decode":
            result = measure_decode(length, args.steps, args.threads)
        elif what == "times":
            result = measure_times(modes, length, args.repeats, args.threads)
        else:
            result = measure_memory(what, length, args.threads)
        print(json.dumps(result))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}

    def child(what: str, length: int):
        command = [sys.executable, __file__, "--one", what, str(length), "--repeats", str(args.repeats),
                   "--steps", str(args.steps)]
        command += (["--threads", str(args.threads)] if args.threads else []) + (["--manual"] if args.manual else [])
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"SmolLM2 forward, streaming heads sink {SINK} + recent {RECENT}, a third of the KV heads kept full, "
          f"threads: {args.threads or 'torch default'}, fastest of {args.repeats} alternating rounds")
    print(f"{'length':>7} {'mode':>7} {'seconds':>8} {'peak MiB':>9} {'time x':>7} {'memory x':>9}")
    for length in args.lengths:
        seconds = child("times", length)
        memory = {mode: child(mode, length) for mode in modes}
        for mode in modes:
            print(f"{length:>7} {mode:>7} {seconds[mode]:>8.2f} {memory[mode]:>9.1f} {seconds[mode] / seconds['sdpa']:>7.2f} "
                  f"{memory[mode] / max(memory['sdpa'], 1e-9):>9.2f}", flush=True)
    if args.decode:
        step = child("decode", args.decode)
        print(f"decode step after {args.decode} tokens (median of {args.steps}): full cache {step['full'] * 1000:.1f} ms, "
              f"evicted {step['evicted'] * 1000:.1f} ms, x{step['evicted'] / step['full']:.2f}; layer 0 holds "
              f"{step['evicted_layer_bytes'] / 2**20:.1f} MiB evicted vs {step['full_layer_bytes'] / 2**20:.1f} MiB full")


if __name__ == "__main__":
    main()
