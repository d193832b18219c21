"""OpenTelemetry middleware: span names, kinds, attributes and parents, per the messaging semconv.

Spans go to the SDK's InMemorySpanExporter through a SimpleSpanProcessor (exported as each
span ends), from a tracer provider passed to the middleware, so nothing global is touched.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from worq_core import (
    EnqueueRejected,
    EnqueueRequest,
    JobFailed,
    Middleware,
    RetryPolicy,
    WorkerSettings,
    Worq,
)
from worq_core.contrib.otel import SCHEMA_URL, TIMEOUT_ERROR, OpenTelemetryMiddleware
from worq_core.errors import PayloadTooLarge
from worq_core.models import Message
from worq_core.registry import Registry
from worq_memory import MemoryBroker


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def otel(provider: TracerProvider) -> OpenTelemetryMiddleware:
    return OpenTelemetryMiddleware(provider)


@pytest.fixture
def app(otel: OpenTelemetryMiddleware) -> Worq:
    return Worq(MemoryBroker(), middleware=[otel])


def drain(app: Worq, concurrency: int = 2) -> None:
    settings = WorkerSettings(
        queues=tuple(app.default_queues()),
        concurrency=concurrency,
        idle_wait=0.01,
        handle_signals=False,
    )
    app.worker(settings=settings).run(burst=True)


def spans(exporter: InMemorySpanExporter, kind: SpanKind | None = None) -> list[ReadableSpan]:
    found = exporter.get_finished_spans()
    return [s for s in found if kind is None or s.kind is kind]


def by_job(found: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    grouped: dict[str, list[ReadableSpan]] = {}
    for span in found:
        assert span.attributes is not None
        grouped.setdefault(str(span.attributes["messaging.message.id"]), []).append(span)
    return grouped


def test_a_job_gets_a_send_span_and_its_run_a_process_span_in_the_same_trace(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    seen: dict[str, str] = {}

    @app.task(name="add", queue="math")
    def add(x: int, y: int) -> int:
        from worq_core import current_job

        seen.update(current_job().headers)
        return x + y

    job = add.enqueue(1, 2)
    [send] = spans(exporter)
    drain(app)
    assert job.result(timeout=5) == 3
    [process] = spans(exporter, SpanKind.CONSUMER)

    assert send.name == "send math"
    assert send.kind is SpanKind.PRODUCER
    assert send.attributes == {
        "messaging.system": "worq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "math",
        "messaging.message.id": job.id,
        "worq.task.name": "add",
    }
    assert send.status.status_code is StatusCode.UNSET
    assert send.instrumentation_scope is not None
    assert send.instrumentation_scope.schema_url == SCHEMA_URL

    # W3C trace context in the job's headers names the send span.
    send_context = send.get_span_context()
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{send_context.trace_id:032x}",
        f"{send_context.span_id:016x}",
    )
    assert int(flags, 16) & 1, "sampled"

    assert process.name == "process math"
    assert process.attributes is not None
    assert dict(process.attributes) == {
        "messaging.system": "worq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "math",
        "messaging.message.id": job.id,
        "worq.task.name": "add",
        "worq.job.attempt": 1,
        "worq.job.max_retries": 3,
        "worq.job.outcome": "succeeded",
    }
    assert process.parent is not None
    assert process.parent.span_id == send_context.span_id
    assert process.context.trace_id == send_context.trace_id
    assert [link.context.span_id for link in process.links] == [send_context.span_id]
    assert process.status.status_code is StatusCode.UNSET


def test_the_send_span_is_a_child_of_the_callers_span_and_the_tasks_spans_nest_in_the_run(
    app: Worq, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    tracer = provider.get_tracer("test")

    @app.task(name="parent")
    def parent() -> None:
        with tracer.start_as_current_span("inside the task"):
            child.enqueue()

    @app.task(name="child")
    def child() -> None:
        return None

    with tracer.start_as_current_span("request") as request:
        parent.enqueue()
    drain(app, concurrency=1)

    named = {f"{s.name}:{(s.attributes or {}).get('worq.task.name')}": s for s in spans(exporter)}
    trace_ids = {s.context.trace_id for s in named.values()}
    assert trace_ids == {request.get_span_context().trace_id}, "one trace from request to child"
    send_parent = named["send default:parent"]
    process_parent = named["process default:parent"]
    inside = named["inside the task:None"]
    send_child = named["send default:child"]
    process_child = named["process default:child"]
    assert send_parent.parent is not None
    assert send_parent.parent.span_id == request.get_span_context().span_id
    assert process_parent.parent is not None
    assert process_parent.parent.span_id == send_parent.context.span_id
    assert inside.parent is not None
    assert inside.parent.span_id == process_parent.context.span_id
    assert send_child.parent is not None
    assert send_child.parent.span_id == inside.context.span_id
    assert process_child.parent is not None
    assert process_child.parent.span_id == send_child.context.span_id


def test_a_retried_job_has_one_process_span_per_attempt_with_the_retry_recorded(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    calls = []

    @app.task(name="flaky", max_retries=2, retry=RetryPolicy(base=0.01, jitter=False))
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the first attempt fails")
        return "ok"

    job = flaky.enqueue()
    drain(app)
    assert job.result(timeout=5) == "ok"
    [send] = spans(exporter, SpanKind.PRODUCER)
    first, second = sorted(
        spans(exporter, SpanKind.CONSUMER),
        key=lambda s: (s.attributes or {})["worq.job.attempt"],
    )
    for run in (first, second):
        assert run.parent is not None
        assert run.parent.span_id == send.context.span_id
        assert run.context.trace_id == send.context.trace_id
    assert first.attributes is not None
    assert first.attributes["worq.job.attempt"] == 1
    assert first.attributes["worq.job.outcome"] == "retrying"
    assert first.attributes["error.type"] == "ConnectionError"
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ConnectionError: the first attempt fails"
    events = {e.name: e for e in first.events}
    assert events["exception"].attributes is not None
    assert events["exception"].attributes["exception.type"] == "ConnectionError"
    retry = events["worq.job.retry"]
    assert retry.attributes is not None
    assert retry.attributes["worq.retry.delay"] == pytest.approx(0.01)
    assert second.attributes is not None
    assert second.attributes["worq.job.attempt"] == 2
    assert second.attributes["worq.job.outcome"] == "succeeded"
    assert second.status.status_code is StatusCode.UNSET
    assert [e.name for e in second.events] == []


def test_a_dead_lettered_job_ends_its_span_in_error(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    @app.task(name="doomed", max_retries=0)
    def doomed() -> None:
        raise ValueError("never works")

    job = doomed.enqueue()
    drain(app)
    with pytest.raises(JobFailed):
        job.result(timeout=5)
    [process] = spans(exporter, SpanKind.CONSUMER)
    assert process.attributes is not None
    assert process.attributes["worq.job.outcome"] == "dead"
    assert process.attributes["error.type"] == "ValueError"
    assert process.status.status_code is StatusCode.ERROR
    assert [e.name for e in process.events] == ["exception", "worq.job.dead_lettered"]


def test_a_sync_job_that_times_out_has_its_span_ended_by_the_verdict_while_its_code_runs_on(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    release = threading.Event()
    returned = threading.Event()

    @app.task(name="stuck", timeout=0.2, max_retries=0)
    def stuck() -> None:
        release.wait(30)
        returned.set()

    job = stuck.enqueue()
    drain(app)
    with pytest.raises(JobFailed):
        job.result(timeout=5)
    [process] = spans(exporter, SpanKind.CONSUMER)  # ended though the code still runs
    assert not returned.is_set()
    assert process.attributes is not None
    assert process.attributes["worq.job.outcome"] == "dead"
    assert process.attributes["error.type"] == TIMEOUT_ERROR
    assert process.status.status_code is StatusCode.ERROR
    assert "worq.job.timeout" in [e.name for e in process.events]
    release.set()
    assert returned.wait(10)
    # The abandoned code returning later touches no ended span and adds none.
    assert len(spans(exporter, SpanKind.CONSUMER)) == 1


def test_an_async_task_runs_in_its_span_and_its_timeout_is_recorded(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    current: list[int] = []

    @app.task(name="fetch", queue="io")
    async def fetch(n: int) -> int:
        await asyncio.sleep(0)
        current.append(trace.get_current_span().get_span_context().span_id)
        return n * 2

    @app.task(name="slow", queue="io", timeout=0.05, max_retries=0)
    async def slow() -> None:
        await asyncio.sleep(30)

    fast = fetch.enqueue(21)
    late = slow.enqueue()
    drain(app)
    assert fast.result(timeout=5) == 42
    with pytest.raises(JobFailed):
        late.result(timeout=5)
    runs = by_job(spans(exporter, SpanKind.CONSUMER))
    sends = by_job(spans(exporter, SpanKind.PRODUCER))
    [fetch_run] = runs[fast.id]
    assert current == [fetch_run.context.span_id], "the run's span is current inside the task"
    assert fetch_run.parent is not None
    assert fetch_run.parent.span_id == sends[fast.id][0].context.span_id
    [slow_run] = runs[late.id]
    assert slow_run.attributes is not None
    assert slow_run.attributes["error.type"] == TIMEOUT_ERROR
    names = [e.name for e in slow_run.events]
    assert "worq.job.timeout" in names
    assert "exception" in names  # the TaskTimeoutError the coroutine's wait_for raised


def test_enqueue_many_gives_each_job_its_own_send_span_and_parent(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    @app.task(name="square")
    def square(n: int) -> int:
        return n * n

    jobs = square.enqueue_many([(n,) for n in range(5)])
    drain(app)
    assert [j.result(timeout=5) for j in jobs] == [0, 1, 4, 9, 16]
    sends = by_job(spans(exporter, SpanKind.PRODUCER))
    runs = by_job(spans(exporter, SpanKind.CONSUMER))
    assert set(sends) == set(runs) == {j.id for j in jobs}
    assert len({s[0].context.span_id for s in sends.values()}) == 5
    for job in jobs:
        [send], [run] = sends[job.id], runs[job.id]
        assert send.attributes is not None
        assert send.attributes["messaging.batch.message_count"] == 5
        assert run.parent is not None
        assert run.parent.span_id == send.context.span_id


def test_a_failed_send_ends_the_span_with_the_error() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = MemoryBroker()
    app = Worq(broker, middleware=[OpenTelemetryMiddleware(provider)])

    @app.task(name="noop")
    def noop() -> None:
        return None

    def refuse(messages: Sequence[Message]) -> list[bool]:
        raise ConnectionError("the broker went away")

    broker.enqueue = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        noop.enqueue()
    [send] = spans(exporter)
    assert send.status.status_code is StatusCode.ERROR
    assert send.attributes is not None
    assert send.attributes["error.type"] == "ConnectionError"
    assert [e.name for e in send.events] == ["exception"]


def test_a_veto_or_a_payload_too_large_after_the_span_started_still_ends_it(
    otel: OpenTelemetryMiddleware, exporter: InMemorySpanExporter
) -> None:
    class Veto(Middleware):
        def before_enqueue(self, request: EnqueueRequest) -> None:
            if request.args == ["no"]:
                raise EnqueueRejected(request.task, "not today")

    app = Worq(MemoryBroker(), middleware=[otel, Veto()], max_payload=200)

    @app.task(name="echo")
    def echo(text: str) -> str:
        return text

    with pytest.raises(EnqueueRejected):
        echo.enqueue("no")
    with pytest.raises(PayloadTooLarge):
        echo.enqueue("x" * 1000)
    with pytest.raises(EnqueueRejected):
        echo.enqueue_many([("fine",), ("no",)])  # the first, already prepared, hears it too
    ended = spans(exporter)
    assert len(ended) == 4
    assert all(s.status.status_code is StatusCode.ERROR for s in ended)
    assert [(s.attributes or {})["error.type"] for s in ended] == [
        "worq_core.errors.EnqueueRejected",
        "worq_core.errors.PayloadTooLarge",
        "worq_core.errors.EnqueueRejected",
        "worq_core.errors.EnqueueRejected",
    ]
    assert otel._sending == {}


def test_a_creation_context_the_caller_put_in_the_headers_is_kept_and_linked(
    app: Worq, exporter: InMemorySpanExporter
) -> None:
    @app.task(name="noop")
    def noop() -> None:
        return None

    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    job = noop.options(headers={"traceparent": given}).enqueue()
    drain(app)
    [send] = spans(exporter, SpanKind.PRODUCER)
    [run] = spans(exporter, SpanKind.CONSUMER)
    assert [f"{link.context.span_id:016x}" for link in send.links] == ["b7ad6b7169203331"]
    assert run.parent is not None
    assert f"{run.parent.span_id:016x}" == "b7ad6b7169203331"
    assert f"{run.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert job.result(timeout=5) is None


def test_a_delivery_settled_without_running_gets_a_process_span_with_its_verdict(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    broker = MemoryBroker()
    producer = Worq(broker, middleware=[OpenTelemetryMiddleware(provider)])
    consumer = Worq(broker, middleware=[OpenTelemetryMiddleware(provider)])

    @producer.task(name="only.on.the.producer")
    def gone() -> None:
        return None

    gone.enqueue()
    drain(consumer)
    [send] = spans(exporter, SpanKind.PRODUCER)
    [run] = spans(exporter, SpanKind.CONSUMER)
    assert run.attributes is not None
    assert run.attributes["worq.job.outcome"] == "dead"
    assert run.status.status_code is StatusCode.ERROR
    assert run.parent is not None
    assert run.parent.span_id == send.context.span_id


def test_workflow_steps_and_scheduled_ticks_become_create_spans_their_runs_descend_from(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel = OpenTelemetryMiddleware(provider, orphan_after=0.0)
    app = Worq(MemoryBroker(), middleware=[otel])

    @app.task(name="step")
    def step(n: int) -> int:
        return n + 1

    workflow = (step.s(1) | step.s()).enqueue()  # the broker sends the steps: no after_enqueue
    step.enqueue(0)  # an enqueue ends what no after_enqueue will, once it is old enough
    drain(app)
    assert workflow.result(timeout=5) == 3
    creates = [s for s in spans(exporter, SpanKind.PRODUCER) if s.name == "create default"]
    assert len(creates) == 2
    for create in creates:
        assert create.attributes is not None
        assert create.attributes["messaging.operation.type"] == "create"
        assert create.start_time == create.end_time
    runs = spans(exporter, SpanKind.CONSUMER)
    assert len(runs) == 3
    parents = {r.parent.span_id for r in runs if r.parent is not None}
    assert {c.context.span_id for c in creates} <= parents

    schedule = app.schedule(step, every=60, args=(5,))
    message = schedule.message(1_800_000_000.0)
    [tick] = [s for s in spans(exporter) if s.name == "create default" and s not in creates]
    assert (tick.attributes or {})["messaging.message.id"] == message.id


def test_otel_is_a_built_in_name_and_importing_it_loads_no_opentelemetry() -> None:
    import worq_core.contrib.otel as module

    registry = Registry()
    registry.register(module, distribution="worq-core")
    assert registry.middleware_class("otel") is OpenTelemetryMiddleware
    app = Worq(MemoryBroker(), registry=registry, middleware=["otel"])
    assert isinstance(app.middleware.middlewares[0], OpenTelemetryMiddleware)
    # The installed worq-core registers it through its entry point.
    from worq_core.registry import default_registry

    assert default_registry().middleware_class("otel") is OpenTelemetryMiddleware

    # Registered but not named, it costs no import (redis-py, when installed, loads parts of
    # opentelemetry for its own metrics: the app here leaves it out).
    code = (
        "import sys\n"
        "import worq_core.contrib.otel, worq_core.serializers\n"
        "from worq_core import Worq\n"
        "from worq_core.registry import Registry\n"
        "registry = Registry()\n"
        "registry.register(worq_core.serializers)\n"
        "registry.register(worq_core.contrib.otel)\n"
        "import worq_memory.plugin\n"
        "registry.register(worq_memory.plugin)\n"
        "app = Worq('memory://', registry=registry)\n"
        "@app.task\n"
        "def noop() -> None: ...\n"
        "noop.enqueue()\n"
        "app.worker().run(burst=True)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_tracing_example_prints_one_trace_from_the_request_to_every_run() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "tracing" / "app.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1 trace, 7 spans",
        "POST /orders (INTERNAL)",
        "  send default (PRODUCER, place_order)",
        "    process default (CONSUMER, place_order, attempt 1, succeeded)",
        "      send default (PRODUCER, charge)",
        "        process default (CONSUMER, charge, attempt 1, retrying)",
        "        process default (CONSUMER, charge, attempt 2, succeeded)",
        "          call payment gateway (INTERNAL)",
    ]
