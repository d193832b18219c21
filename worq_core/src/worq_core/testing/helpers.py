"""Test your own tasks: run an app on a fresh in-memory broker and drain its queues on demand.

::

    from worq_core.testing import in_memory

    from myapp import add, app

    def test_add() -> None:
        with in_memory(app) as worker:
            job = add.enqueue(1, 2)
            assert worker.drain() == 1
            assert job.result(timeout=0) == 3

Needs the ``worq-memory`` distribution (the ``memory://`` backend), but neither pytest nor the
app's real broker: the app's own URL is never resolved inside the ``with`` block.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from worq_core import ExitReason, WorkerSettings, Worq

MEMORY_URL = "memory://"


class Drainer:
    """Runs an app's queued jobs in the calling thread until none is left.

    Made by :func:`in_memory`; ``concurrency`` is the worker's number of slots (1, the default,
    runs jobs one at a time in queue order, so tests are repeatable).
    """

    def __init__(self, app: Worq, *, concurrency: int = 1) -> None:
        self.app = app
        self.concurrency = concurrency

    def drain(self, queues: Sequence[str] | None = None, *, timeout: float = 30.0) -> int:
        """Run the jobs of ``queues`` (default: the app's) until they hold none; return the count.

        The count is of runs that ended (``worker.counters.done``: succeeded, retried,
        dead-lettered or cancelled): a job that succeeds at its third attempt counts 3.
        Jobs enqueued by the running jobs run too, and delayed jobs and retry backoffs are waited
        for. If the queues still hold jobs after ``timeout`` seconds, the worker is stopped
        (unfinished jobs go back to their queue) and :class:`TimeoutError` is raised.
        """
        settings = WorkerSettings(
            queues=tuple(queues or self.app.default_queues()),
            concurrency=self.concurrency,
            grace=0.0,
            handle_signals=False,
        )
        worker = self.app.worker(settings=settings)
        timer = threading.Timer(timeout, worker.stop)
        timer.daemon = True
        timer.start()
        try:
            reason = worker.run(burst=True)
        finally:
            timer.cancel()
        if reason is not ExitReason.DRAINED:
            raise TimeoutError(
                f"{', '.join(settings.queues)} still held jobs after {timeout:g}s "
                f"({worker.counters.done} runs ended; worker {reason.value})"
            )
        return worker.counters.done


@contextmanager
def in_memory(app: Worq, *, concurrency: int = 1) -> Iterator[Drainer]:
    """Point ``app`` at a fresh ``memory://`` broker and storage for the ``with`` block.

    Yields a :class:`Drainer` whose :meth:`~Drainer.drain` runs the queued jobs. The app must not
    have used its broker or storage yet (say, by enqueueing at import time), or
    :class:`~worq_core.TaskError` is raised. On the way out the app is closed and pointed back at
    the broker and storage it had, so each ``with in_memory(app)`` starts with empty queues. Read
    results inside the block: after it they are gone with the memory broker.
    """
    # Worq.configure cannot express "back to how it was" (a storage that followed the broker),
    # so the specs are saved and put back directly.
    saved = (app._broker_spec, app._storage_spec)
    app.configure(broker=MEMORY_URL)  # the storage follows the broker to memory://
    try:
        yield Drainer(app, concurrency=concurrency)
    finally:
        app.close()
        app._broker_spec, app._storage_spec = saved


__all__ = ["Drainer", "in_memory"]
