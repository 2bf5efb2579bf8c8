"""The plugin manager: loads plugins from the entry-point group and looks them up by name."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import pluggy

from framework import hookspecs
from framework.interfaces import ConfigError, Detector, Intervention, StatTest, Task

# plugin kind (== Hydra config group) -> (registration hook, base class)
KINDS: dict[str, tuple[str, type]] = {
    "detector": ("register_detectors", Detector),
    "intervention": ("register_interventions", Intervention),
    "task": ("register_tasks", Task),
    "stats": ("register_stats", StatTest),
}


class UnknownPluginError(ConfigError):
    """A config names a plugin that no installed package registers."""


@dataclass(frozen=True)
class PluginEntry:
    kind: str
    name: str
    cls: type
    source: str  # the registering plugin and its distribution, e.g. "attn_mass (retrieval-heads 0.1.0)"


class Registry:
    """All registered plugin classes, by kind and name."""

    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self.entries: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
        distributions = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
        for kind, (hook_name, base) in KINDS.items():
            hook = getattr(manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                source = manager.get_name(impl.plugin) or repr(impl.plugin)
                dist = distributions.get(id(impl.plugin))
                if dist is not None:
                    source += f" ({dist.project_name} {dist.version})"
                impl.function(register=self._registrar(kind, base, source))

    def _registrar(self, kind: str, base: type, source: str):
        def register(name: str, cls: type) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"{source} registers {kind} {name!r} as {cls!r}, not a {base.__name__}")
            taken = self.entries[kind].get(name)
            if taken is not None:
                raise ConfigError(
                    f"{kind} {name!r} from {source} is refused: the name is already taken by {taken.source}"
                )
            cls.name = name
            self.entries[kind][name] = PluginEntry(kind, name, cls, source)

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> PluginEntry:
        try:
            return self.entries[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "(none installed)"
            raise UnknownPluginError(
                f"unknown {kind} {name!r}; available {kind} plugins: {available}"
            ) from None

    def create(self, kind: str, node: Mapping[str, Any]) -> Any:
        """Instantiate the plugin a config node names, passing its other keys as parameters."""
        params = dict(node)
        name = params.pop("name", None)
        if name is None:
            raise ConfigError(f"the {kind} config has no 'name' key")
        entry = self.get(kind, name)
        try:
            return entry.cls(**params)
        except TypeError as error:
            raise ConfigError(f"{kind} {name!r} rejects its parameters {sorted(params)}: {error}") from None


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry, with every plugin of the entry-point group loaded."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    return Registry(manager)
