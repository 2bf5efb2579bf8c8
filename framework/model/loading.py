"""Model loading: the embedded GGUF model (dequantised once, then cached) and hub models.

Device and dtype default to ``auto``: CUDA + bfloat16 where a GPU is present, else CPU +
float32. Both can be overridden from the ``model`` config group.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from framework.interfaces import ConfigError, LoadedModel, ModelInfo
from framework.model import attention
from framework.model.rope import model_inv_freq

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is unknown; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


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


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (missing, truncated, unreadable header), or None: its
    size must be exactly what its header describes (8 bytes, the header, the tensor data)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 + length:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(file.read(length))
    except (OSError, ValueError) as error:
        return f"{path.name} cannot be read ({error})"
    end = max((t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"), default=0)
    if size != 8 + length + end:
        return f"{path.name} has {size} bytes where its header describes {8 + length + end}"
    return None


def cache_problem(folder: Path) -> str | None:
    """What is wrong with a cached model folder, or None when it is complete: a full disk or a
    run killed while writing it leaves files missing or truncated."""
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    index = folder / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    except (OSError, ValueError, KeyError) as error:
        return f"{index.name} cannot be read ({error})"
    return next(filter(None, (_safetensors_problem(folder / shard) for shard in shards)), None)


def _discard_damaged(spec: Mapping[str, Any], target: Path, problem: str) -> None:
    """Move a damaged cache entry out of the way so that it is rebuilt; where it cannot be
    rebuilt or removed, say which folder to remove."""
    damaged = f"the cached copy of model {spec['name']!r} in {target} is damaged ({problem})"
    try:
        _gguf_location(spec)  # the source it is rebuilt from
    except ConfigError as error:
        raise ConfigError(f"{damaged} and cannot be rebuilt here: {error}; then remove the folder {target}") from None
    log.warning("%s; rebuilding it", damaged)
    trash = target.with_name(f".{target.name}-damaged-{os.getpid()}")
    try:
        target.rename(trash)  # atomic: a concurrent run sees the damaged entry or none
    except FileNotFoundError:  # a concurrent run moved it first
        return
    except OSError as error:
        raise ConfigError(f"{damaged} and cannot be moved aside ({error}); remove the folder {target}") from None
    shutil.rmtree(trash, ignore_errors=True)


def _dequantised_dir(spec: Mapping[str, Any]) -> Path:
    """The cached float copy of an embedded GGUF model, created on first use, verified on every
    use and rebuilt when damaged."""
    target = cache_root() / spec["name"]
    if target.exists():
        problem = cache_problem(target)
        if problem is None:
            return target
        _discard_damaged(spec, target, problem)
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


def prepare_source(spec: Mapping[str, Any]) -> None:
    """Make the model's weights loadable: an embedded model is dequantised into the cache once
    (or rebuilt there if damaged), so that timing a load afterwards times the load alone."""
    _source(spec)


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


def intact_cache(spec: Mapping[str, Any]) -> Path | None:
    """The embedded model's cached copy if it is complete, else None, checked without writing
    anything: a damaged copy that can be rebuilt is rebuilt when the weights load, one that
    cannot is refused here, before any model work."""
    target = cache_root() / spec["name"]
    if not target.exists():
        return None
    problem = cache_problem(target)
    if problem is None:
        return target
    try:
        _gguf_location(spec)
    except ConfigError as error:
        raise ConfigError(f"the cached copy of model {spec['name']!r} in {target} is damaged ({problem}) and cannot "
                          f"be rebuilt here: {error}; then remove the folder {target}") from None
    return None


def _light_source(spec: Mapping[str, Any]) -> tuple[str | Path, dict[str, Any]]:
    """Where config and tokenizer come from without dequantising or writing anything: the cached
    copy if it is intact, else the GGUF file itself."""
    if spec.get("gguf_package"):
        cached = intact_cache(spec)
        if cached is not None:
            return cached, {}
        folder, gguf_file = _gguf_location(spec)
        return folder, {"gguf_file": gguf_file}
    return _source(spec)


_CONFIGS: dict[str, Any] = {}


def model_config(spec: Mapping[str, Any]) -> Any:
    """The model's transformers config alone (no weights), read once per process and source
    (from a GGUF file it takes seconds)."""
    source, kwargs = _light_source(spec)
    key = json.dumps([str(source), kwargs], sort_keys=True, default=str)
    if key not in _CONFIGS:
        _CONFIGS[key] = AutoConfig.from_pretrained(source, **kwargs)
    return copy.deepcopy(_CONFIGS[key])  # callers may change their copy


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
