"""Model loading: the embedded GGUF model (dequantised once, then cached) and hub models.

Device and dtype default to ``auto``: CUDA + bfloat16 where a GPU is present, else CPU +
float32. Both can be overridden from the ``model`` config group.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from framework import attention
from framework.interfaces import ConfigError, LoadedModel, ModelInfo
from framework.rope import model_inv_freq

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where dequantised embedded models are kept (``RETRIEVAL_HEADS_CACHE`` overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retrieval_heads"
    return Path(os.environ.get("RETRIEVAL_HEADS_CACHE", default))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is unknown; choose auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _gguf_location(spec: Mapping[str, Any]) -> tuple[Path, str]:
    """Folder and file name of a model's GGUF. A package either ships the file itself or, split
    into parts, offers ``assemble(path)`` that joins and verifies them (``gguf_assemble: true``)."""
    package = spec["gguf_package"]
    found = importlib.util.find_spec(package)  # locate without importing the package
    if found is None or found.origin is None:
        raise ConfigError(
            f"model {spec['name']!r} needs the package {package!r}; run the README's set-up command"
            + (f" with {spec['setup_extra']}" if spec.get("setup_extra") else "")
        )
    if spec.get("gguf_assemble"):
        target = cache_root() / "gguf" / spec["gguf_file"]
        importlib.import_module(package).assemble(target)
        return target.parent, target.name
    folder = Path(found.origin).parent
    if not (folder / spec["gguf_file"]).exists():
        raise ConfigError(f"{folder / spec['gguf_file']} is missing from package {package!r}")
    return folder, spec["gguf_file"]


def _dequantised_dir(spec: Mapping[str, Any]) -> Path:
    """The cached float copy of an embedded GGUF model, created on first use."""
    target = cache_root() / spec["name"]
    if (target / "config.json").exists():
        return target
    folder, gguf_file = _gguf_location(spec)
    log.info("dequantising %s once into %s", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec['name']}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent run either sees all of it or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _source(spec: Mapping[str, Any]) -> tuple[str | Path, dict[str, Any]]:
    if spec.get("hub_id"):
        return spec["hub_id"], {"revision": spec.get("revision")}
    if spec.get("gguf_package"):
        return _dequantised_dir(spec), {}
    raise ConfigError(f"model {spec.get('name')!r} needs either hub_id or gguf_package + gguf_file")


def _rope_theta(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in params:  # per-layer-type parameters (e.g. Gemma-3): use the global layers'
        params = params.get("full_attention", {}) if isinstance(params, dict) else {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def info_from_config(name: str, config: Any) -> ModelInfo:
    config = getattr(config, "text_config", config)
    n_heads = config.num_attention_heads
    return ModelInfo(
        name=name,
        family=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        rope_theta=_rope_theta(config),
    )


def _light_source(spec: Mapping[str, Any]) -> tuple[str | Path, dict[str, Any]]:
    """Where config and tokenizer come from without dequantising anything: the cached copy if
    it exists, else the GGUF file itself."""
    if spec.get("gguf_package") and not (cache_root() / spec["name"] / "config.json").exists():
        folder, gguf_file = _gguf_location(spec)
        return folder, {"gguf_file": gguf_file}
    return _source(spec)


def model_config(spec: Mapping[str, Any]) -> Any:
    """The model's transformers config alone (no weights)."""
    source, kwargs = _light_source(spec)
    return AutoConfig.from_pretrained(source, **kwargs)


def load_tokenizer(spec: Mapping[str, Any]) -> Any:
    """The model's tokenizer alone (no weights), e.g. to build a run's samples before it starts."""
    source, kwargs = _light_source(spec)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def model_info(spec: Mapping[str, Any]) -> ModelInfo:
    """Architecture facts from the config alone, for validating a run before loading weights."""
    return info_from_config(spec["name"], model_config(spec))


def load_model(spec: Mapping[str, Any]) -> LoadedModel:
    """Load weights and tokenizer on the configured device, with instrumented attention."""
    device = resolve_device(spec.get("device", "auto"))
    dtype = resolve_dtype(spec.get("dtype", "auto"), device)
    source, kwargs = _source(spec)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device)
    return prepare(model, tokenizer, spec["name"])


def prepare(model: torch.nn.Module, tokenizer: Any, name: str) -> LoadedModel:
    """Wrap an already built model (e.g. a tiny random one in tests) for framework runs."""
    model.eval()
    attention.install(model)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        info=info_from_config(name, model.config),
        inv_freq=model_inv_freq(model),
    )
