"""worq-redis's entry point: ``redis://``, ``rediss://``, ``unix://``, Sentinel and Cluster."""

from __future__ import annotations

from collections.abc import Iterable

from worq_core import Broker, Storage, hookimpl
from worq_redis.broker import RedisBroker, RedisClusterBroker
from worq_redis.storage import RedisStorage


@hookimpl
def worq_register_brokers() -> Iterable[type[Broker]]:
    """The Redis broker, and its Redis Cluster variant."""
    return [RedisBroker, RedisClusterBroker]


@hookimpl
def worq_register_storages() -> Iterable[type[Storage]]:
    """The Redis result storage."""
    return [RedisStorage]
