"""An in-process result storage with TTLs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Self

from typing_extensions import override

from worq_core import Storage


class MemoryStorage(Storage):
    """Job records in this process's memory, expiring after their TTL. Thread-safe.

    Expired records are dropped when read and in a sweep every ``sweep_every`` saves, so memory
    stays bounded by the records saved within one TTL.
    """

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(
        self,
        url: str = "memory://",
        *,
        clock: Callable[[], float] = time.time,
        sweep_every: int = 1000,
    ) -> None:
        self.url = url
        self.clock = clock
        self.sweep_every = sweep_every
        self._records: dict[str, tuple[float, bytes]] = {}
        self._saves = 0
        self._changed = threading.Condition()

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    @override
    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        with self._changed:
            expires = self.clock() + ttl
            for job_id, data in records.items():
                self._records[job_id] = (expires, bytes(data))
            self._saves += len(records)
            if self._saves >= self.sweep_every:
                self._saves = 0
                now = self.clock()
                for job_id in [k for k, (exp, _) in self._records.items() if exp <= now]:
                    del self._records[job_id]
            self._changed.notify_all()

    @override
    def delete(self, job_ids: Sequence[str]) -> None:
        with self._changed:
            for job_id in job_ids:
                self._records.pop(job_id, None)

    @override
    def load(self, job_id: str) -> bytes | None:
        with self._changed:
            return self._get(job_id)

    @override
    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while (data := self._get(job_id)) is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return data

    def _get(self, job_id: str) -> bytes | None:
        entry = self._records.get(job_id)
        if entry is None:
            return None
        expires, data = entry
        if expires <= self.clock():
            del self._records[job_id]
            return None
        return data
