"""worq-memory's entry point: registers ``memory://`` for brokers and storages."""

from __future__ import annotations

from collections.abc import Iterable

from worq_core import Broker, Storage, hookimpl
from worq_memory.broker import MemoryBroker
from worq_memory.storage import MemoryStorage


@hookimpl
def worq_register_brokers() -> Iterable[type[Broker]]:
    """The in-memory broker."""
    return [MemoryBroker]


@hookimpl
def worq_register_storages() -> Iterable[type[Storage]]:
    """The in-memory result storage."""
    return [MemoryStorage]
