"""The plugin registry: which brokers, serializers and storages are installed.

Nothing is loaded at import time. :func:`default_registry` reads the ``worq`` entry-point group
on first use and caches the registry; it loads a plugin when a lookup needs it (see
:meth:`Registry.from_entry_points`). Tests build a fresh :class:`Registry` and
:meth:`Registry.register` plugins by hand, without entry points.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pluggy

from worq_core import hookspecs
from worq_core.broker import Broker
from worq_core.errors import DuplicatePluginError, PluginError, UnknownPluginError
from worq_core.middleware import Middleware
from worq_core.serializer import Serializer
from worq_core.storage import Storage

Kind = Literal["broker", "serializer", "storage", "middleware"]
_BASES: dict[Kind, type] = {
    "broker": Broker,
    "serializer": Serializer,
    "storage": Storage,
    "middleware": Middleware,
}
_HOOKS: dict[Kind, str] = {
    "broker": "worq_register_brokers",
    "serializer": "worq_register_serializers",
    "storage": "worq_register_storages",
    "middleware": "worq_register_middleware",
}
_NEEDS_SCHEMES = ("broker", "storage")
_NAME = re.compile(r"^[a-z][a-z0-9_.+-]*$")

#: Distributions that serve well-known URL schemes, for "pip install ..." hints.
KNOWN_SCHEMES = {
    "memory": "worq-memory",
    "redis": "worq-redis",
    "rediss": "worq-redis",
    "unix": "worq-redis",
    "redis+sentinel": "worq-redis",
    "rediss+sentinel": "worq-redis",
    "redis+cluster": "worq-redis",
    "rediss+cluster": "worq-redis",
    "postgresql": "worq-postgres",
    "postgres": "worq-postgres",
}

T = TypeVar("T")

_Found = tuple[importlib.metadata.EntryPoint, str, str]  # with its distribution and version


class PluginLoadWarning(UserWarning):
    """An installed plugin failed to load; the others were loaded regardless."""


@dataclass(frozen=True, slots=True)
class Component:
    """One class a plugin registered."""

    kind: Kind
    name: str
    cls: type
    distribution: str
    schemes: tuple[str, ...] = ()


@dataclass(slots=True)
class PluginRecord:
    """One loaded plugin (an entry point, or an object registered by hand)."""

    name: str
    distribution: str
    version: str
    components: list[Component] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    """Names of the ``worq`` CLI commands it adds (``worq_register_commands``)."""
    error: str | None = None


class Registry:
    """Brokers, serializers and storages by name and URL scheme.

    Thread-safe for lookups, which may load plugins still pending; registering by hand is
    meant for start-up and tests.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._plugins: list[PluginRecord] = []
        self._pending: list[_Found] = []  # found, not loaded yet
        self._loading = threading.RLock()  # re-entrant: a plugin may look up while it loads
        self._broken: PluginError | None = None  # raised again by every lookup once raised
        self._manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._manager.add_hookspecs(hookspecs)
        self._by_name: dict[Kind, dict[str, Component]] = {kind: {} for kind in _BASES}
        self._by_scheme: dict[Kind, dict[str, Component]] = {"broker": {}, "storage": {}}
        self._commands: dict[str, tuple[Any, str]] = {}  # name -> (click command, distribution)

    @classmethod
    def from_entry_points(cls, *, strict: bool = False, lazy: bool = False) -> Registry:
        """Build a registry from every installed ``worq`` entry point.

        A plugin that fails to import or register gives a :class:`PluginLoadWarning` naming its
        distribution and the error, and the others still load; with ``strict=True`` it raises
        :class:`~worq_core.errors.PluginError` instead.

        With ``lazy=True`` (what :func:`default_registry` does) the entry points are read now
        and each plugin is imported when a lookup needs it: a URL whose scheme one of worq's
        own distributions serves (:data:`KNOWN_SCHEMES`) loads worq-core's plugins and that
        distribution's; any other lookup, and :attr:`plugins`, :meth:`components` and
        :meth:`commands`, load them all. An app on ``memory://`` then never imports redis-py
        because worq-redis is installed. A clash (two plugins claiming one name or scheme) is
        found when both are loaded, so a third-party plugin claiming ``redis://`` is not
        consulted while worq-redis serves it; ``worq plugins`` loads every plugin and shows it.
        Once loading raised (a clash, or a broken plugin when strict), every later lookup of
        the registry raises the same error, as an eager registry that never got built would.
        """
        registry = cls(strict=strict)
        seen: set[tuple[str, str]] = set()
        # Each Distribution.name or .version parses the whole METADATA file (a long README
        # included) with the email package: read each distribution's once.
        # Keyed by identity: a finder's Distribution may define __eq__ without __hash__.
        about: dict[int, tuple[str, str]] = {}
        for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
            dist = entry_point.dist
            if dist is None:
                name, version = "<unknown distribution>", ""
            elif id(dist) in about:
                name, version = about[id(dist)]
            else:
                metadata = dist.metadata
                name, version = about[id(dist)] = (metadata["Name"], metadata["Version"])
            key = (_normalize(name), entry_point.name)
            if key not in seen:  # the same dist found twice on sys.path
                seen.add(key)
                registry._pending.append((entry_point, name, version))
        if not lazy:
            registry.load_all()
        return registry

    def load_all(self) -> None:
        """Load every plugin still pending (entry points a lazy registry has not loaded)."""
        with self._loading:
            self._load(lambda name: True)

    def _load(self, wanted: Callable[[str], bool]) -> None:
        """Load the pending entry points of the distributions ``wanted`` accepts, in order.

        Callers hold ``_loading``: a lookup that finds nothing waits for a plugin another
        thread is still loading, not just for the pending list to be empty.
        """
        if self._broken is not None:
            raise self._broken
        for found in [f for f in self._pending if wanted(_normalize(f[1]))]:
            if found not in self._pending:  # loaded meanwhile by a lookup it made
                continue
            self._pending.remove(found)
            try:
                self._load_entry_point(*found)
            except PluginError as exc:  # a clash, or strict: no lookup may answer from now on
                self._broken = exc
                raise

    def _load_entry_point(
        self, entry_point: importlib.metadata.EntryPoint, dist_name: str, version: str
    ) -> None:
        try:
            plugin = entry_point.load()
            self.register(plugin, name=entry_point.name, distribution=dist_name, version=version)
        except DuplicatePluginError:
            raise
        except Exception as exc:  # noqa: BLE001 - any plugin bug must not stop the others
            self._plugin_failed(entry_point.name, dist_name, version, exc)

    def _load_for(self, found: Callable[[], bool], distribution: str | None = None) -> None:
        """Load plugins until ``found()``: worq-core's and ``distribution``'s first, then all."""
        if self._broken is not None:
            raise self._broken
        if found():
            return
        with self._loading:
            first = {_CORE, _normalize(distribution)} if distribution else {_CORE}
            self._load(lambda name: name in first)
            if not found():
                self._load(lambda name: True)

    @property
    def plugins(self) -> list[PluginRecord]:
        """Every plugin, loaded or failed (loads those still pending)."""
        self.load_all()
        return self._plugins

    def register(
        self,
        plugin: object,
        *,
        name: str | None = None,
        distribution: str = "<registered by hand>",
        version: str = "",
    ) -> PluginRecord:
        """Register a plugin object (usually a module) with ``@hookimpl`` functions.

        Raises :class:`~worq_core.errors.DuplicatePluginError` when a name or scheme is taken,
        and :class:`~worq_core.errors.PluginError` when a registered class is invalid.
        """
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._manager.register(plugin, name=f"{distribution}:{plugin_name}")
        record = PluginRecord(plugin_name, distribution, version)
        try:
            self._manager.check_pending()
            components = [
                self._check(kind, cls, distribution)
                for kind, hook in _HOOKS.items()
                for impl in getattr(self._manager.hook, hook).get_hookimpls()
                if impl.plugin is plugin
                for cls in _as_list(impl.function(), distribution, hook)
            ]
            commands = self._check_commands(plugin, distribution)
            self._add_all(components)
        except Exception:
            self._manager.unregister(plugin)
            raise
        self._commands.update(commands)
        record.components = components
        record.commands = sorted(commands)
        self._plugins.append(record)
        return record

    def _plugin_failed(self, name: str, distribution: str, version: str, exc: Exception) -> None:
        message = f"worq plugin {name!r} from {distribution} {version} failed to load: {exc!r}"
        if self.strict:
            raise PluginError(message) from exc
        warnings.warn(message, PluginLoadWarning, stacklevel=_outside_worq())
        self._plugins.append(PluginRecord(name, distribution, version, error=repr(exc)))

    def _check(self, kind: Kind, cls: object, distribution: str) -> Component:
        base = _BASES[kind]
        where = f"{distribution} registered {cls!r} as a {kind}"
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{where}, but it is not a subclass of worq_core.{base.__name__}")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise PluginError(f"{where}, but it does not implement: {missing}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{where}, but its name {name!r} is not a lowercase identifier")
        schemes: tuple[str, ...] = tuple(getattr(cls, "schemes", ()))
        if kind in _NEEDS_SCHEMES and not schemes:
            raise PluginError(f"{where}, but it serves no URL schemes")
        return Component(kind, name, cls, distribution, schemes)

    def _check_commands(self, plugin: object, distribution: str) -> dict[str, tuple[Any, str]]:
        """The CLI commands ``plugin`` adds, checked: click commands with names of their own."""
        impls = [
            impl
            for impl in self._manager.hook.worq_register_commands.get_hookimpls()
            if impl.plugin is plugin
        ]
        if not impls:
            return {}
        # Only for a plugin that adds commands: click costs a producer's start-up ~5 ms.
        import click

        commands: dict[str, tuple[Any, str]] = {}
        for impl in impls:
            returned = impl.function()
            if returned is None:
                continue
            if isinstance(returned, click.Command) or not isinstance(returned, Iterable):
                raise PluginError(
                    f"{distribution}'s worq_register_commands must return an iterable of "
                    "click commands"
                )
            for command in returned:
                if not isinstance(command, click.Command) or not command.name:
                    raise PluginError(
                        f"{distribution} registered {command!r} as a command, but it is not "
                        "a named click.Command"
                    )
                name = command.name
                taken = self._commands.get(name) or commands.get(name)
                if taken is not None:
                    raise DuplicatePluginError("command", name, taken[1], distribution)
                commands[name] = (command, distribution)
        return commands

    def commands(self) -> dict[str, Any]:
        """The CLI commands plugins added, by name (click commands)."""
        self.load_all()
        return {name: command for name, (command, _) in sorted(self._commands.items())}

    def _add_all(self, components: list[Component]) -> None:
        """Add a plugin's components, all or none: every clash is checked before the first add."""
        names: dict[tuple[Kind, str], Component] = {}
        schemes: dict[tuple[Kind, str], Component] = {}
        for component in components:
            kind = component.kind
            taken = self._by_name[kind].get(component.name) or names.get((kind, component.name))
            if taken is not None:
                raise DuplicatePluginError(
                    kind, component.name, taken.distribution, component.distribution
                )
            names[kind, component.name] = component
            for scheme in component.schemes:
                owner = self._by_scheme[kind].get(scheme) or schemes.get((kind, scheme))
                if owner is not None:
                    raise DuplicatePluginError(
                        f"{kind} scheme", f"{scheme}://", owner.distribution, component.distribution
                    )
                schemes[kind, scheme] = component
        for (kind, name), component in names.items():
            self._by_name[kind][name] = component
        for (kind, scheme), component in schemes.items():
            self._by_scheme[kind][scheme] = component

    # -- lookups -------------------------------------------------------------------------------

    def components(self, kind: Kind) -> list[Component]:
        """Every registered component of ``kind``, sorted by name."""
        self.load_all()
        return sorted(self._by_name[kind].values(), key=lambda c: c.name)

    def broker_class(self, url: str) -> type[Broker]:
        """The broker class serving ``url``'s scheme."""
        return self._for_url("broker", url)

    def storage_class(self, url: str) -> type[Storage]:
        """The storage class serving ``url``'s scheme."""
        return self._for_url("storage", url)

    def serializer_class(self, name: str) -> type[Serializer]:
        """The serializer class registered as ``name``."""
        self._load_for(lambda: name in self._by_name["serializer"])
        component = self._by_name["serializer"].get(name)
        if component is None:
            raise UnknownPluginError("serializer", name, self._by_name["serializer"])
        return component.cls

    def middleware_class(self, name: str) -> type[Middleware]:
        """The middleware class a plugin registered as ``name``."""
        self._load_for(lambda: name in self._by_name["middleware"])
        component = self._by_name["middleware"].get(name)
        if component is None:
            raise UnknownPluginError("middleware", name, self._by_name["middleware"])
        return component.cls

    def _for_url(self, kind: Kind, url: str) -> type:
        scheme, sep, _ = url.partition("://")
        if not sep:
            self.load_all()  # the error lists every scheme
            raise UnknownPluginError(f"{kind} URL", url, (f"{s}://" for s in self._by_scheme[kind]))
        served = self._by_scheme[kind]
        self._load_for(lambda: scheme in served, KNOWN_SCHEMES.get(scheme))
        component = served.get(scheme)
        if component is None:
            raise UnknownPluginError(
                f"{kind} scheme",
                f"{scheme}://",
                (f"{s}://" for s in self._by_scheme[kind]),
                install_hint=KNOWN_SCHEMES.get(scheme),
            )
        return component.cls


_CORE = "worq-core"


def _normalize(distribution: str) -> str:
    """A distribution's name as PEP 503 compares them (``Worq_Redis`` is ``worq-redis``)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _outside_worq() -> int:
    """The ``stacklevel`` that names the nearest caller outside worq-core (usually the user's).

    A lazy registry loads a plugin inside whatever lookup needed it (``app.broker``, a CLI
    command), so a fixed stacklevel would point into worq-core. Python 3.11 has no
    ``skip_file_prefixes``; frames are told apart by module name, which holds for frozen and
    sourceless installs too. ``functools`` is skipped as well: ``app.broker`` is a cached
    property.
    """
    frame = sys._getframe(1)  # the caller of this function: warnings' stacklevel 1
    level = 1
    while frame.f_back is not None and _is_internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    return level


def _is_internal(module: str) -> bool:
    return module in ("worq_core", "functools") or module.startswith("worq_core.")


def _as_list(returned: Any, distribution: str, hook: str) -> list[object]:
    if returned is None:
        return []
    if isinstance(returned, type) or not isinstance(returned, Iterable):
        raise PluginError(f"{distribution}'s {hook} must return an iterable of classes")
    return list(returned)


@functools.cache
def default_registry() -> Registry:
    """The registry of installed plugins, read from entry points on first use and cached.

    Each plugin is imported when a lookup needs it (:meth:`Registry.from_entry_points` with
    ``lazy=True``).
    """
    return Registry.from_entry_points(lazy=True)
