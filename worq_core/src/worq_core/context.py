"""What a running task can learn about its own job, and how it talks back."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worq_core.errors import TaskError


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a running job is, as its task reported through :meth:`JobContext.progress`."""

    current: float
    """A fraction in [0, 1] when ``total`` is ``None``, else a count out of ``total``."""
    total: float | None = None
    message: str | None = None
    at: float = 0.0
    """Unix time of the report."""

    @property
    def fraction(self) -> float:
        """``current`` as a fraction of the whole, in [0, 1]."""
        if self.total is None:
            return self.current
        return min(1.0, self.current / self.total) if self.total > 0 else 1.0

    def to_data(self) -> dict[str, Any]:
        """Plain data for a serializer."""
        return {
            "current": self.current,
            "total": self.total,
            "message": self.message,
            "at": self.at,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Progress:
        """The inverse of :meth:`to_data`; raises ``KeyError``/``TypeError`` on other data."""
        return cls(
            float(data["current"]),
            None if data.get("total") is None else float(data["total"]),
            data.get("message"),
            float(data.get("at") or 0.0),
        )


class JobContext:
    """The job a task is running for, from :func:`current_job`.

    Delivery is at-least-once, so a task with side effects can use ``id`` (stable across
    retries and redeliveries) and ``attempt`` to make itself idempotent. Created by the worker
    (or by an inline call); the task may read it from any thread it starts.
    """

    __slots__ = (
        "_cancelled",
        "_on_progress",
        "attempt",
        "enqueued_at",
        "headers",
        "id",
        "last_progress",
        "max_retries",
        "queue",
        "task",
    )

    def __init__(
        self,
        id: str,
        task: str,
        queue: str,
        attempt: int,
        max_retries: int,
        headers: Mapping[str, str] | None = None,
        on_progress: Callable[[JobContext], None] | None = None,
        *,
        enqueued_at: float | None = None,
    ) -> None:
        self.id = id
        self.task = task
        self.queue = queue
        self.attempt = attempt
        """1 on the first run, counted at every delivery (retries and lease expiries alike)."""
        self.max_retries = max_retries
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        """The job's string headers, as sent (``options(headers=...)`` and middleware)."""
        self.enqueued_at = enqueued_at
        """Unix time of the enqueue call, on the producer's clock (the same for every attempt);
        ``None`` outside a worker. Metrics take queue wait from it."""
        self.last_progress: Progress | None = None
        """The latest :meth:`progress` report of this run."""
        self._cancelled = False
        self._on_progress = on_progress

    def __repr__(self) -> str:
        return f"<JobContext {self.id} {self.task} attempt={self.attempt}>"

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`Job.cancel` was asked for this job while it runs.

        A sync task that can stop early checks it between steps and returns (or raises); the
        worker learns of a cancellation at its next lease renewal. An async task is also sent
        :class:`asyncio.CancelledError` at its next ``await``.
        """
        return self._cancelled

    def progress(
        self, current: float, message: str | None = None, *, total: float | None = None
    ) -> None:
        """Report how far the job is: a fraction in [0, 1], or a count out of ``total``.

        Cheap to call often: the worker publishes the latest report with its next lease
        renewal (within about a second), never with a round trip of its own per call.
        """
        if total is None and not 0.0 <= current <= 1.0:
            raise ValueError("progress without a total is a fraction in [0, 1]")
        if total is not None and (total < 0 or current < 0):
            raise ValueError("progress counts must not be negative")
        self.last_progress = Progress(current, total, message, time.time())
        if self._on_progress is not None:
            self._on_progress(self)

    def _cancel(self) -> None:
        self._cancelled = True


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "worq_current_job", default=None
)


def current_job() -> JobContext:
    """The job the calling task runs for; raises :class:`TaskError` outside a task."""
    context = _current.get()
    if context is None:
        raise TaskError("current_job() is only available inside a task (run by a worker or inline)")
    return context
