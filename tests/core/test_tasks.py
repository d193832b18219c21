from __future__ import annotations

import asyncio
import time

import pytest

from worq_core import JobStatus, TaskArgumentsError, TaskError, UnknownTaskError, Worq


@pytest.fixture
def app() -> Worq:
    return Worq("memory://")


def test_a_plain_call_runs_the_function_inline(app: Worq) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add(2, 3) == 5
    assert app.broker.stats() == []


def test_tasks_are_named_after_their_module_and_qualname_unless_named(app: Worq) -> None:
    @app.task
    def plain() -> None: ...

    @app.task(name="billing.charge", queue="billing", priority=3, max_retries=7, timeout=9)
    def charge() -> None: ...

    assert plain.name.startswith(f"{__name__}.test_tasks_are_named_after_their_module")
    assert plain.name.endswith(".<locals>.plain")
    assert charge.name == "billing.charge"
    config = charge.config
    assert (config.queue, config.priority, config.max_retries, config.timeout) == (
        "billing",
        3,
        7,
        9,
    )
    assert app.get_task("billing.charge") is charge
    assert app.default_queues() == ["default", "billing"]


def test_registering_a_name_twice_is_an_error(app: Worq) -> None:
    @app.task(name="twice")
    def first() -> None: ...

    with pytest.raises(TaskError, match="twice"):

        @app.task(name="twice")
        def second() -> None: ...


def test_options_override_queue_priority_and_schedule(app: Worq) -> None:
    @app.task
    def job() -> None: ...

    urgent = job.options(queue="high", priority=9).enqueue()
    later = job.options(delay=60).enqueue()
    at = job.options(eta=time.time() + 120, queue="high").enqueue()
    assert urgent.queue == "high"
    assert later.status() is JobStatus.SCHEDULED
    assert at.status() is JobStatus.SCHEDULED
    [high] = app.broker.stats(["high"])
    assert (high.ready, high.delayed) == (1, 1)


def test_bad_options_are_refused(app: Worq) -> None:
    @app.task
    def job() -> None: ...

    with pytest.raises(TaskError, match="delay or eta"):
        job.options(delay=1, eta=time.time())
    with pytest.raises(TaskError, match="negative"):
        job.options(delay=-1)
    with pytest.raises(TaskError, match="enqueue_many"):
        job.options(job_id="x").enqueue_many([()])


def test_enqueue_many_takes_tuples_and_keyword_dicts_in_one_batch(app: Worq) -> None:
    @app.task
    def power(base: int, exp: int = 2) -> int:
        return int(base**exp)

    jobs = power.enqueue_many([(3,), {"base": 2, "exp": 10}, (5, 3)])
    app.worker(concurrency=1).run(burst=True)
    assert [job.result(timeout=5) for job in jobs] == [9, 1024, 125]


def test_enqueue_many_refuses_items_that_are_not_args_or_kwargs(app: Worq) -> None:
    @app.task
    def echo(text: str) -> str:
        return text

    with pytest.raises(TaskArgumentsError, match="tuple of args"):
        echo.enqueue_many(["not-a-tuple"])
    assert app.broker.stats() == []


def test_enqueue_async_sends_from_a_coroutine(app: Worq) -> None:
    @app.task
    def echo(text: str) -> str:
        return text

    async def produce() -> str:
        job = await echo.enqueue_async("hi")
        return job.id

    job_id = asyncio.run(produce())
    app.worker(concurrency=1).run(burst=True)
    assert app.job(job_id).result(timeout=5) == "hi"


def test_result_async_waits_without_blocking_the_loop(app: Worq) -> None:
    @app.task
    def echo(text: str) -> str:
        return text

    job = echo.enqueue("later")
    app.worker(concurrency=1).run(burst=True)
    assert asyncio.run(job.result_async(timeout=5)) == "later"


def test_enqueue_by_name_and_unknown_names(app: Worq) -> None:
    @app.task(name="greet")
    def greet(name: str) -> str:
        return f"hello {name}"

    job = app.enqueue("greet", ["ada"], priority=1)
    app.worker().run(burst=True)
    assert job.result(timeout=5) == "hello ada"
    with pytest.raises(UnknownTaskError, match="nope"):
        app.enqueue("nope")


def test_an_unknown_job_id_has_status_unknown(app: Worq) -> None:
    assert app.job("never-seen").status() is JobStatus.UNKNOWN


def test_configure_switches_the_broker_before_first_use_only(app: Worq) -> None:
    app.configure(broker="memory://other")
    assert app.broker.url == "memory://other"
    assert app.storage.url == "memory://other"
    with pytest.raises(TaskError, match="before"):
        app.configure(broker="memory://third")
