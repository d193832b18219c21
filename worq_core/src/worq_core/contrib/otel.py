"""OpenTelemetry tracing: a producer span per enqueued job, a consumer span per run, one trace.

``Worq(middleware=["otel"])`` (or an :class:`OpenTelemetryMiddleware` instance, for a tracer
provider of your own) on the producer and on the workers. Spans follow the OpenTelemetry
messaging semantic conventions 1.44.0 (the version of opentelemetry-semantic-conventions
0.66b2): ``send {queue}`` (PRODUCER) as a job is sent, ``process {queue}`` (CONSUMER) per run,
with ``messaging.system`` ``"worq"``. The producer span's context travels in the job's headers
as W3C ``traceparent``/``tracestate`` (through the global propagator, so ``OTEL_PROPAGATORS``
applies), and each run is its child and links to it.

Only opentelemetry-api is needed (``pip install 'worq-core[otel]'``), and it is imported when
the middleware is built, never by importing this module: registering the name costs nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from worq_core import __version__
from worq_core.context import JobContext
from worq_core.errors import JobCancelled
from worq_core.hookspecs import hookimpl
from worq_core.middleware import Decision, EnqueueRequest, Middleware
from worq_core.models import JobStatus
from worq_core.scheduling import SCHEDULE_HEADER

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

    from worq_core.worker import Worker

SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
"""The semantic conventions the spans follow."""

SYSTEM = "worq"
"""``messaging.system`` of every span."""

TIMEOUT_ERROR = "worq_core.errors.TaskTimeoutError"
"""The ``error.type`` of a run that overran its task's timeout."""

ORPHAN_AFTER = 30.0
"""Seconds after which a producer span no ``after_enqueue`` ended becomes a ``create`` span."""

_QUIET = (JobCancelled, asyncio.CancelledError)
"""How a cancelled run ends: the verdict says so, no exception event is needed."""


class OpenTelemetryMiddleware(Middleware):
    """Traces jobs across processes; list it first so other middleware's spans nest in its own.

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace.set_tracer_provider``),
    looked up when spans start, so the provider may be set after the app is built.
    ``propagator`` defaults to the global text-map propagator (W3C trace context and baggage
    unless configured otherwise). A producer span that no ``after_enqueue`` ends (workflow
    steps, which the broker sends) becomes a zero-length ``create`` span once it is
    ``orphan_after`` seconds old, at the next enqueue. The verdict recorded on a run's span is
    the one that reaches this middleware's ``decide``: one that a middleware listed after it
    changes is not seen.
    """

    name = "otel"

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        try:  # imported here, not at module level: about 30 ms that apps without tracing skip
            from opentelemetry import context, propagate, trace
        except ImportError as exc:  # tests/packaging builds it in a venv without the extra
            raise ImportError(
                "the otel middleware needs opentelemetry-api: pip install 'worq-core[otel]'"
            ) from exc
        self._tracer = trace.get_tracer(
            "worq_core.contrib.otel", __version__, tracer_provider, schema_url=SCHEMA_URL
        )
        self._propagator = propagator
        self._orphan_after = orphan_after
        self._global_propagator = propagate.get_global_textmap
        self._attach = context.attach
        self._detach = context.detach
        self._in_context = trace.set_span_in_context
        self._span_of = trace.get_current_span
        self._link = trace.Link
        self._producer = trace.SpanKind.PRODUCER
        self._consumer = trace.SpanKind.CONSUMER
        self._error = trace.Status
        self._error_code = trace.StatusCode.ERROR
        self._lock = threading.Lock()
        # Spans between their start and their end, by the id of the object they are about
        # (which the entry keeps alive, so the id cannot be reused while it is there).
        self._sending: dict[int, tuple[EnqueueRequest, Span, int, float]] = {}
        self._running: dict[int, tuple[JobContext, Span]] = {}

    # -- producer ------------------------------------------------------------------------------

    def before_enqueue(self, request: EnqueueRequest) -> None:
        """Start the job's ``send`` span and put its context in the job's headers."""
        headers = request.headers
        propagator = self._propagator or self._global_propagator()
        links = None
        given = None
        if headers and not propagator.fields.isdisjoint(headers):
            # The caller sent a creation context of its own: keep it, and link to it.
            given = self._span_of(propagator.extract(headers)).get_span_context()
            if given.is_valid:
                links = [self._link(given)]
        started = time.time_ns()
        span = self._tracer.start_span(
            f"send {request.queue}",
            kind=self._producer,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": request.queue,
                "messaging.message.id": request.job_id,
                "worq.task.name": request.task,
            },
            links=links,
            start_time=started,
        )
        if links is None:
            propagator.inject(headers, context=self._in_context(span))
        if SCHEDULE_HEADER in headers:
            # A scheduled tick: the broker sends it only if this scheduler wins the tick, and
            # most ticks prepared by N workers are not sent. Its span marks the creation; the
            # after_enqueue that follows finds nothing to end.
            self._created(request, span, started)
            return
        now = time.monotonic()
        with self._lock:
            orphans = self._orphans(now)
            self._sending[id(request)] = (request, span, started, now)
        for orphan, orphan_span, orphan_start in orphans:
            self._created(orphan, orphan_span, orphan_start)

    def after_enqueue(
        self, requests: Sequence[EnqueueRequest], error: BaseException | None
    ) -> None:
        """End the calls' ``send`` spans, with the error if the send failed."""
        with self._lock:
            entries = [self._sending.pop(id(request), None) for request in requests]
        count = len(requests)
        for request, entry in zip(requests, entries, strict=True):
            if entry is None or entry[0] is not request:
                continue  # its span was already ended as an orphan
            span = entry[1]
            if count > 1:
                span.set_attribute("messaging.batch.message_count", count)
            if error is not None:
                span.set_attribute("error.type", _type_name(error))
                span.record_exception(error)
                span.set_status(self._error(self._error_code, _short(str(error))))
            span.end()

    def _orphans(self, now: float) -> list[tuple[EnqueueRequest, Span, int]]:
        """Producer spans no ``after_enqueue`` ended in time (workflow steps); under the lock."""
        found = []
        sending = self._sending
        while sending:
            key = next(iter(sending))  # the oldest: entries are added in time order
            request, span, started, at = sending[key]
            if now - at < self._orphan_after:
                break
            del sending[key]
            found.append((request, span, started))
        return found

    def _created(self, request: EnqueueRequest, span: Span, started: int) -> None:
        """End a producer span whose sending the broker does: a ``create`` span, no duration."""
        span.update_name(f"create {request.queue}")
        span.set_attribute("messaging.operation.type", "create")
        span.set_attribute("messaging.operation.name", "create")
        span.end(end_time=started)

    # -- consumer ------------------------------------------------------------------------------

    def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
        """Run a sync task inside its ``process`` span (current, so the task's spans nest)."""
        span = self._start_run(job)
        token = self._attach(self._in_context(span))
        try:
            return call()
        except BaseException as exc:
            self._raised(job, exc)
            raise
        finally:
            self._detach(token)

    async def wrap_run_async(self, job: JobContext, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run an ``async def`` task inside its ``process`` span."""
        span = self._start_run(job)
        token = self._attach(self._in_context(span))
        try:
            return await call()
        except BaseException as exc:
            self._raised(job, exc)
            raise
        finally:
            self._detach(token)

    def decide(self, job: JobContext, decision: Decision) -> Decision:
        """Record the verdict on the run's span and end it; the verdict itself is unchanged.

        A delivery settled without running (out of attempts, cancelled, an unknown task) gets
        a ``process`` span of its own here, so it shows in the trace too.
        """
        with self._lock:
            entry = self._running.pop(id(job), None)
        if entry is not None and entry[0] is job:
            span = entry[1]
        else:
            span = self._start_run(job, track=False)
        status = decision.status
        span.set_attribute("worq.job.outcome", status.value)
        error = decision.error
        if status is JobStatus.RETRYING or status is JobStatus.DEAD:
            error_type = error.type if error is not None else "worq.Error"
            summary = _short(error.summary()) if error is not None else ""
            span.set_attribute("error.type", error_type)
            if error_type == TIMEOUT_ERROR:
                span.add_event("worq.job.timeout", {"exception.message": summary})
            if status is JobStatus.RETRYING:
                span.add_event("worq.job.retry", {"worq.retry.delay": decision.delay})
            else:
                span.add_event("worq.job.dead_lettered")
            span.set_status(self._error(self._error_code, summary))
        elif status is JobStatus.CANCELLED:
            span.add_event("worq.job.cancelled")
        span.end()
        return decision

    def worker_stop(self, worker: Worker) -> None:
        """End the spans of runs that were never decided (put back at shutdown)."""
        with self._lock:
            left = list(self._running.values())
            self._running.clear()
        for _, span in left:
            span.set_attribute("worq.job.outcome", "released")
            span.end()

    def _start_run(self, job: JobContext, *, track: bool = True) -> Span:
        propagator = self._propagator or self._global_propagator()
        parent = propagator.extract(job.headers) if job.headers else None
        links = None
        if parent is not None:
            creation = self._span_of(parent).get_span_context()
            if creation.is_valid:
                links = [self._link(creation)]
        span = self._tracer.start_span(
            f"process {job.queue}",
            context=parent,
            kind=self._consumer,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": job.queue,
                "messaging.message.id": job.id,
                "worq.task.name": job.task,
                "worq.job.attempt": job.attempt,
                "worq.job.max_retries": job.max_retries,
            },
            links=links,
        )
        if track:
            with self._lock:
                self._running[id(job)] = (job, span)
        return span

    def _raised(self, job: JobContext, exc: BaseException) -> None:
        """Record what the task raised, unless its run was already decided (a timeout)."""
        if isinstance(exc, _QUIET):
            return
        with self._lock:  # held while recording: decide pops the entry before it ends the span
            entry = self._running.get(id(job))
            if entry is not None and entry[0] is job:
                entry[1].record_exception(exc)


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _short(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@hookimpl
def worq_register_middleware() -> Iterable[type[Middleware]]:
    """``"otel"``: registered with worq-core, switched on only by naming it."""
    return [OpenTelemetryMiddleware]


__all__ = ["SCHEMA_URL", "SYSTEM", "OpenTelemetryMiddleware"]
