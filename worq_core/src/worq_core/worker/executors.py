"""Where task code runs: slot threads for sync tasks, one event loop thread for async ones.

Both kinds count against the worker's one pool of ``concurrency`` slots; an executor only
provides the place to run, while the worker decides what runs and when.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("worq.worker")


class ThreadExecutor:
    """Daemon threads serving a shared inbox of work items.

    Daemon threads (unlike ``ThreadPoolExecutor``'s) let the process exit when the grace period
    runs out while a task is stuck. A work item returns ``True`` when its thread must retire
    (its task was abandoned at a timeout and :meth:`grow` already put a fresh thread in its
    place).
    """

    def __init__(self, size: int, name: str = "worq-slot") -> None:
        self._name = name
        self._size = size
        self._inbox: queue.SimpleQueue[Callable[[], bool] | None] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the threads."""
        for _ in range(self._size):
            self.grow()

    def submit(self, work: Callable[[], bool]) -> None:
        """Run ``work`` on the next free thread."""
        self._inbox.put(work)

    def grow(self) -> None:
        """Start one more thread (at start-up, or in place of one stuck in a task)."""
        with self._lock:
            self._started += 1
            name = f"{self._name}-{self._started}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def stop(self) -> None:
        """Ask every thread to exit once its current work item returns."""
        for _ in range(self._started):
            self._inbox.put(None)

    def _serve(self) -> None:
        while (work := self._inbox.get()) is not None:
            try:
                if work():
                    return
            except Exception:  # a bug in worq or a plugin; the thread must keep serving
                log.exception("unexpected error on a slot thread")


class AsyncExecutor:
    """One event loop on a daemon thread, for ``async def`` tasks.

    asyncio is imported when the first one is made, not with worq: a worker whose tasks are
    all sync never loads it.
    """

    def __init__(self, name: str = "worq-asyncio") -> None:
        import asyncio

        self._loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        """Start the loop's thread and wait until the loop runs."""
        ready = threading.Event()
        self._loop.call_soon(ready.set)
        self._thread.start()
        ready.wait()

    def submit(self, coro: Coroutine[Any, Any, None]) -> concurrent.futures.Future[None]:
        """Schedule ``coro`` as a task of its own; cancelling the future cancels the task."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self) -> None:
        """Stop the loop and close it (tasks still pending are dropped)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _serve(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
