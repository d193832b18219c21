"""Middleware: ordered, optional hooks around a job's life, on the producer and in the worker.

A middleware subclasses :class:`Middleware` and overrides only the hooks it needs; the others
cost nothing, because the worker composes each hook once, at start, from the middlewares that
override it. Pass them in order as ``Worq(middleware=[...])``: the first one is the outermost
(its ``wrap_run`` sees the call first and the outcome last). A plugin distribution may ship
middleware classes through the ``worq_register_middleware`` hook; they are switched on only by
naming them (``Worq(middleware=["name"])``), never by being installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from worq_core.context import JobContext
from worq_core.job import ErrorInfo
from worq_core.models import JobStatus

if TYPE_CHECKING:
    from worq_core.worker import Service, Worker


@dataclass(slots=True)
class EnqueueRequest:
    """A job about to be sent, as :meth:`Middleware.before_enqueue` sees it.

    ``headers`` may be changed in place (values must be strings); the rest is for reading.
    """

    task: str
    job_id: str
    queue: str
    args: Sequence[Any]
    kwargs: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """What becomes of a run: the worker's verdict, which :meth:`Middleware.decide` may change.

    ``status`` is SUCCEEDED (``value`` is the result), RETRYING (after ``delay`` seconds),
    DEAD or CANCELLED (``error`` says why).
    """

    status: JobStatus
    value: Any = None
    error: ErrorInfo | None = None
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in _DECISIONS:
            raise ValueError(f"a run cannot end {self.status.value!r}")
        if self.delay < 0:
            raise ValueError("a retry delay must not be negative")


_DECISIONS = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.RETRYING, JobStatus.DEAD, JobStatus.CANCELLED}
)


class Middleware:
    """Base class of middleware; every hook is optional and does nothing by default.

    Hooks run on the thread of the work they are about (the producer's for ``before_enqueue``,
    the job's for the run hooks, the worker's service thread for ``services``), so a middleware
    shared by many threads must be thread-safe. An exception from ``wrap_run`` counts as the
    job's failure; one from ``decide`` is logged and the worker's own verdict stands; one from
    ``after_settle``, ``worker_start`` or ``worker_stop`` is logged.
    """

    name: ClassVar[str] = ""
    """A plugin's registry name (lowercase), for ``Worq(middleware=["name"])``."""

    def before_enqueue(self, request: EnqueueRequest) -> None:
        """Called for each job before it is encoded and sent; may add headers.

        Raise :class:`~worq_core.errors.EnqueueRejected` to veto: nothing of the batch is sent.
        """

    def after_enqueue(
        self, requests: Sequence[EnqueueRequest], error: BaseException | None
    ) -> None:
        """Called once per enqueue call (one job, or a batch) after the broker answered.

        ``error`` is what the send raised (the jobs may not exist), else ``None``. A call that
        fails before sending (a veto, a payload too large) tells the jobs whose
        ``before_enqueue`` ran, with that error. A scheduled tick's job is told too, by the
        worker whose scheduler prepared it: sent, or :class:`~worq_core.errors.ScheduleTaken`
        when another scheduler fired the tick first. Workflow steps are told when they are
        sent: the first ones by the enqueue of the workflow, later ones (requests rebuilt from
        their messages) by the worker whose settlement sent them, once the broker applied it.
        A chord's callback, which the broker sends as it counts the last member, is not told.
        """

    def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
        """Run a sync task: call ``call()`` (once) and return its result, or raise."""
        return call()

    async def wrap_run_async(self, job: JobContext, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run an ``async def`` task: ``await call()`` (once) and return its result, or raise."""
        return await call()

    def decide(self, job: JobContext, decision: Decision) -> Decision:
        """Called with the worker's verdict on a run; return it, or another one."""
        return decision

    def after_settle(self, job: JobContext, decision: Decision) -> None:
        """Called once the broker applied the verdict (not for a refused, stale settlement)."""

    def worker_start(self, worker: Worker) -> None:
        """Called as a worker starts, before its first fetch."""

    def worker_stop(self, worker: Worker) -> None:
        """Called as a worker stops, after its last settlement."""

    def services(self, worker: Worker) -> Iterable[Service]:
        """Periodic work to run inside the worker (see :class:`worq_core.worker.Service`)."""
        return ()


def _overrides(middleware: Middleware, hook: str) -> bool:
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)


class MiddlewareStack:
    """An app's middlewares, each hook composed once from those that override it."""

    def __init__(self, middlewares: Sequence[Middleware]) -> None:
        self.middlewares = tuple(middlewares)
        self.enqueue = tuple(
            m.before_enqueue for m in middlewares if _overrides(m, "before_enqueue")
        )
        self.after_enqueues = tuple(
            m.after_enqueue for m in middlewares if _overrides(m, "after_enqueue")
        )
        self.wraps = tuple(m.wrap_run for m in middlewares if _overrides(m, "wrap_run"))
        self.async_wraps = tuple(
            m.wrap_run_async for m in middlewares if _overrides(m, "wrap_run_async")
        )
        self.decides = tuple(m.decide for m in middlewares if _overrides(m, "decide"))
        self.after_settles = tuple(
            m.after_settle for m in middlewares if _overrides(m, "after_settle")
        )

    def __bool__(self) -> bool:
        return bool(self.middlewares)

    def run(self, job: JobContext, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` through every ``wrap_run``, the first middleware outermost."""
        wraps = self.wraps
        if not wraps:
            return fn()

        def at(index: int) -> Any:
            if index == len(wraps):
                return fn()
            return wraps[index](job, lambda: at(index + 1))

        return at(0)

    async def run_async(self, job: JobContext, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``fn()`` through every ``wrap_run_async``, the first middleware outermost."""
        wraps = self.async_wraps
        if not wraps:
            return await fn()

        async def at(index: int) -> Any:
            if index == len(wraps):
                return await fn()
            return await wraps[index](job, lambda: at(index + 1))

        return await at(0)

    def decide(self, job: JobContext, decision: Decision) -> Decision:
        """The verdict after every ``decide`` hook, in order."""
        for hook in self.decides:
            decision = hook(job, decision)
            if not isinstance(decision, Decision):
                raise TypeError(f"{hook!r} returned {decision!r}, not a Decision")
        return decision
