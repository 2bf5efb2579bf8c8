"""The plugin manager loads built-ins through the real entry-point group and finds them by name."""

from __future__ import annotations

from importlib.metadata import distribution, entry_points

import pluggy
import pytest

from framework import hookimpl, hookspecs
from framework.interfaces import ConfigError, Detector
from framework.registry import Registry, UnknownPluginError, get_registry, load_plugins


def test_builtins_come_from_the_entry_point_group():
    """Every entry point of this distribution registers from its own module; plugins of other
    installed distributions may be registered next to them."""
    own = {ep.name: ep.value for ep in distribution("retrieval-heads").entry_points if ep.group == hookspecs.PROJECT}
    group = {ep.name: ep.value for ep in entry_points(group=hookspecs.PROJECT)}
    registry = get_registry()
    registered = [entry for kind in registry.entries.values() for entry in kind.values()]
    for entry in registered:
        plugin_name, source = entry.source.split(" ", 1)
        assert entry.cls.__module__ == group[plugin_name]
        assert source.startswith("(retrieval-heads ") == (plugin_name in own)
    assert set(own) <= {entry.source.split(" ", 1)[0] for entry in registered}
    assert not set(own) & set(registry.broken)
    assert {"attn_mass", "qnorm", "retrieval_score", "utility"} <= set(registry.names("detector"))
    assert {"head_mask", "zero_lowfreq"} <= set(registry.names("intervention"))
    assert {"niah", "passkey"} <= set(registry.names("task"))
    assert {"mcnemar", "permutation"} <= set(registry.names("stats"))


def test_unknown_name_lists_the_available_plugins():
    with pytest.raises(UnknownPluginError, match="unknown detector .nope.; available detector plugins: attn_mass, "):
        get_registry().get("detector", "nope")


def test_create_passes_config_keys_and_rejects_unknown_ones():
    registry = get_registry()
    detector = registry.create("detector", {"name": "attn_mass", "threshold": None, "top_k": 3})
    assert detector.top_k == 3 and detector.name == "attn_mass"
    with pytest.raises(ConfigError, match="attn_mass.*rejects its parameters.*'topk'"):
        registry.create("detector", {"name": "attn_mass", "topk": 3})


class _Impostor:
    class AttnMass(Detector):
        def detect(self, model, samples):
            raise NotImplementedError

    @staticmethod
    @hookimpl
    def register_detectors(register):
        register("attn_mass", _Impostor.AttnMass)


def test_a_taken_name_is_refused_naming_both_sources():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    manager.register(_Impostor, name="impostor-plugin")
    with pytest.raises(ConfigError, match="from (impostor-plugin|attn_mass) is refused.*taken by (attn_mass|impostor-plugin)"):
        Registry(manager)


FINE = '''
from framework.api import Detector, hookimpl

class Fine(Detector):
    def detect(self, model, samples):
        raise NotImplementedError

@hookimpl
def register_detectors(register):
    register("fine_detector", Fine)
'''
BROKEN_IMPORT = "import not_installed_dependency\n"


def test_a_plugin_whose_import_fails_is_disabled_by_name_and_the_others_load(tmp_path, monkeypatch, caplog):
    from test_third_party import make_distribution

    site = make_distribution(tmp_path, "mixed-plugins", "fine_module", FINE,
                             {"fine_one": "fine_module", "broken_one": "broken_module"})
    (site / "broken_module.py").write_text(BROKEN_IMPORT)
    monkeypatch.syspath_prepend(str(site))
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager, load_plugins(manager))
    assert list(registry.broken) == ["broken_one"]
    broken = registry.broken["broken_one"]
    assert broken.source == "broken_one (mixed-plugins 0.1)"
    assert broken.error == "ModuleNotFoundError: No module named 'not_installed_dependency'"
    assert "plugin broken_one (mixed-plugins 0.1) is disabled" in caplog.text
    assert "fine_detector" in registry.names("detector") and "attn_mass" in registry.names("detector")
    assert {"niah", "passkey"} <= set(registry.names("task"))
    with pytest.raises(UnknownPluginError, match="disabled because it failed to load: broken_one .mixed-plugins 0.1.: "
                                                 "ModuleNotFoundError"):
        registry.get("task", "their_task")


class _FailsToRegister:
    class Good(Detector):
        def detect(self, model, samples):
            raise NotImplementedError

    @staticmethod
    @hookimpl
    def register_detectors(register):
        register("half_registered", _FailsToRegister.Good)
        raise RuntimeError("the registration broke")


def test_a_plugin_whose_registration_fails_is_disabled_with_nothing_half_registered():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    manager.register(_FailsToRegister, name="fails-to-register")
    registry = Registry(manager)
    assert registry.broken["fails-to-register"].error == "RuntimeError: the registration broke"
    assert "half_registered" not in registry.names("detector") and "attn_mass" in registry.names("detector")
