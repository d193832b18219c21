"""What a running task can learn about its own job."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from worq_core.errors import TaskError


@dataclass(frozen=True, slots=True)
class JobContext:
    """The job a task is running for, from :func:`current_job`.

    Delivery is at-least-once, so a task with side effects can use ``id`` (stable across
    retries and redeliveries) and ``attempt`` to make itself idempotent.
    """

    id: str
    task: str
    queue: str
    attempt: int
    """1 on the first run, counted at every delivery (retries and lease expiries alike)."""
    max_retries: int


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "worq_current_job", default=None
)


def current_job() -> JobContext:
    """The job the calling task runs for; raises :class:`TaskError` outside a worker's job."""
    context = _current.get()
    if context is None:
        raise TaskError("current_job() is only available inside a task run by a worker")
    return context
