from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from plugin_fixtures import ROT13_PLUGIN, write_distribution

from worq_core import (
    DuplicatePluginError,
    PluginError,
    Registry,
    Serializer,
    UnknownPluginError,
    Worq,
    hookimpl,
)
from worq_core.registry import PluginLoadWarning, default_registry
from worq_core.serializers import JsonSerializer, MsgpackSerializer
from worq_memory import MemoryBroker, MemoryStorage


def plugin(**hooks: Any) -> types.SimpleNamespace:
    """A plugin object whose hooks return the given classes."""
    namespace = types.SimpleNamespace()
    for hook, classes in hooks.items():
        setattr(namespace, hook, hookimpl(lambda classes=classes: classes))
    return namespace


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("throwaway_")]:
        del sys.modules[name]


def install(site: Path, name: str, source: str, version: str = "1.0") -> None:
    """Distribution ``throwaway-<name>``: module ``throwaway_<name>``, entry point ``<name>``."""
    module = f"throwaway_{name}"
    write_distribution(site, f"throwaway-{name}", version, {module: source}, {name: module})


def test_the_installed_distributions_register_memory_msgpack_and_json() -> None:
    registry = Registry.from_entry_points(strict=True)
    by_dist = {p.distribution: {c.name for c in p.components} for p in registry.plugins}
    assert by_dist["worq-core"] >= {"msgpack", "json"}
    assert by_dist["worq-memory"] == {"memory"}
    assert registry.broker_class("memory://") is MemoryBroker
    assert registry.storage_class("memory://") is MemoryStorage


def test_a_third_party_distribution_is_found_through_its_entry_point_and_used_by_name(
    site: Path,
) -> None:
    install(site, "rot13", ROT13_PLUGIN)
    registry = Registry.from_entry_points(strict=True)
    [record] = [p for p in registry.plugins if p.distribution == "throwaway-rot13"]
    assert (record.version, [c.name for c in record.components]) == ("1.0", ["rot13-json"])

    app = Worq("memory://", serializer="rot13-json", registry=registry)

    @app.task
    def shout(text: str) -> str:
        return text.upper()

    job = shout.enqueue("hello")
    app.worker(concurrency=1).run(burst=True)
    assert job.result(timeout=5) == "HELLO"
    assert type(app.serializer).__name__ == "Rot13Serializer"


def test_each_distribution_s_metadata_is_parsed_once(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Distribution.name and .version each parse the whole METADATA file (a README included):
    # on a worker's start-up path, so the registry reads a distribution's name and version once.
    install(site, "rot13", ROT13_PLUGIN)
    parsed: Counter[str] = Counter()
    metadata = importlib.metadata.Distribution.metadata

    def counted(dist: importlib.metadata.Distribution) -> Any:
        found = metadata.fget(dist)  # type: ignore[attr-defined]
        parsed[found["Name"]] += 1
        return found

    monkeypatch.setattr(importlib.metadata.Distribution, "metadata", property(counted))
    registry = Registry.from_entry_points(lazy=True)
    registry.broker_class("memory://")
    assert {p.distribution: p.version for p in registry.plugins}["throwaway-rot13"] == "1.0"
    assert parsed["worq-core"] == parsed["throwaway-rot13"] == 1
    assert set(parsed.values()) == {1}


def test_a_plugin_that_fails_to_import_warns_with_its_distribution_and_the_rest_load(
    site: Path,
) -> None:
    install(site, "broken", "raise ImportError('no libfoo')", version="0.3")
    with pytest.warns(PluginLoadWarning, match=r"throwaway-broken 0\.3.*no libfoo"):
        registry = Registry.from_entry_points()
    assert registry.serializer_class("msgpack") is MsgpackSerializer
    assert [p.error for p in registry.plugins if p.distribution == "throwaway-broken"] != [None]


def test_strict_mode_turns_a_broken_plugin_into_an_error(site: Path) -> None:
    install(site, "broken", "1 / 0", version="0.3")
    with pytest.raises(PluginError, match="throwaway-broken"):
        Registry.from_entry_points(strict=True)


# -- loading plugins when a lookup needs them (default_registry) -------------------------------


def broker_plugin(*schemes: str) -> str:
    """The source of a plugin registering a broker for ``schemes``."""
    return f"""
        from worq_core import hookimpl
        from worq_memory import MemoryBroker

        class ThrowawayBroker(MemoryBroker):
            name = "throwaway"
            schemes = {schemes!r}

        @hookimpl
        def worq_register_brokers():
            return [ThrowawayBroker]
    """


def test_a_lazy_registry_imports_a_plugin_only_when_a_lookup_needs_it(site: Path) -> None:
    install(site, "rot13", ROT13_PLUGIN)
    registry = Registry.from_entry_points(strict=True, lazy=True)
    assert registry.broker_class("memory://") is MemoryBroker
    assert registry.serializer_class("msgpack") is MsgpackSerializer
    assert "throwaway_rot13" not in sys.modules  # worq-core's and worq-memory's were enough

    assert registry.serializer_class("rot13-json").__name__ == "Rot13Serializer"
    assert "throwaway_rot13" in sys.modules  # a name worq-core lacks: every plugin loaded
    assert "throwaway-rot13" in {p.distribution for p in registry.plugins}


def test_a_lazy_registry_warns_of_a_broken_plugin_when_it_loads_it(site: Path) -> None:
    install(site, "broken", "raise ImportError('no libfoo')", version="0.3")
    registry = Registry.from_entry_points(lazy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        assert registry.broker_class("memory://") is MemoryBroker
    with pytest.warns(PluginLoadWarning, match=r"throwaway-broken 0\.3.*no libfoo") as caught:
        records = registry.plugins
    assert [p.error for p in records if p.distribution == "throwaway-broken"] != [None]
    # It names the line that made the lookup, not a line of worq-core's.
    assert [w.filename for w in caught] == [__file__]


def test_a_broken_plugin_s_warning_names_the_app_code_whose_lookup_loaded_it(site: Path) -> None:
    install(site, "broken", "raise ImportError('no libfoo')", version="0.3")
    default_registry.cache_clear()
    try:
        app = Worq("throwaway-nosuch://")  # a scheme none of ours serves: every plugin loads
        with (
            pytest.warns(PluginLoadWarning, match="no libfoo") as caught,
            pytest.raises(UnknownPluginError),
        ):
            _ = app.broker
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, _line_of("app.broker"))]
    finally:
        default_registry.cache_clear()


def _line_of(text: str) -> int:
    """The number of the line of this file that holds ``text`` after ``_ = ``."""
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.strip() == f"_ = {text}")


def test_a_lazy_registry_loads_every_plugin_for_a_scheme_none_of_ours_serves(site: Path) -> None:
    install(site, "broker", broker_plugin("throwaway"), version="2.0")
    registry = Registry.from_entry_points(lazy=True)
    assert registry.broker_class("throwaway://").__name__ == "ThrowawayBroker"
    with pytest.raises(UnknownPluginError) as error:
        registry.broker_class("nosuch://x")
    assert "throwaway://" in error.value.available
    assert "memory://" in error.value.available


def test_a_clash_with_a_plugin_not_loaded_yet_is_found_once_both_load(site: Path) -> None:
    # It also claims redis://: an eager registry refuses the pair at once; a lazy one finds
    # the clash when it loads both, here for a scheme only the third party serves.
    install(site, "broker", broker_plugin("throwaway", "redis"), version="2.0")
    if importlib.util.find_spec("worq_redis") is None:
        pytest.skip("worq-redis is not installed")
    with pytest.raises(DuplicatePluginError, match="redis"):
        Registry.from_entry_points()
    registry = Registry.from_entry_points(lazy=True)
    assert registry.broker_class("memory://") is MemoryBroker
    # Found at the first lookup that loads both, and no half registry after that: worq does
    # not guess, however the lookups go on.
    for lookup in ("throwaway://", "redis://", "memory://"):
        with pytest.raises(DuplicatePluginError, match="redis"):
            registry.broker_class(lookup)


REENTRANT_PLUGIN = """
    from worq_core import hookimpl
    from worq_core.errors import UnknownPluginError
    from worq_core.registry import default_registry

    # A plugin that looks a name up while it loads: a name nobody serves loads every other
    # plugin first, inside the load of this one.
    try:
        default_registry().serializer_class("nosuch")
    except UnknownPluginError:
        pass

    @hookimpl
    def worq_register_serializers():
        return []
"""


def test_a_plugin_may_look_up_names_while_the_default_registry_loads_it(site: Path) -> None:
    # Two such plugins: whichever loads first loads the other from inside its own load.
    for name in ("a", "b"):
        install(site, name, REENTRANT_PLUGIN)
    default_registry.cache_clear()
    try:
        records = {p.distribution: p.error for p in default_registry().plugins}
        assert records["throwaway-a"] is None
        assert records["throwaway-b"] is None
    finally:
        default_registry.cache_clear()


def test_two_plugins_registering_one_name_is_an_error_naming_both() -> None:
    class Other(JsonSerializer):
        name: ClassVar[str] = "json"

    registry = Registry()
    registry.register(plugin(worq_register_serializers=[JsonSerializer]), distribution="dist-a")
    with pytest.raises(DuplicatePluginError) as error:
        registry.register(plugin(worq_register_serializers=[Other]), distribution="dist-b")
    assert (error.value.first, error.value.second) == ("dist-a", "dist-b")
    assert "dist-a" in str(error.value)
    assert "dist-b" in str(error.value)


def test_two_brokers_claiming_one_scheme_is_an_error() -> None:
    class Clash(MemoryBroker):
        name: ClassVar[str] = "clash"

    registry = Registry()
    registry.register(plugin(worq_register_brokers=[MemoryBroker]), distribution="dist-a")
    with pytest.raises(DuplicatePluginError, match="memory://"):
        registry.register(plugin(worq_register_brokers=[Clash]), distribution="dist-b")


@pytest.mark.parametrize(
    ("hook", "cls", "complaint"),
    [
        ("worq_register_serializers", MemoryBroker, "not a subclass of worq_core.Serializer"),
        ("worq_register_serializers", Serializer, "does not implement: dumps, loads"),
        ("worq_register_brokers", type("NoSchemes", (MemoryBroker,), {"schemes": ()}), "no URL"),
        ("worq_register_serializers", type("Bad", (JsonSerializer,), {"name": "Bad Name"}), "name"),
    ],
    ids=["wrong-base", "abstract", "no-schemes", "bad-name"],
)
def test_invalid_plugin_classes_are_rejected_with_the_reason(
    hook: str, cls: type, complaint: str
) -> None:
    registry = Registry()
    with pytest.raises(PluginError, match=complaint):
        registry.register(plugin(**{hook: [cls]}), distribution="dist-x")
    assert registry.components("serializer") == []


def test_a_hook_returning_a_class_instead_of_a_list_is_rejected() -> None:
    with pytest.raises(PluginError, match="iterable of classes"):
        Registry().register(plugin(worq_register_serializers=JsonSerializer))


def test_an_unknown_scheme_names_the_distribution_to_install() -> None:
    registry = Registry()
    registry.register(plugin(worq_register_brokers=[MemoryBroker]))
    with pytest.raises(UnknownPluginError) as error:
        registry.broker_class("redis://localhost:6379/0")
    assert str(error.value).startswith("redis:// needs worq-redis: pip install worq-redis")
    assert error.value.available == ["memory://"]
    with pytest.raises(UnknownPluginError, match="pip install worq-postgres"):
        registry.broker_class("postgresql://127.0.0.1/app")


def test_an_unknown_serializer_lists_the_available_ones() -> None:
    registry = Registry()
    registry.register(plugin(worq_register_serializers=[MsgpackSerializer, JsonSerializer]))
    with pytest.raises(UnknownPluginError, match="available: json, msgpack"):
        _ = Worq(serializer="pickle", registry=registry).serializer


def test_a_url_without_a_scheme_is_refused() -> None:
    with pytest.raises(UnknownPluginError, match="localhost:6379"):
        Registry().broker_class("localhost:6379")


# -- CLI commands from plugins -----------------------------------------------------------------


def test_a_plugin_adds_cli_commands_by_name() -> None:
    import click

    @click.command("hello")
    def hello() -> None: ...

    registry = Registry()
    record = registry.register(plugin(worq_register_commands=[hello]), distribution="dist-a")
    assert record.commands == ["hello"]
    assert registry.commands() == {"hello": hello}


def test_a_command_name_taken_by_another_plugin_is_refused_and_nothing_is_added() -> None:
    import click

    first, second = click.Command("admin"), click.Command("admin")
    registry = Registry()
    registry.register(plugin(worq_register_commands=[first]), distribution="dist-a")
    with pytest.raises(DuplicatePluginError, match=r"command 'admin'.*dist-a.*dist-b"):
        registry.register(
            plugin(worq_register_commands=[second], worq_register_serializers=[JsonSerializer]),
            distribution="dist-b",
        )
    assert registry.commands() == {"admin": first}
    assert [p.distribution for p in registry.plugins] == ["dist-a"]


@pytest.mark.parametrize("returned", [["not a command"], "admin", 42])
def test_a_command_hook_must_return_click_commands(returned: object) -> None:
    with pytest.raises(PluginError, match="click"):
        Registry().register(plugin(worq_register_commands=returned))
