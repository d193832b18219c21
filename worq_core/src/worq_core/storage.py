"""The storage contract: keeps finished jobs' records (results and final errors) with a TTL."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self, TypeVar

T = TypeVar("T")

WAIT_SLICE = 1.0
"""Longest blocking :meth:`Storage.wait` call behind the default :meth:`Storage.wait_async`."""

WAITER_THREADS = 32
"""Threads (per process, shared by every storage) behind the default :meth:`Storage.wait_async`."""


class Storage(ABC):
    """Base class of every result storage.

    A storage keeps opaque bytes per job id for a time-to-live; worq-core decides what they mean
    (a result, or the error of a dead job). It never interprets them. Methods must be safe to
    call from several threads at once.
    """

    name: ClassVar[str]
    """Unique plugin name, e.g. ``"redis"``."""
    schemes: ClassVar[tuple[str, ...]] = ()
    """URL schemes this storage serves; a broker URL with the same scheme picks it by default."""

    url: str = ""

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build a storage from a URL whose scheme is one of :attr:`schemes`. Does no I/O."""
        return cls(url)  # type: ignore[call-arg]

    @abstractmethod
    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        """Store each job's record, replacing any earlier one, to expire after ``ttl`` seconds.

        Wakes every :meth:`wait` on those job ids.
        """

    @abstractmethod
    def load(self, job_id: str) -> bytes | None:
        """The job's record, or ``None`` if there is none (yet, or any more)."""

    @abstractmethod
    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        """Block until the job has a record and return it; ``None`` after ``timeout`` seconds.

        ``timeout=None`` waits forever. Must not busy-poll.
        """

    async def wait_async(self, job_id: str, timeout: float | None) -> bytes | None:
        """:meth:`wait` for asyncio code: the same meaning, without blocking the event loop.

        Must return promptly when the awaiting task is cancelled, leave nothing waiting behind,
        and not use the loop's default executor (where ``asyncio.to_thread`` work would queue
        behind it). This default runs :meth:`wait` on a small pool of daemon threads of its own,
        in slices of at most :data:`WAIT_SLICE` seconds, so a cancelled wait frees its thread
        within a slice and never holds up the interpreter's exit. Backends that can wait
        natively on the event loop should override it.
        """
        import asyncio  # here, not at the top: only asyncio code comes here, and it has it

        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else max(0.0, deadline - loop.time())
            step = functools.partial(self.wait, job_id, min(WAIT_SLICE, left))
            data = await asyncio.wrap_future(_waiter_threads().submit(step))
            if data is not None or (deadline is not None and loop.time() >= deadline):
                return data

    @abstractmethod
    def delete(self, job_ids: Sequence[str]) -> None:
        """Forget the records of these jobs (unknown ids are ignored).

        Called before a job id runs again (a dead job requeued, or ``job_id=`` reused) so that
        an old record is never taken for the new run's.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections. The storage is unusable afterwards."""


_Call = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class _WaiterThreads:
    """Up to ``size`` daemon threads running submitted calls, started as the calls need them.

    Unlike a ``ThreadPoolExecutor`` its threads are daemons (nothing joins them at exit), and a
    call cancelled before it starts is dropped.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._queued += 1
            self._calls.put((future, call))
            start = self._queued > self._idle and self._threads < self._size
            if start:
                self._threads += 1
                name = f"worq-waiter-{self._threads}"
        if start:
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future, call = self._calls.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, call


_waiters: tuple[int, _WaiterThreads] | None = None
_waiters_lock = threading.Lock()


def _waiter_threads() -> _WaiterThreads:
    """This process's waiter threads (a forked child starts a pool of its own)."""
    global _waiters
    with _waiters_lock:
        if _waiters is None or _waiters[0] != os.getpid():
            _waiters = (os.getpid(), _WaiterThreads(WAITER_THREADS))
        return _waiters[1]
