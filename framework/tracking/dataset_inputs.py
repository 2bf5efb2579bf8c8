"""A run's evaluation and detection samples as MLflow dataset inputs.

Each split is logged with ``mlflow.log_input`` (context ``eval`` or ``detect``): its name says
task, split, seed and context lengths; its schema lists the per-sample columns (context length,
needle depth, prompt length in tokens, answer, ...); its source is the task's config (including a
data file's ``path`` where the task reads one); its digest is a SHA-256 of those columns, every
prompt's token ids among them, so runs on the same samples show the same digest in the runs table's Dataset
column and runs on different samples different ones.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Mapping

import mlflow
import pandas as pd
from mlflow.data.code_dataset_source import CodeDatasetSource

from framework.interfaces import Sample


def samples_frame(samples: list[Sample]) -> pd.DataFrame:
    """One row per sample: its id, scalar metadata (context_length, depth, ...), answer, and a
    SHA-256 of its prompt's token ids."""
    return pd.DataFrame([
        {"id": s.id, **{k: v for k, v in s.meta.items() if isinstance(v, (int, float, str))}, "answer": s.answer,
         "prompt_sha256": hashlib.sha256(str(s.input_ids).encode()).hexdigest()}
        for s in samples
    ])


def log_samples(samples: list[Sample], task_config: Mapping[str, Any], split: str, seed: int) -> None:
    """Log ``samples`` (drawn with ``seed``) as the active run's ``split`` dataset input."""
    frame = samples_frame(samples)
    lengths = sorted(frame["context_length"].unique()) if "context_length" in frame else []
    name = f"{task_config['name']}-{split}-seed{seed}" + (f"-len{'/'.join(map(str, lengths))}" if lengths else "")
    source = CodeDatasetSource({**task_config, "split": split, "seed": seed})
    digest = hashlib.sha256(frame.to_json(orient="split").encode()).hexdigest()[:8]
    with warnings.catch_warnings():  # the schema describes samples that never miss values
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column", UserWarning)
        mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=name, digest=digest), context=split)
