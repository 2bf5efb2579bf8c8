"""List the installed plugins: ``python -m framework.list_plugins`` (or ``retrieval-heads-plugins``).

For each kind: every registered name, the plugin module and distribution it comes from, and its
config options as Hydra finds them: in ``conf/`` or in a directory that an installed package adds
to the config search path. A name without a config, or a config without a plugin, is flagged:
either half alone cannot be used with ``+<kind>=<name>``. A plugin whose import failed is listed
as broken, with its error, and disabled; the others are listed as usual.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from framework.interfaces import ConfigError
from framework.registry import KINDS, get_registry
from framework.runner.stat_choice import AUTO
from framework.tracking.runs import flatten

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _options(kind: str, config: dict[str, Any]) -> str:
    """``detector.threshold=0.5 detector.top_k=null``: the overrides that set each option."""
    flat = {key: value for key, value in flatten(config, f"{kind}.").items() if not key.endswith(".name")}
    return " ".join(f"{key}={_literal(value)}" for key, value in flat.items())


def _literal(value: Any) -> str:
    """A value as it is written on the command line (flatten() has already JSON-encoded lists)."""
    return value if isinstance(value, str) else json.dumps(value)


def plugin_configs() -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """(kind, option) -> (the search-path provider it comes from, its config), for every config
    group named after a plugin kind."""
    found = {}
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for kind in KINDS:
            for option in loader.get_group_options(kind):
                source = next(s for s in loader.get_sources() if s.is_config(f"{kind}/{option}"))
                config = source.load_config(f"{kind}/{option}").config
                found[kind, option] = source.provider, OmegaConf.to_container(config)
    return found


def describe_plugins() -> str:
    registry, configs = get_registry(), plugin_configs()
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        names = sorted(set(registry.names(kind)) | {option for k, option in configs if k == kind})
        for name in names:
            entry = registry.entries[kind].get(name)
            if kind == "stats" and name == AUTO:
                source = "framework: the tests listed for the task's score kind (framework/runner/stat_choice.py)"
            else:
                source = entry.source if entry else "(no installed plugin registers this name)"
            lines.append(f"  {name}  from {source}")
            if (kind, name) in configs:
                provider, config = configs[kind, name]
                lines.append(f"      config {kind}/{name} ({provider}): {_options(kind, config) or '(no options)'}")
            else:
                lines.append(f"      no config {kind}/{name}.yaml on the config search path")
    if registry.broken:
        lines.append("broken (disabled; every other plugin works):")
        lines += [f"  {plugin.source}: {plugin.error}" for plugin in registry.broken.values()]
    return "\n".join(lines)


def main() -> None:
    try:
        print(describe_plugins())
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
