"""Extra memory of capturing attention rows, per KV head, at long context: the framework's
per-KV-group computation (:func:`framework.model.attention.attention_probs`) against the same rows
computed with the key repeated per query head (``repeat_kv``, what it did before).

For each length, rows and mode, one call in a fresh subprocess on random tensors shaped like a
real model's layer (default Llama-3.1-8B: 32 query heads, 8 KV heads, head_dim 128, float32 as
on CPU; ``--model smollm2`` for 9/3/64; ``--dtype bfloat16`` for a GPU's inputs, which the capture
casts to float32 one KV head at a time). The extra memory is the growth of the process's peak
RSS over the call (VmHWM reset just before, inputs already allocated, glibc's mmap threshold
fixed so that freed tensors leave at once). It is shown next to the rows' own probabilities,
heads x rows x length x 4 bytes (what the capture returns), and divided per KV head: O(rows x
length) means that ratio stays flat as the length grows, while the repeated key adds
heads x length x head_dim x 4 bytes (1 GiB per layer at 64K for 8B's shape).

Usage: python benchmarks/capture_memory.py [--lengths 8192 32768 65536] [--rows 1 64] [--model llama31_8b]
       [--dtype float32]
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
SHAPES = {"llama31_8b": (32, 8, 128), "smollm2": (9, 3, 64)}
MODES = ("grouped", "repeated")


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def measure(mode: str, length: int, rows: int, model: str, dtype_name: str) -> dict[str, float]:
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from framework.model.attention import attention_probs

    torch.set_grad_enabled(False)
    heads, kv_heads, head_dim = SHAPES[model]
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype_name)
    query = torch.randn(1, heads, length, head_dim, generator=generator).to(dtype)
    key = torch.randn(1, kv_heads, length, head_dim, generator=generator).to(dtype)
    picked = torch.arange(length - rows, length)

    def repeated() -> torch.Tensor:  # the reference: key repeated per query head, then one matmul
        full = repeat_kv(key, heads // kv_heads).float()
        scores = torch.matmul(query[:, :, picked].float(), full.transpose(-1, -2)) * head_dim**-0.5
        causal = torch.arange(length)[None, :] > picked[:, None]
        return torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)

    call = repeated if mode == "repeated" else lambda: attention_probs(query, key, None, head_dim**-0.5, picked)
    call()  # warm-up; freed memory goes back at once (mmap threshold)
    open("/proc/self/clear_refs", "w").write("5")
    before = _kib("VmRSS")
    start = time.perf_counter()
    probs = call()
    seconds = time.perf_counter() - start
    extra = (_kib("VmHWM") - before) * 1024
    assert probs.shape == (1, heads, rows, length)
    return {"extra_bytes": extra, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama31_8b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the layer's query and key")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]), args.model, args.dtype)))
        return
    heads, kv_heads, head_dim = SHAPES[args.model]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    print(f"{args.model}: {heads} query heads, {kv_heads} KV heads, head_dim {head_dim}, {args.dtype}; one layer's capture")
    print(f"{'tokens':>7} | {'rows':>4} | {'mode':8} | {'extra MiB':>9} | {'probs MiB':>9} | {'extra / probs':>13} | "
          f"{'extra per KV head / (rows x length) B':>38} | {'s':>5}")
    print("-" * 112)
    for length in args.lengths:
        for rows in args.rows:
            probs_bytes = heads * rows * length * 4
            for mode in MODES:
                command = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype,
                           "--one", mode, str(length), str(rows)]
                out = subprocess.run(command, capture_output=True, text=True, env=env)
                if out.returncode:
                    print(f"{length:>7} | {rows:>4} | {mode:8} | failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                extra = result["extra_bytes"]
                print(f"{length:>7} | {rows:>4} | {mode:8} | {extra / 2**20:9.1f} | {probs_bytes / 2**20:9.1f} | "
                      f"{extra / probs_bytes:13.2f} | {extra / kv_heads / (rows * length):38.1f} | {result['seconds']:5.2f}")


if __name__ == "__main__":
    main()
