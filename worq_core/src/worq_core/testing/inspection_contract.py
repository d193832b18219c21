"""The broker contract for operators' tools: job listing by state, lookup by id, and events.

:class:`~worq_core.testing.BrokerContract` inherits these cases, so every backend that runs it
runs them too. Listing cases are marked :attr:`Capability.LISTING`, event cases
:attr:`Capability.EVENTS`; each is skipped for a broker that does not declare it. ``worq jobs``,
``worq job`` and the dashboard are built on exactly these answers.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from worq_core.broker import Broker
from worq_core.errors import BrokerError
from worq_core.models import (
    Capability,
    Event,
    EventKind,
    JobStatus,
    Message,
    Outcome,
    Settlement,
)
from worq_core.testing.support import (
    LEASE,
    WAIT,
    BrokerCases,
    fetch_all,
    requires,
    unique,
)


def _message(queue: str, n: int, priority: int = 0, eta: float | None = None) -> Message:
    return Message(f"{queue}-{n}", queue, f"body {n}".encode(), priority, eta)


def _event(job_id: str, kind: EventKind = EventKind.ENQUEUED, detail: str = "") -> Event:
    return Event(kind, job_id, "a.task", "q", time.time(), 1, "w1", detail)


class InspectionBrokerContract(BrokerCases):
    """Listing a queue's jobs by state a page at a time, finding one by id, and events.

    Part of :class:`~worq_core.testing.BrokerContract`; the same ``broker`` fixture serves.
    """

    # -- listing -------------------------------------------------------------------------------

    @requires(Capability.LISTING)
    def test_queued_jobs_are_listed_in_fetch_order_a_page_at_a_time(
        self, broker: Broker, queue: str
    ) -> None:
        messages = [_message(queue, n) for n in range(7)]
        urgent = _message(queue, 99, priority=5)
        broker.enqueue([*messages, urgent])

        pages = [broker.list_jobs(queue, JobStatus.QUEUED, offset, 3) for offset in (0, 3, 6)]

        listed = [job for page in pages for job in page]
        assert [len(page) for page in pages] == [3, 3, 2]
        assert [job.id for job in listed] == [urgent.id] + [m.id for m in messages]
        assert listed[1].body == b"body 0"
        assert {(job.queue, job.status, job.attempts) for job in listed} == {
            (queue, JobStatus.QUEUED, 0)
        }
        assert broker.list_jobs(queue, JobStatus.QUEUED, 8, 3) == []
        [fetched] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        assert fetched.id == listed[0].id, "the listed order is the fetch order"

    @requires(Capability.LISTING, Capability.DELAYED)
    def test_scheduled_and_retrying_jobs_are_listed_by_due_time(
        self, broker: Broker, queue: str
    ) -> None:
        now = time.time()
        later, sooner = _message(queue, 1, eta=now + 600), _message(queue, 2, eta=now + 300)
        failing = _message(queue, 3)
        broker.enqueue([later, sooner, failing])
        [delivery] = fetch_all(broker, queue)
        broker.settle([Settlement(delivery, Outcome.RETRY, 60, "ValueError: flaky")])

        listed = broker.list_jobs(queue, JobStatus.SCHEDULED)

        assert [job.id for job in listed] == [failing.id, sooner.id, later.id]
        retrying = listed[0]
        assert retrying.status is JobStatus.RETRYING
        assert retrying.attempts == 1
        assert "ValueError: flaky" in retrying.reason
        assert listed[1].status is JobStatus.SCHEDULED
        assert listed[1].at == pytest.approx(now + 300, abs=1)
        assert broker.list_jobs(queue, JobStatus.QUEUED) == []

    @requires(Capability.LISTING)
    def test_running_jobs_are_listed_with_their_lease_deadline(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([_message(queue, 1), _message(queue, 2)])
        before = time.time()
        [first] = broker.fetch([queue], 1, lease=LEASE, wait=0)

        [running] = broker.list_jobs(queue, JobStatus.RUNNING)
        [waiting] = broker.list_jobs(queue, JobStatus.QUEUED)

        assert running.id == first.id
        assert running.status is JobStatus.RUNNING
        assert running.attempts == 1
        assert running.at is not None
        assert before + LEASE - 1 <= running.at <= time.time() + LEASE + 1
        assert waiting.id != first.id

    @requires(Capability.LISTING, Capability.DEAD_LETTER)
    def test_dead_jobs_are_listed_newest_first_with_their_reason(
        self, broker: Broker, queue: str
    ) -> None:
        messages = [_message(queue, n) for n in range(3)]
        for message in messages:
            broker.enqueue([message])
            [delivery] = fetch_all(broker, queue)
            broker.settle([Settlement(delivery, Outcome.DEAD, reason=f"boom {message.id}")])

        listed = broker.list_jobs(queue, JobStatus.DEAD, 0, 2)

        assert [job.id for job in listed] == [messages[2].id, messages[1].id]
        assert listed[0].reason == f"boom {messages[2].id}"
        assert listed[0].status is JobStatus.DEAD
        assert listed[0].body == b"body 2"
        assert [j.id for j in broker.list_jobs(queue, JobStatus.DEAD, 2, 2)] == [messages[0].id]

    @requires(Capability.LISTING)
    def test_listing_an_unknown_queue_or_an_empty_page_gives_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([_message(queue, 1)])
        assert broker.list_jobs(unique("nothing-here"), JobStatus.QUEUED) == []
        assert broker.list_jobs(queue, JobStatus.QUEUED, 0, 0) == []
        with pytest.raises(BrokerError):
            broker.list_jobs(queue, JobStatus.SUCCEEDED)

    @requires(Capability.LISTING)
    def test_a_held_job_is_found_by_id_in_any_queue_until_it_is_acknowledged(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        message = Message(uuid.uuid4().hex, other, b"find me", 3)
        broker.enqueue([message])

        found = broker.find_job(message.id)
        assert found is not None
        assert (found.queue, found.status, found.body) == (other, JobStatus.QUEUED, b"find me")

        [delivery] = fetch_all(broker, other)
        running = broker.find_job(message.id)
        assert running is not None
        assert (running.status, running.attempts) == (JobStatus.RUNNING, 1)

        broker.settle([Settlement(delivery, Outcome.ACK)])
        assert broker.find_job(message.id) is None
        assert broker.find_job(uuid.uuid4().hex) is None

    # -- events --------------------------------------------------------------------------------

    @requires(Capability.EVENTS)
    def test_events_are_read_back_in_order_with_ids_to_follow_them_by(self, broker: Broker) -> None:
        tag = uuid.uuid4().hex
        broker.publish_events([_event(f"{tag}-{n}") for n in range(5)])

        newest = broker.read_events(None, limit=3)
        assert [e.job_id for e in newest] == [f"{tag}-{n}" for n in (2, 3, 4)]
        assert all(e.id for e in newest)
        assert newest[0].kind is EventKind.ENQUEUED
        assert (newest[0].task, newest[0].queue, newest[0].attempt) == ("a.task", "q", 1)
        assert newest[0].worker == "w1"

        broker.publish_events([_event(f"{tag}-5", EventKind.DEAD, "ValueError: <b>")])
        after = broker.read_events(newest[-1].id, limit=10)
        assert [(e.job_id, e.kind, e.detail) for e in after] == [
            (f"{tag}-5", EventKind.DEAD, "ValueError: <b>")
        ]
        assert broker.read_events(after[-1].id, limit=10) == []
        assert [e.job_id for e in broker.read_events(newest[0].id, limit=2)] == [
            f"{tag}-3",
            f"{tag}-4",
        ]

    @requires(Capability.EVENTS)
    def test_a_reader_waiting_for_events_wakes_when_one_is_published(self, broker: Broker) -> None:
        broker.publish_events([_event(uuid.uuid4().hex)])
        [last] = broker.read_events(None, limit=1)
        job_id = uuid.uuid4().hex
        publisher = threading.Timer(0.2, broker.publish_events, [[_event(job_id)]])
        publisher.start()
        try:
            woken = broker.read_events(last.id, limit=10, timeout=WAIT)
        finally:
            publisher.join()
        assert [e.job_id for e in woken] == [job_id]

    @requires(Capability.EVENTS)
    def test_a_wait_for_events_ends_empty_at_its_timeout(self, broker: Broker) -> None:
        broker.publish_events([_event(uuid.uuid4().hex)])
        [last] = broker.read_events(None, limit=1)
        assert broker.read_events(last.id, limit=10, timeout=0.2) == []
