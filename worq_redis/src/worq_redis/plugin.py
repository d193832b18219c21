"""worq-redis's entry point: registers ``redis://``, ``rediss://`` and ``unix://``."""

from __future__ import annotations

from collections.abc import Iterable

from worq_core import Broker, Storage, hookimpl
from worq_redis.broker import RedisBroker
from worq_redis.storage import RedisStorage


@hookimpl
def worq_register_brokers() -> Iterable[type[Broker]]:
    """The Redis broker."""
    return [RedisBroker]


@hookimpl
def worq_register_storages() -> Iterable[type[Storage]]:
    """The Redis result storage."""
    return [RedisStorage]
