"""Peak memory and time of one long prefill with transformers' dense masks against this
framework's rule masks (:mod:`framework.model.masks`), side by side in one run.

A sliding-window layer (Gemma-3: 15 of its 18 layers) or a padded batch cannot use SDPA's causal
flag, so transformers builds a [batch, 1, L, L] bool mask for the pass and SDPA turns it into a
float one: at 32K that is most of Gemma-3-270m's peak. ``dense`` forces that (the rule mask's
threshold raised above the pass); ``rule`` is the framework's default: the mask is read in query
chunks of O(chunk x L), and a sliding-window layer attends only to its window.

Each mode runs in a fresh subprocess: the model loads, a short warm-up pass runs, the peak RSS is
reset (VmHWM), then one prefill of ``--length`` tokens with a KV cache (as generation does),
``logits_to_keep=1``. Printed per mode: seconds, the process's peak RSS, its growth over the pass,
and the resident weights + KV cache the pass must hold whatever the masks; then the ratios.

Usage: python benchmarks/long_masks.py [--model gemma3_270m] [--length 32000] [--batch 1] [--pad 0]
(``--pad N``: a batch of two whose second sample is N tokens shorter, left-padded.)
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
_GIB = 2**30


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def measure(model_name: str, length: int, pad: int, dense: bool) -> dict[str, float]:
    """One prefill in this process: seconds, peak RSS and its growth (bytes), weights and KV bytes."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from framework.api import instrumented, load_model
    from framework.model import masks
    from framework.model.kv_cache import cache_nbytes

    torch.set_grad_enabled(False)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        spec = OmegaConf.to_container(compose("config", overrides=[f"model={model_name}"]), resolve=True)["model"]
    model = load_model(spec)
    if dense:
        masks.DENSE_LIMIT = 2**62  # transformers' dense masks, whatever the length
    batch = 2 if pad else 1
    ids = torch.randint(10, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        attention_mask[1, :pad] = 0

    def prefill(n: int):
        with instrumented(model.model):
            return model.model(input_ids=ids[:, -n:], attention_mask=attention_mask[:, -n:], use_cache=True,
                               logits_to_keep=1)

    prefill(min(512, length))  # warm-up: allocator and kernels
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS")
    start = time.perf_counter()
    out = prefill(length)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    return {"seconds": seconds, "peak": _kib("VmHWM") * 1024, "growth": (_kib("VmHWM") - before) * 1024,
            "weights": weights, "kv": cache_nbytes(out.cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--length", type=int, default=32000)
    parser.add_argument("--pad", type=int, default=0, help="a batch of two, the second N tokens shorter")
    parser.add_argument("--one", choices=["dense", "rule"], help=argparse.SUPPRESS)  # internal: one mode here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.length, args.pad, args.one == "dense")))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    results = {}
    for mode in ("rule", "dense"):
        command = [sys.executable, __file__, "--one", mode, "--model", args.model, "--length", str(args.length),
                   "--pad", str(args.pad)]
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{mode}: {out.stderr[-2000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    shape = f"batch of 2, the second {args.pad} tokens shorter" if args.pad else "batch 1"
    print(f"{args.model}, one prefill of {args.length} tokens ({shape}), KV cache kept, logits_to_keep=1")
    print(f"{'masks':>6} {'seconds':>8} {'peak GiB':>9} {'growth GiB':>11} {'weights GiB':>12} {'KV GiB':>7}")
    for mode, r in results.items():
        print(f"{mode:>6} {r['seconds']:>8.1f} {r['peak'] / _GIB:>9.2f} {r['growth'] / _GIB:>11.2f} "
              f"{r['weights'] / _GIB:>12.2f} {r['kv'] / _GIB:>7.2f}")
    rule, dense = results["rule"], results["dense"]
    print(f"rule / dense: time x{rule['seconds'] / dense['seconds']:.2f}, peak x{rule['peak'] / dense['peak']:.2f}, "
          f"growth over the pass x{rule['growth'] / dense['growth']:.2f}")


if __name__ == "__main__":
    main()
