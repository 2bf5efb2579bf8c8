"""The core options of a composed run, checked before any run is created and before weights load.

Each refusal is one :class:`ConfigError` that names the option, the value given and what is
allowed, so a typo on the command line (``seed=abc``, ``batch_size=0``, ``model.device=cuda`` on
a machine without CUDA) never becomes a FAILED run or a traceback from deep inside numpy or torch.
Plugins validate their own options the same way in their constructors.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from framework.interfaces import ConfigError
from framework.model.loading import DTYPES as TORCH_DTYPES

_DTYPES = ("auto", *TORCH_DTYPES)


def _integer(config: Mapping[str, Any], key: str, minimum: int, meaning: str) -> None:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise ConfigError(f"{key}={value!r} is impossible: {key} expects {allowed} ({meaning})")


def _text(config: Mapping[str, Any], key: str, optional: bool) -> None:
    value = config.get(key)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}={value!r} is impossible: {key} expects a non-empty name"
                          + (" (or null)" if optional else ""))


def available_devices() -> list[str]:
    """The devices this machine can run on, as ``model.device`` accepts them."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: Any, option: str = "model.device") -> torch.device | None:
    """``model.device`` (or the ``option`` named) as a torch device (None for ``auto``), refused
    unless it exists here."""
    available = available_devices()
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or str(parsed) not in available:
        raise ConfigError(f"{option}={device!r} is not available on this machine; "
                          f"choose one of {', '.join(available)}")
    return parsed


def check_dtype(dtype: Any, device: torch.device | None) -> None:
    """``model.dtype`` must be known and supported by the device it runs on."""
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is unknown; choose one of {', '.join(_DTYPES)}")
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"model.dtype={dtype!r} is not supported by this GPU "
                          f"({torch.cuda.get_device_name()}); choose float16 or float32")


def check_model_device(model: Mapping[str, Any]) -> None:
    """A model spec's ``device`` and ``dtype`` (the training studies check theirs with this too)."""
    check_dtype(model.get("dtype", "auto"), check_device(model.get("device", "auto")))


def validate(config: Mapping[str, Any]) -> None:
    """Refuse a composed config whose core options are impossible (see the module docstring)."""
    _integer(config, "seed", 0, "it seeds the evaluation samples")
    _integer(config, "detect_seed", 0, "it seeds the detection samples")
    _integer(config, "control_seed", 0, "it draws the random controls")
    _integer(config, "batch_size", 1, "samples decoded together")
    _integer(config, "controls", 0, "the number of extra random controls")
    _text(config, "experiment", optional=False)
    _text(config, "run_name", optional=True)
    model = config.get("model")
    if not isinstance(model, Mapping) or not model.get("name"):
        raise ConfigError(f"model={model!r} is impossible: choose a model config, e.g. model=smollm2_135m")
    check_model_device(model)
