"""A plugin framework for retrieval-head and RoPE-frequency experiments, tracked in MLflow.

Plugins import :mod:`framework.api`. From Python and notebooks (:mod:`framework.notebook`)::

    import framework
    model = framework.load_model("smollm2_135m")
    result = framework.run("+experiment=claim1_causal_heads", model=model)
    result.samples, result.head_scores, result.metrics["claim/verdict"]

Those names load on first use: the command line imports this package before Hydra parses its
arguments, so importing it stays as light as the hook marker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from framework.hookspecs import hookimpl

if TYPE_CHECKING:
    from framework.interfaces import ConfigError, LoadedModel
    from framework.notebook import Detection, Result, detect, load_model, load_run, run, runs

__all__ = ["hookimpl", "run", "load_model", "detect", "load_run", "runs", "Result", "Detection", "LoadedModel",
           "ConfigError"]
_NOTEBOOK = {"run", "load_model", "detect", "load_run", "runs", "Result", "Detection"}


def __getattr__(name: str) -> Any:
    if name in _NOTEBOOK:
        from framework import notebook as source
    elif name in ("ConfigError", "LoadedModel"):
        from framework import interfaces as source
    else:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    globals()[name] = value = getattr(source, name)  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
