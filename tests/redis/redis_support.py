"""Helpers for the worq-redis tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import redis

from worq_redis import RedisBroker, RedisSettings, RedisStorage

DB = int(os.environ.get("WORQ_TEST_REDIS_DB", "9"))
URL = os.environ.get("WORQ_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{DB}")
BACKENDS = ["redis", "fakeredis"]


def new_prefix() -> str:
    return f"worqtest-{uuid.uuid4().hex[:12]}"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (and only those)."""
    batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])


@dataclass
class Backend:
    """One Redis (real or fake) with a key prefix of this test's own."""

    kind: str
    client: redis.Redis
    prefix: str

    def broker(self, settings: RedisSettings | None = None, **kwargs: object) -> RedisBroker:
        return RedisBroker(self.client, settings, prefix=self.prefix, **kwargs)  # type: ignore[arg-type]

    def storage(self, prefix: str | None = None) -> RedisStorage:
        return RedisStorage(self.client, prefix=prefix or self.prefix)

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self.client.scan_iter(match=f"{self.prefix}:*"))
