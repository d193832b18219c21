"""worq-redis: the Redis broker and result storage (``redis://``, ``redis+sentinel://`` ...)."""

from worq_redis.broker import RedisBroker, RedisClusterBroker
from worq_redis.connection import (
    ClusterNotSupported,
    RedisSettings,
    ReplicasBehind,
    UnsupportedClient,
)
from worq_redis.storage import RedisStorage

__all__ = [
    "ClusterNotSupported",
    "RedisBroker",
    "RedisClusterBroker",
    "RedisSettings",
    "RedisStorage",
    "ReplicasBehind",
    "UnsupportedClient",
]
