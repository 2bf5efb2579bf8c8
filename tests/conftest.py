"""Shared fixtures: tiny random-weight models and the embedded model, all offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from framework.interfaces import LoadedModel  # noqa: E402
from framework.model.loading import load_model, prepare  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
MAX_WORKERS = 4  # each worker holds the embedded model and its runs (about 2 GiB)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): one test worker per core this process may use, at most
    :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def _share_the_cores() -> None:
    """Each test worker computes on its share of the cores, and so do the commands it starts
    (``OMP_NUM_THREADS``): two workers of two threads each on two cores would wait on each other's
    threads at every matrix product."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:  # one process (-n 0): torch's own default
        return
    threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()


def tiny_llama(seed: int = 0, **overrides) -> LoadedModel:
    """A random 3-layer Llama with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides,
    )
    return prepare(LlamaForCausalLM(config).eval(), None, "tiny_llama")


@pytest.fixture(scope="session")
def compose_config():
    """Compose the real Hydra config with overrides, as the command line would."""

    def _compose(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)

    return _compose


@pytest.fixture(scope="session")
def embedded_model(compose_config) -> LoadedModel:
    """The embedded SmolLM2 model (dequantised into the cache on first use)."""
    return load_model(compose_config()["model"])
