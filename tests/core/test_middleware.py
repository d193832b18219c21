"""Middleware: ordered hooks around enqueue, the run, the verdict and the worker's life."""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import pytest

from worq_core import (
    Decision,
    EnqueueRejected,
    EnqueueRequest,
    JobContext,
    JobStatus,
    Middleware,
    Registry,
    Service,
    TaskError,
    UnknownPluginError,
    Worker,
    WorkerSettings,
    Worq,
    current_job,
    hookimpl,
)
from worq_core.job import ErrorInfo
from worq_core.middleware import MiddlewareStack
from worq_core.models import Message
from worq_core.serializers import MsgpackSerializer
from worq_memory import MemoryBroker, MemoryStorage


def drain(app: Worq, concurrency: int = 2) -> Worker:
    worker = app.worker(
        settings=WorkerSettings(
            queues=tuple(app.default_queues()),
            concurrency=concurrency,
            idle_wait=0.05,
            handle_signals=False,
        )
    )
    worker.run(burst=True)
    return worker


class Recorder(Middleware):
    """Records every hook call into a shared list, tagged with its own label."""

    def __init__(self, label: str, calls: list[str]) -> None:
        self.label = label
        self.calls = calls

    def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
        self.calls.append(f"{self.label}:before")
        try:
            return call()
        finally:
            self.calls.append(f"{self.label}:after")

    async def wrap_run_async(self, job: JobContext, call: Callable[[], Awaitable[Any]]) -> Any:
        self.calls.append(f"{self.label}:async-before")
        try:
            return await call()
        finally:
            self.calls.append(f"{self.label}:async-after")


@pytest.mark.parametrize("concurrency", [1, 3])
def test_the_first_middleware_wraps_the_others_around_sync_and_async_runs(
    concurrency: int,
) -> None:
    calls: list[str] = []
    app = Worq(middleware=[Recorder("outer", calls), Recorder("inner", calls)])

    @app.task
    def sync_job() -> str:
        calls.append("sync")
        return "s"

    @app.task
    async def async_job() -> str:
        await asyncio.sleep(0)
        calls.append("async")
        return "a"

    first = sync_job.enqueue()
    drain(app, concurrency)
    second = async_job.enqueue()
    drain(app, concurrency)
    assert (first.result(timeout=5), second.result(timeout=5)) == ("s", "a")
    assert calls == [
        "outer:before",
        "inner:before",
        "sync",
        "inner:after",
        "outer:after",
        "outer:async-before",
        "inner:async-before",
        "async",
        "inner:async-after",
        "outer:async-after",
    ]


def test_before_enqueue_adds_headers_the_task_reads() -> None:
    class Tenant(Middleware):
        def before_enqueue(self, request: EnqueueRequest) -> None:
            request.headers.setdefault("tenant", "acme")

    app = Worq(middleware=[Tenant()])

    @app.task
    def who() -> dict[str, str]:
        return dict(current_job().headers)

    default = who.enqueue()
    explicit = who.options(headers={"tenant": "globex", "trace": "t1"}).enqueue()
    drain(app)
    assert default.result(timeout=5) == {"tenant": "acme"}
    assert explicit.result(timeout=5) == {"tenant": "globex", "trace": "t1"}


def test_a_veto_sends_nothing_of_the_batch() -> None:
    class NoNegatives(Middleware):
        def before_enqueue(self, request: EnqueueRequest) -> None:
            if any(a < 0 for a in request.args):
                raise EnqueueRejected(request.task, "negative amounts", "NoNegatives")

    app = Worq(middleware=[NoNegatives()])

    @app.task
    def pay(amount: int) -> int:
        return amount

    with pytest.raises(EnqueueRejected, match="negative amounts"):
        pay.enqueue(-1)
    with pytest.raises(EnqueueRejected):
        pay.enqueue_many([(1,), (-2,), (3,)])
    assert all(s.ready == 0 for s in app.broker.stats())


def test_after_enqueue_sees_each_call_once_with_its_jobs_and_how_the_send_ended() -> None:
    seen: list[tuple[list[str], str | None]] = []

    class Watch(Middleware):
        def after_enqueue(
            self, requests: Sequence[EnqueueRequest], error: BaseException | None
        ) -> None:
            seen.append(([r.job_id for r in requests], type(error).__name__ if error else None))

    broker = MemoryBroker()
    app = Worq(broker=broker, middleware=[Watch()])

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    one = add.enqueue(1, 2)
    many = add.enqueue_many([(1, 1), (2, 2)])
    assert seen == [([one.id], None), ([j.id for j in many], None)]

    def refuse(messages: Sequence[Message]) -> list[bool]:
        raise ConnectionError("the broker went away")

    broker.enqueue = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        add.enqueue(3, 4)
    assert len(seen[-1][0]) == 1
    assert seen[-1][1] == "ConnectionError"


def test_after_enqueue_hears_of_a_call_that_failed_before_sending_with_its_error() -> None:
    # What a before_enqueue opened (a span, a pending event) must close though nothing is sent.
    seen: list[tuple[list[object], str]] = []

    class Watch(Middleware):
        def before_enqueue(self, request: EnqueueRequest) -> None:
            return None

        def after_enqueue(
            self, requests: Sequence[EnqueueRequest], error: BaseException | None
        ) -> None:
            seen.append(([r.args[0] for r in requests], type(error).__name__))

    class Veto(Middleware):
        def before_enqueue(self, request: EnqueueRequest) -> None:
            if request.args == ["no"]:
                raise EnqueueRejected(request.task, "not this one")

    app = Worq(broker=MemoryBroker(), middleware=[Watch(), Veto()], max_payload=200)

    @app.task
    def echo(text: str) -> str:
        return text

    with pytest.raises(EnqueueRejected):
        echo.enqueue("no")
    from worq_core.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge):
        echo.enqueue("x" * 1000)
    with pytest.raises(EnqueueRejected):
        echo.enqueue_many([("a",), ("b",), ("no",)])
    assert seen == [
        (["no"], "EnqueueRejected"),
        (["x" * 1000], "PayloadTooLarge"),
        (["no"], "EnqueueRejected"),  # the item that failed
        (["a", "b"], "EnqueueRejected"),  # and those prepared before it: none was sent
    ]
    assert all(s.ready == 0 for s in app.broker.stats())


def test_decide_may_change_the_verdict_and_after_settle_sees_the_final_one() -> None:
    settled: list[tuple[str, JobStatus]] = []

    class FailSoft(Middleware):
        def decide(self, job: JobContext, decision: Decision) -> Decision:
            if decision.status is JobStatus.RETRYING and job.task.endswith("optional"):
                return Decision(JobStatus.SUCCEEDED, value="skipped")
            return decision

        def after_settle(self, job: JobContext, decision: Decision) -> None:
            settled.append((job.task.rsplit(".", 1)[-1], decision.status))

    app = Worq(middleware=[FailSoft()])

    @app.task
    def optional() -> str:
        raise RuntimeError("not today")

    @app.task
    def fine() -> str:
        return "ok"

    jobs = [optional.enqueue(), fine.enqueue()]
    drain(app, concurrency=1)
    assert [j.result(timeout=5) for j in jobs] == ["skipped", "ok"]
    assert sorted(settled) == [("fine", JobStatus.SUCCEEDED), ("optional", JobStatus.SUCCEEDED)]


def test_a_middleware_error_in_the_run_is_the_jobs_failure_not_the_workers() -> None:
    class Broken(Middleware):
        def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
            raise ValueError("middleware bug")

    app = Worq(middleware=[Broken()])

    @app.task(max_retries=0)
    def job() -> None:
        pass

    handle = job.enqueue()
    worker = drain(app)
    assert handle.status() is JobStatus.DEAD
    assert worker.counters.dead == 1


def test_worker_start_stop_and_services_run_inside_the_worker() -> None:
    events: list[str] = []
    ticked = threading.Event()

    class Beat(Service):
        name = "beat"

        def tick(self, now: float) -> float | None:
            events.append("tick")
            ticked.set()
            return None

    class Lifecycle(Middleware):
        def worker_start(self, worker: Worker) -> None:
            events.append("start")

        def worker_stop(self, worker: Worker) -> None:
            events.append("stop")

        def services(self, worker: Worker) -> Iterable[Service]:
            return [Beat()]

    app = Worq(middleware=[Lifecycle()])

    @app.task
    def wait_for_the_service() -> bool:
        return ticked.wait(5)

    job = wait_for_the_service.enqueue()
    drain(app)
    assert job.result(timeout=5) is True
    assert events == ["start", "tick", "stop"]


def test_an_empty_stack_and_no_op_middleware_compose_no_hooks() -> None:
    class DoesNothing(Middleware):
        pass

    for stack in (MiddlewareStack(()), MiddlewareStack([DoesNothing(), DoesNothing()])):
        assert stack.enqueue == stack.wraps == stack.async_wraps == stack.decides == ()
        assert stack.run(JobContext("i", "t", "q", 1, 0), lambda: 42) == 42
    assert not MiddlewareStack(())
    assert MiddlewareStack([DoesNothing()])


def test_a_decision_checks_what_it_is_given() -> None:
    with pytest.raises(ValueError, match="cannot end"):
        Decision(JobStatus.QUEUED)
    with pytest.raises(ValueError, match="negative"):
        Decision(JobStatus.RETRYING, error=ErrorInfo("E", "m"), delay=-1)


def test_middleware_from_a_plugin_is_used_only_when_an_app_names_it() -> None:
    class Stamp(Middleware):
        name = "stamp"

        def before_enqueue(self, request: EnqueueRequest) -> None:
            request.headers["stamped"] = "yes"

    plugin = types.SimpleNamespace(worq_register_middleware=hookimpl(lambda: [Stamp]))
    registry = Registry()
    registry.register(plugin, name="stamp-plugin", distribution="worq-stamp")

    def app_on(registry: Registry, **options: Any) -> Worq:
        return Worq(
            MemoryBroker(),
            storage=MemoryStorage(),
            serializer=MsgpackSerializer(),
            registry=registry,
            **options,
        )

    plain = app_on(registry)
    named = app_on(registry, middleware=["stamp"])
    for app in (plain, named):

        @app.task(name="headers")
        def headers() -> dict[str, str]:
            return dict(current_job().headers)

    jobs = [plain.tasks["headers"].enqueue(), named.tasks["headers"].enqueue()]
    drain(plain)
    drain(named)
    assert [j.result(timeout=5) for j in jobs] == [{}, {"stamped": "yes"}]
    with pytest.raises(UnknownPluginError, match="stamp"):
        _ = app_on(registry, middleware=["nope"]).middleware


def test_headers_a_middleware_sets_must_be_strings_too() -> None:
    class Sloppy(Middleware):
        def before_enqueue(self, request: EnqueueRequest) -> None:
            request.headers["attempt"] = 1  # type: ignore[assignment]

    app = Worq(middleware=[Sloppy()])

    @app.task
    def job() -> None:
        pass

    with pytest.raises(TaskError, match="not all strings"):
        job.enqueue()
    assert app.broker.stats() == []


def test_a_failing_decide_hook_leaves_the_workers_own_verdict() -> None:
    class Broken(Middleware):
        def decide(self, job: JobContext, decision: Decision) -> Decision:
            raise RuntimeError("middleware bug")

    app = Worq(middleware=[Broken()])

    @app.task
    def fine() -> int:
        return 1

    handle = fine.enqueue()
    drain(app)
    assert handle.result(timeout=5) == 1
