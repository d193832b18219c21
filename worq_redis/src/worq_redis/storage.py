"""The Redis result storage: one string key per finished job, with a TTL."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import redis
from typing_extensions import override

from worq_core import Storage, StorageConnectionError, StorageError
from worq_redis.connection import (
    DEFAULT_URL,
    SCRIPTS,
    Call,
    RedisSettings,
    command,
    connect,
    result_keys,
    run_script,
    run_scripts,
    translate_errors,
)


class RedisStorage(Storage):
    """Job records in Redis under ``<prefix>:res:{<job id>}``, each with its own TTL.

    :meth:`wait` blocks without polling: it marks the job as waited on and blocks on the job's
    wake-up list, which whoever writes the record (this storage, or the broker's ack script)
    fills when it sees the mark. That works from any process or machine. Thread-safe.
    """

    name: ClassVar[str] = "redis"
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix")

    def __init__(
        self,
        url: str | redis.Redis = DEFAULT_URL,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
    ) -> None:
        self.client, self.url, self.settings, self._owned = connect(url, settings, prefix)
        self.prefix = self.settings.prefix

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def __repr__(self) -> str:
        return f"<RedisStorage {self.url.split('@')[-1]} prefix={self.prefix!r}>"

    @override
    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        """Write each record (one script per job, all in one round trip) and wake its waiters."""
        if not records:
            return
        ttl_ms = int(ttl * 1000)
        calls: list[Call] = [
            (SCRIPTS["save_result"], result_keys(self.prefix, job_id), ["", ttl_ms, data])
            for job_id, data in records.items()
        ]
        with self._errors():
            run_scripts(self.client, calls)

    @override
    def delete(self, job_ids: Sequence[str]) -> None:
        """Delete the records (and wait markers) of these jobs, one pipelined round trip."""
        if not job_ids:
            return
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.delete(*result_keys(self.prefix, job_id))  # one job's keys share a slot
            pipe.execute()

    @override
    def load(self, job_id: str) -> bytes | None:
        with self._errors():
            data = command(self.client, "GET", result_keys(self.prefix, job_id)[0])
        return None if data is None else bytes(data)

    @override
    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        """Block until the job has a record; ``None`` after ``timeout`` seconds.

        Each step marks the job as waited on and reads the record in one script, then blocks on
        ``BLMOVE`` of the job's wake-up list onto itself (so every waiter sees the wake-up) for
        at most :attr:`RedisSettings.blocking_timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = result_keys(self.prefix, job_id)
        step = self.settings.blocking_timeout
        mark_ms = int((step + self.settings.socket_timeout) * 1000) + 1000
        with self._errors():
            while True:
                data = run_script(self.client, SCRIPTS["arm_wait"], keys, ["", mark_ms])
                if data is not None:
                    return bytes(data)
                remaining = step if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return None
                block = max(0.001, min(step, remaining))
                command(self.client, "BLMOVE", keys[2], keys[2], "RIGHT", "LEFT", f"{block:.3f}")

    @override
    def close(self) -> None:
        """Close the connection pool, unless the client was handed to us."""
        if self._owned:
            self.client.close()

    def _errors(self) -> Any:
        return translate_errors(self.url, StorageConnectionError, StorageError)
