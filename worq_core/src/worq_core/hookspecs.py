"""pluggy hook specifications of the ``worq`` plugin system.

A plugin is a module (or object) with functions marked ``@hookimpl``, advertised through an entry
point in the ``worq`` group::

    [project.entry-points.worq]
    myplugin = "my_package.plugin"

Registration hooks return an iterable of classes and must do no I/O: they run whenever a
registry is built, including in ``worq plugins``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

from worq_core.broker import Broker
from worq_core.middleware import Middleware
from worq_core.serializer import Serializer
from worq_core.storage import Storage

if TYPE_CHECKING:
    import click

PROJECT_NAME = "worq"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def worq_register_brokers() -> Iterable[type[Broker]]:  # type: ignore[empty-body]
    """Return the :class:`~worq_core.Broker` subclasses this plugin provides.

    Called once per registry; every implementation's classes are collected. Each class must set
    a unique ``name`` and the URL ``schemes`` it serves.
    """


@hookspec
def worq_register_serializers() -> Iterable[type[Serializer]]:  # type: ignore[empty-body]
    """Return the :class:`~worq_core.Serializer` subclasses this plugin provides.

    Called once per registry; every implementation's classes are collected. Each class must set
    a unique ``name``.
    """


@hookspec
def worq_register_storages() -> Iterable[type[Storage]]:  # type: ignore[empty-body]
    """Return the :class:`~worq_core.Storage` subclasses this plugin provides.

    Called once per registry; every implementation's classes are collected. Each class must set
    a unique ``name`` and the URL ``schemes`` it serves.
    """


@hookspec
def worq_register_middleware() -> Iterable[type[Middleware]]:  # type: ignore[empty-body]
    """Return the :class:`~worq_core.Middleware` subclasses this plugin provides.

    Called once per registry; every implementation's classes are collected. Each class must set
    a unique ``name`` and be constructible without arguments. Registering a middleware does not
    switch it on: an app names it, ``Worq(middleware=["name"])``.
    """


@hookspec
def worq_register_commands() -> Iterable[click.Command]:  # type: ignore[empty-body]
    """Return :mod:`click` commands (or groups) this plugin adds to the ``worq`` command line.

    Each becomes ``worq NAME ...``, say ``worq postgres migrate URL`` for a backend's
    administration. Names must be unique across plugins and may not shadow worq's own
    commands (those win, and the plugin's is left out with a warning). Called whenever the
    CLI lists or looks up a command; build the command objects without any I/O.
    """
