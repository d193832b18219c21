"""Job events: every state change of a job, sent to the broker's recent-events stream.

Switched on with ``Worq(..., events=True)``; off, nothing here is imported or run. The events
go through the middleware seam like any other feature: :class:`EventsMiddleware` sees each
enqueue call (``after_enqueue``), each run (``wrap_run``) and each verdict the broker applied
(``after_settle``), and a worker service publishes what a worker saw in batches, so a job's
events cost the worker a share of one broker call every ``flush_interval`` rather than a call
each. Progress events come from the same service: it reads the latest progress of the jobs
running when it ticks, so a task reporting progress in a tight loop sends at most one event
per flush.

Other processes follow the stream with :meth:`~worq_core.Broker.read_events` (the dashboard
does); brokers without :attr:`~worq_core.Capability.EVENTS` drop them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from worq_core.context import JobContext
from worq_core.middleware import Decision, EnqueueRequest, Middleware
from worq_core.models import Event, EventKind, JobStatus
from worq_core.worker.services import Service

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.worker import Worker

logger = logging.getLogger("worq.events")

_KINDS = {
    JobStatus.SUCCEEDED: EventKind.SUCCEEDED,
    JobStatus.RETRYING: EventKind.RETRIED,
    JobStatus.DEAD: EventKind.DEAD,
    JobStatus.CANCELLED: EventKind.CANCELLED,
}


class EventsMiddleware(Middleware):
    """Sends an :class:`~worq_core.Event` for every state change of the app's jobs.

    Producers publish each enqueue call's events at once (one broker call per call, after the
    broker accepted the jobs); workers buffer theirs and publish them every
    ``flush_interval`` seconds, or as soon as ``max_buffer`` are waiting, and at stop.
    """

    def __init__(self, app: Worq, flush_interval: float = 0.25, max_buffer: int = 1000) -> None:
        self.app = app
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._buffer: list[Event] = []
        self._lock = threading.Lock()
        self._running: dict[str, tuple[JobContext, float]] = {}  # id -> (context, progress seen)
        self._started: dict[str, float] = {}
        self._worker = ""
        self._workers = 0  # workers of this app running in this process

    # -- producer ------------------------------------------------------------------------------

    @override
    def after_enqueue(
        self, requests: Sequence[EnqueueRequest], error: BaseException | None
    ) -> None:
        if error is not None or not requests:
            return
        now = time.time()
        events = [Event(EventKind.ENQUEUED, r.job_id, r.task, r.queue, now) for r in requests]
        if self._workers:
            # Sent by a job of this worker (a workflow's next step, a scheduled tick): in the
            # buffer, after the events of the job that sent it.
            for event in events:
                self._add(event)
        else:
            self.publish(events)

    def publish(self, events: Sequence[Event]) -> None:
        """Send ``events`` now; a broker error is logged, never raised into the caller."""
        try:
            self.app.broker.publish_events(events)
        except Exception:
            logger.warning("could not publish %d job events", len(events), exc_info=True)

    # -- worker --------------------------------------------------------------------------------

    @override
    def worker_start(self, worker: Worker) -> None:
        with self._lock:
            self._worker = worker.id
            self._workers += 1

    @override
    def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
        self._start(job)
        return call()

    @override
    async def wrap_run_async(self, job: JobContext, call: Callable[[], Awaitable[Any]]) -> Any:
        self._start(job)
        return await call()

    @override
    def after_settle(self, job: JobContext, decision: Decision) -> None:
        with self._lock:
            self._running.pop(job.id, None)
            started = self._started.pop(job.id, None)
        if decision.status is JobStatus.SUCCEEDED:
            detail = "" if started is None else f"{time.monotonic() - started:.6f}"
        else:
            detail = decision.error.summary() if decision.error is not None else ""
        self._add(self._event(_KINDS[decision.status], job, detail))

    @override
    def services(self, worker: Worker) -> Iterable[Service]:
        return (_Flush(self),)

    @override
    def worker_stop(self, worker: Worker) -> None:
        self.flush()
        with self._lock:
            self._workers -= 1  # with none left, enqueues are a producer's: published at once

    def flush(self) -> None:
        """Publish what is buffered, and a progress event per job whose progress changed."""
        progressed = []
        with self._lock:
            for job_id, (job, seen) in list(self._running.items()):
                progress = job.last_progress
                if progress is not None and progress.at > seen:
                    self._running[job_id] = (job, progress.at)
                    progressed.append(self._event(EventKind.PROGRESS, job, _progress(job)))
            events, self._buffer = [*self._buffer, *progressed], []
        if events:
            self.publish(events)

    def _start(self, job: JobContext) -> None:
        with self._lock:
            self._running[job.id] = (job, 0.0)
            self._started[job.id] = time.monotonic()
        self._add(self._event(EventKind.STARTED, job))

    def _add(self, event: Event) -> None:
        with self._lock:
            self._buffer.append(event)
            full = len(self._buffer) >= self.max_buffer
        if full:
            self.flush()

    def _event(self, kind: EventKind, job: JobContext, detail: str = "") -> Event:
        return Event(
            kind, job.id, job.task, job.queue, time.time(), job.attempt, self._worker, detail
        )


def _progress(job: JobContext) -> str:
    progress = job.last_progress
    if progress is None:
        return ""
    count = f"{progress.current:g}/{progress.total:g}" if progress.total is not None else ""
    return " ".join(part for part in (f"{progress.fraction:.0%}", count, progress.message) if part)


class _Flush(Service):
    """Publishes the middleware's buffered events every ``flush_interval`` seconds."""

    name = "events"

    def __init__(self, events: EventsMiddleware) -> None:
        self.events = events

    def tick(self, now: float) -> float | None:
        self.events.flush()
        return now + self.events.flush_interval

    def stop(self) -> None:
        self.events.flush()
