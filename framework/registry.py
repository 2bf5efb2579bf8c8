"""The plugin manager: loads plugins from the entry-point group and looks them up by name.

Entry points are loaded one at a time: a plugin whose import (or registration hook) fails is
reported by name with its error and disabled (:attr:`Registry.broken`), and every other plugin
keeps working.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
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


log = logging.getLogger(__name__)


class UnknownPluginError(ConfigError):
    """A config names a plugin that no installed package registers."""


@dataclass(frozen=True)
class PluginEntry:
    kind: str
    name: str
    cls: type
    source: str  # the registering plugin and its distribution, e.g. "attn_mass (retrieval-heads 0.1.0)"


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded or registered, and why."""

    name: str  # the entry point
    source: str  # the entry point and its distribution, e.g. "my_task (my-plugins 0.2)"
    error: str  # "ModuleNotFoundError: No module named 'x'"


class Registry:
    """All registered plugin classes, by kind and name, and the plugins that are disabled."""

    def __init__(self, manager: pluggy.PluginManager, broken: Mapping[str, BrokenPlugin] | None = None):
        self.manager = manager
        self.entries: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
        self.broken: dict[str, BrokenPlugin] = dict(broken or {})
        distributions = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
        for kind, (hook_name, base) in KINDS.items():
            hook = getattr(manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                name = manager.get_name(impl.plugin) or repr(impl.plugin)
                source = name
                dist = distributions.get(id(impl.plugin))
                if dist is not None:
                    source += f" ({dist.project_name} {dist.version})"
                if name in self.broken:
                    continue
                registered = {k: dict(v) for k, v in self.entries.items()}
                try:
                    impl.function(register=self._registrar(kind, base, source))
                except ConfigError:
                    raise  # a taken name: the user must choose, not lose a plugin silently
                except Exception as error:  # noqa: BLE001 - any failure of third-party code disables it
                    self.entries = registered  # nothing half-registered stays
                    self._disable(name, source, error)
        for name in self.broken:
            for kind in self.entries.values():
                for key in [k for k, entry in kind.items() if entry.source.split(" ", 1)[0] == name]:
                    del kind[key]

    def _disable(self, name: str, source: str, error: BaseException) -> None:
        self.broken[name] = BrokenPlugin(name, source, f"{type(error).__name__}: {error}")
        log.warning("plugin %s is disabled: %s", source, self.broken[name].error)

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
            broken = "".join(f"; disabled because it failed to load: {b.source}: {b.error}" for b in self.broken.values())
            raise UnknownPluginError(
                f"unknown {kind} {name!r}; available {kind} plugins: {available}{broken}"
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


def load_plugins(manager: pluggy.PluginManager) -> dict[str, BrokenPlugin]:
    """Load every entry point of the group into ``manager``, one at a time; return those whose
    import failed, by name (the others are loaded all the same)."""
    broken = {}
    for point in entry_points(group=hookspecs.PROJECT):
        if manager.get_plugin(point.name) is not None or point.name in broken:
            continue  # the first distribution to name an entry point wins, as pluggy does
        try:
            manager.load_setuptools_entrypoints(hookspecs.PROJECT, name=point.name)
        except Exception as error:  # noqa: BLE001 - a plugin's import can fail in any way
            dist = point.dist
            source = f"{point.name} ({dist.name} {dist.version})" if dist is not None else point.name
            broken[point.name] = BrokenPlugin(point.name, source, f"{type(error).__name__}: {error}")
            log.warning("plugin %s is disabled: its import failed: %s", source, broken[point.name].error)
    return broken


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry, with every plugin of the entry-point group that loads."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return Registry(manager, load_plugins(manager))


def create_plugin(kind: str, node: Mapping[str, Any]) -> Any:
    """A plugin instance from a config node (``{"name": ..., <parameters>}``), e.g. for a plugin
    that builds another one: a detector that needs the run's task, an intervention fitted by a
    detector."""
    return get_registry().create(kind, node)
