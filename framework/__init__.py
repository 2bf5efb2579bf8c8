"""A plugin framework for retrieval-head and RoPE-frequency experiments, tracked in MLflow."""

from framework.hookspecs import hookimpl

__all__ = ["hookimpl"]
