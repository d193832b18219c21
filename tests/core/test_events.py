"""Job events: every state change of a job reaches the broker's recent-events stream."""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict

from worq_core import Event, EventKind, JobStatus, WorkerSettings, Worq, chain, current_job
from worq_core.errors import Retry
from worq_core.testing.support import WAIT, running
from worq_memory import MemoryBroker


def settings(app: Worq) -> WorkerSettings:
    return WorkerSettings(
        queues=tuple(app.default_queues()), idle_wait=0.05, handle_signals=False, concurrency=2
    )


def by_job(events: list[Event]) -> dict[str, list[EventKind]]:
    kinds: dict[str, list[EventKind]] = defaultdict(list)
    for event in events:
        kinds[event.job_id].append(event.kind)
    return kinds


def test_every_state_change_of_a_job_is_an_event_in_order() -> None:
    app = Worq(MemoryBroker(), events=True)
    tries: list[int] = []

    @app.task(name="ok")
    def ok() -> int:
        return 1

    @app.task(name="flaky", max_retries=3)
    def flaky() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise Retry(delay=0)
        return "second time"

    @app.task(name="boom", max_retries=0)
    def boom() -> None:
        raise ValueError("<b>no</b>")

    good, retried, dead = ok.enqueue(), flaky.enqueue(), boom.enqueue()
    cancelled = ok.enqueue()
    assert app.cancel(cancelled.id)
    app.worker(settings=settings(app)).run(burst=True)

    events = app.broker.read_events(None, limit=100)
    kinds = by_job(events)
    assert kinds[good.id] == [EventKind.ENQUEUED, EventKind.STARTED, EventKind.SUCCEEDED]
    assert kinds[retried.id] == [
        EventKind.ENQUEUED,
        EventKind.STARTED,
        EventKind.RETRIED,
        EventKind.STARTED,
        EventKind.SUCCEEDED,
    ]
    assert kinds[dead.id] == [EventKind.ENQUEUED, EventKind.STARTED, EventKind.DEAD]
    assert kinds[cancelled.id] == [EventKind.ENQUEUED, EventKind.CANCELLED]

    [death] = [e for e in events if e.kind is EventKind.DEAD]
    assert (death.task, death.queue, death.attempt) == ("boom", "default", 1)
    assert death.detail == "ValueError: <b>no</b>"
    assert death.worker
    [cancel] = [e for e in events if e.kind is EventKind.CANCELLED]
    assert (cancel.task, cancel.queue) == ("ok", "default")
    second = [e for e in events if e.job_id == retried.id and e.kind is EventKind.STARTED][1]
    assert second.attempt == 2
    success = next(e for e in events if e.job_id == good.id and e.kind is EventKind.SUCCEEDED)
    assert float(success.detail) >= 0, "a success carries its run time"


def test_progress_is_an_event_while_the_job_runs() -> None:
    app = Worq(MemoryBroker(), events=True)
    release = threading.Event()

    @app.task(name="copy")
    def copy() -> None:
        current_job().progress(3, total=4, message="copying")
        release.wait(WAIT)

    job = copy.enqueue()
    [enqueued] = app.broker.read_events(None, limit=1)
    with running(app.worker(settings=settings(app))):
        seen: list[Event] = []
        cursor = enqueued.id
        while not any(e.kind is EventKind.PROGRESS for e in seen):
            batch = app.broker.read_events(cursor, limit=10, timeout=WAIT)
            assert batch, "no progress event before the wait ended"
            seen += batch
            cursor = batch[-1].id
        release.set()
        job.result(timeout=WAIT)
    [progress] = [e for e in seen if e.kind is EventKind.PROGRESS]
    assert progress.job_id == job.id
    assert progress.detail == "75% 3/4 copying"


def test_an_app_without_events_sends_none() -> None:
    app = Worq(MemoryBroker())

    @app.task(name="ok")
    def ok() -> int:
        return 1

    job = ok.enqueue()
    app.worker(settings=settings(app)).run(burst=True)
    assert job.status() is JobStatus.SUCCEEDED
    assert app.broker.read_events(None, limit=100) == []


def test_a_broker_error_while_publishing_loses_no_job() -> None:
    broker = MemoryBroker()
    app = Worq(broker, events=True)

    @app.task(name="ok")
    def ok() -> int:
        return 1

    def refuse(events: object) -> None:
        raise ConnectionError("the events stream is down")

    broker.publish_events = refuse  # type: ignore[assignment,method-assign]
    job = ok.enqueue()
    app.worker(settings=settings(app)).run(burst=True)
    assert job.result(timeout=WAIT) == 1


def test_a_workflow_step_sent_by_the_step_before_it_is_an_enqueued_event() -> None:
    app = Worq(MemoryBroker(), events=True)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    flow = chain(add.s(1, 2), add.s(10), add.s(100)).enqueue()
    # One slot: with more, another slot may start a step before its enqueue is buffered.
    one_slot = dataclasses.replace(settings(app), concurrency=1)
    app.worker(settings=one_slot).run(burst=True)
    assert flow.result(timeout=WAIT) == 113
    kinds = by_job(app.broker.read_events(None, limit=100))
    assert len(flow.job_ids) == 3
    for job_id in flow.job_ids:
        assert kinds[job_id] == [EventKind.ENQUEUED, EventKind.STARTED, EventKind.SUCCEEDED]
