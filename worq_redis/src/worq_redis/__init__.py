"""worq-redis: the Redis broker and result storage behind ``redis://``, ``rediss://`` and ``unix://``."""

from worq_redis.broker import RedisBroker
from worq_redis.connection import ClusterNotSupported, RedisSettings
from worq_redis.storage import RedisStorage

__all__ = ["ClusterNotSupported", "RedisBroker", "RedisSettings", "RedisStorage"]
