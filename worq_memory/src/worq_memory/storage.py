"""An in-process result storage with TTLs."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Self

from typing_extensions import override

from worq_core import Storage

if TYPE_CHECKING:
    # asyncio is imported by the asyncio code that waits here, not with this module.
    import asyncio

    _AsyncWaiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


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
        # The wait_async calls under way: per job id, each one's loop and the future save() sets.
        self._async_waiters: dict[str, list[_AsyncWaiter]] = {}

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
            for job_id in records:
                for loop, woken in self._async_waiters.pop(job_id, ()):
                    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                        loop.call_soon_threadsafe(_wake, woken)

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

    @override
    async def wait_async(self, job_id: str, timeout: float | None) -> bytes | None:
        """:meth:`wait` on the event loop itself: a future that :meth:`save` sets; no thread."""
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._changed:
                data = self._get(job_id)
                if data is not None or (deadline is not None and loop.time() >= deadline):
                    return data
                waiter = (loop, loop.create_future())
                self._async_waiters.setdefault(job_id, []).append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter[1]
            except TimeoutError:
                pass  # one last look, then give up
            finally:
                with self._changed:
                    waiters = self._async_waiters.get(job_id, [])
                    if waiter in waiters:
                        waiters.remove(waiter)
                        if not waiters:
                            del self._async_waiters[job_id]

    def _get(self, job_id: str) -> bytes | None:
        entry = self._records.get(job_id)
        if entry is None:
            return None
        expires, data = entry
        if expires <= self.clock():
            del self._records[job_id]
            return None
        return data


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
