"""The timeout watchdog: fails a run at its deadline even if its code never returns.

An async task is cancelled by ``asyncio.wait_for`` at its timeout; the watchdog is its
backstop (a task that swallows the cancellation or blocks the loop). A sync task cannot be
interrupted at all: the watchdog decides the run as timed out, gives its slot to a fresh thread
and leaves the old thread to retire whenever the code returns.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from typing_extensions import override

from worq_core.errors import TaskTimeoutError
from worq_core.worker.run import RunState
from worq_core.worker.services import Service
from worq_core.worker.settings import ExitReason

if TYPE_CHECKING:
    from worq_core.worker.core import Worker


class Watchdog(Service):
    """Wakes at the earliest deadline of a running job (the worker wakes it for new ones)."""

    name = "watchdog"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @override
    def start(self, now: float) -> float | None:
        return None

    @override
    def tick(self, now: float) -> float | None:
        worker = self.worker
        with worker.lock:
            running = [r for r in worker.held.values() if r.state is RunState.RUNNING]
        overdue = [r for r in running if r.deadline is not None and r.deadline <= now]
        for run in overdue:
            assert run.task is not None
            assert run.timeout is not None
            exc = TaskTimeoutError(run.task.name, run.timeout)
            if not worker.time_out(run, exc):
                continue  # it finished just in time
            worker.job_log(
                logging.ERROR,
                run,
                "timed out after %gs and could not be stopped; its slot goes to a fresh %s",
                run.timeout,
                "task" if run.task.is_async else "thread",
            )
            if worker.settings.recycle_when_stuck:
                worker.retire(ExitReason.STUCK)
        deadlines = [r.deadline for r in running if r.deadline is not None and r.deadline > now]
        return min(deadlines, default=None)

    def arm(self, deadline: float) -> None:
        """A run started with this deadline (monotonic)."""
        runner = self.worker.services
        if runner is not None:
            runner.wake(self, deadline)


class Registration(Service):
    """Registers the worker with the broker every heartbeat, for ``worq stats``."""

    name = "registration"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @override
    def tick(self, now: float) -> float | None:
        self.worker.register()
        return time.monotonic() + self.worker.settings.heartbeat_interval


class Limits(Service):
    """Retires the worker past its memory limit, and stops it if its parent process died."""

    name = "limits"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @override
    def start(self, now: float) -> float | None:
        return now + self.worker.settings.heartbeat_interval

    @override
    def tick(self, now: float) -> float | None:
        self.worker.check_limits()
        return time.monotonic() + self.worker.settings.heartbeat_interval
