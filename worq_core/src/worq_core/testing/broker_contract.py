"""The broker contract: what every :class:`~worq_core.Broker` must do, as tests."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from worq_core.broker import Broker
from worq_core.models import (
    CancelOutcome,
    Capability,
    Delivery,
    JobState,
    JobStatus,
    LeaseState,
    Message,
    Outcome,
    QueueStats,
    Settlement,
    UniqueKey,
    WorkerInfo,
)
from worq_core.storage import Storage
from worq_core.testing.inspection_contract import InspectionBrokerContract
from worq_core.testing.scheduling_contract import SchedulingBrokerContract
from worq_core.testing.support import (
    CLOCK_SLACK,
    LEASE,
    SHORT_LEASE,
    WAIT,
    eventually,
    ids,
    requires,
    status,
    unique,
)
from worq_core.testing.worker_leases_contract import WorkerLeasesBrokerContract
from worq_core.testing.workflow_contract import WorkflowBrokerContract


def message(
    queue: str,
    body: bytes = b"payload",
    *,
    priority: int = 0,
    eta: float | None = None,
    job_id: str | None = None,
    clear_record: bool = False,
) -> Message:
    """A message with a fresh id."""
    return Message(job_id or uuid.uuid4().hex, queue, body, priority, eta, clear_record)


def progress(broker: Broker, job_id: str) -> bytes | None:
    """The job's progress in ``broker``, or ``None`` when it has none or is not held."""
    state = broker.job_state(job_id)
    return None if state is None else state.progress


def fetch_one(broker: Broker, queue: str, lease: float = LEASE) -> Delivery:
    """Lease the one job that is due in ``queue``."""
    [delivery] = broker.fetch([queue], 1, lease=lease, wait=0)
    return delivery


class BrokerContract(
    SchedulingBrokerContract,
    WorkflowBrokerContract,
    InspectionBrokerContract,
    WorkerLeasesBrokerContract,
):
    """Subclass and provide a ``broker`` fixture yielding a fresh broker.

    Every case uses queues (and job ids) of its own, so a broker shared between cases also
    works.

    A broker that declares :attr:`~worq_core.Capability.RESULTS` also needs a ``storage``
    fixture: a storage that :meth:`~worq_core.Broker.stores_results_in` answers ``True`` for
    (the one an app on that backend gets by default). The results cases read the records the
    broker writes from it; other cases never ask for it.

    Optionally, a ``retaining_broker`` fixture yields a function ``(max_count, max_age)`` that
    makes another broker on the same backend whose dead-letter queue keeps at most
    ``max_count`` dead jobs per queue (the newest) and none dead for longer than ``max_age``
    seconds, as seen by the next read of that queue's dead jobs (``dead_jobs``, ``stats``),
    and closes the brokers it made afterwards. Without it, the two retention cases skip
    (retention settings are each backend's own, so the contract cannot make one itself).
    """

    @pytest.fixture
    def results_storage(self, request: pytest.FixtureRequest, broker: Broker) -> Storage:
        """The ``storage`` fixture, which the broker must store results in."""
        try:
            storage: Storage = request.getfixturevalue("storage")
        except pytest.FixtureLookupError:
            pytest.fail(
                f"{type(broker).__name__} declares RESULTS: the contract needs a `storage` "
                "fixture yielding a storage the broker stores results in"
            )
        assert broker.stores_results_in(storage), (
            "the `storage` fixture must be one the broker stores results in"
        )
        return storage

    # -- enqueue and fetch -----------------------------------------------------------------

    def test_a_fetched_job_carries_its_body_a_token_and_its_first_attempt(
        self, broker: Broker, queue: str
    ) -> None:
        body = bytes(range(256)) + b"\x00\xff"
        msg = message(queue, body)
        assert broker.enqueue([msg]) == [True]
        [delivery] = broker.fetch([queue], 10, lease=LEASE, wait=0)
        assert (delivery.id, delivery.queue, delivery.body) == (msg.id, queue, body)
        assert delivery.attempts == 1
        assert delivery.token

    def test_fetch_from_an_empty_queue_returns_nothing(self, broker: Broker, queue: str) -> None:
        assert broker.fetch([queue], 5, lease=LEASE, wait=0) == []

    def test_fetch_returns_at_most_limit_jobs(self, broker: Broker, queue: str) -> None:
        broker.enqueue([message(queue) for _ in range(5)])
        assert len(broker.fetch([queue], 3, lease=LEASE, wait=0)) == 3
        assert len(broker.fetch([queue], 3, lease=LEASE, wait=0)) == 2

    def test_jobs_of_one_priority_come_out_in_the_order_they_went_in(
        self, broker: Broker, queue: str
    ) -> None:
        sent = [message(queue) for _ in range(20)]
        broker.enqueue(sent[:10])
        for msg in sent[10:]:
            broker.enqueue([msg])
        got = broker.fetch([queue], 7, lease=LEASE, wait=0)
        got += broker.fetch([queue], 20, lease=LEASE, wait=0)
        assert ids(got) == [m.id for m in sent]

    @requires(Capability.PRIORITIES)
    def test_a_larger_priority_is_fetched_first_then_fifo(self, broker: Broker, queue: str) -> None:
        low1, high1, mid, high2, low2 = (message(queue, priority=p) for p in (0, 9, 5, 9, 0))
        broker.enqueue([low1, high1, mid, high2, low2])
        got = broker.fetch([queue], 10, lease=LEASE, wait=0)
        assert ids(got) == [high1.id, high2.id, mid.id, low1.id, low2.id]

    def test_queues_are_isolated_and_fetched_in_the_order_given(self, broker: Broker) -> None:
        first, second, other = unique(), unique(), unique()
        a, b, c = message(second), message(first), message(other)
        broker.enqueue([a, b, c])
        got = broker.fetch([first, second], 10, lease=LEASE, wait=0)
        assert ids(got) == [b.id, a.id]
        assert ids(broker.fetch([other], 10, lease=LEASE, wait=0)) == [c.id]

    def test_enqueue_is_idempotent_by_job_id(self, broker: Broker, queue: str) -> None:
        msg = message(queue, b"first")
        assert broker.enqueue([msg]) == [True]
        again = Message(msg.id, queue, b"second")
        assert broker.enqueue([again, message(queue)]) == [False, True]
        got = broker.fetch([queue], 10, lease=LEASE, wait=0)
        assert [d.body for d in got if d.id == msg.id] == [b"first"]
        assert len(got) == 2
        # still held (leased): still not added twice
        assert broker.enqueue([again]) == [False]

    # -- enqueue from asyncio code ---------------------------------------------------------
    # Each case runs its own event loop with asyncio.run, so no async test plugin is needed.

    def test_enqueue_async_adds_jobs_as_enqueue_does(self, broker: Broker, queue: str) -> None:
        first, second, third = message(queue, b"1"), message(queue, b"2"), message(queue, b"3")

        async def main() -> tuple[list[bool], list[bool], list[bool]]:
            added = await broker.enqueue_async([first])
            again = await broker.enqueue_async([Message(first.id, queue, b"other"), second])
            empty = await broker.enqueue_async([])
            return added, again, empty

        assert asyncio.run(main()) == ([True], [False, True], [])
        broker.enqueue([third])
        got = broker.fetch([queue], 10, lease=LEASE, wait=0)
        assert [(d.id, d.body) for d in got] == [(m.id, m.body) for m in (first, second, third)]

    def test_enqueue_async_from_many_tasks_and_event_loops_adds_every_job_once(
        self, broker: Broker, queue: str
    ) -> None:
        sent = [message(queue) for _ in range(60)]

        async def send(part: list[Message]) -> list[list[bool]]:
            return list(await asyncio.gather(*(broker.enqueue_async([m]) for m in part)))

        assert asyncio.run(send(sent[:40])) == [[True]] * 40
        assert asyncio.run(send(sent[40:] + sent[:5])) == [[True]] * 20 + [[False]] * 5
        got = broker.fetch([queue], 100, lease=LEASE, wait=0)
        assert sorted(ids(got)) == sorted(m.id for m in sent)

    @requires(Capability.PRIORITIES, Capability.DELAYED)
    def test_enqueue_async_honours_priorities_and_etas(self, broker: Broker, queue: str) -> None:
        low, high = message(queue, priority=0), message(queue, priority=5)
        later = message(queue, priority=9, eta=time.time() + 60)

        async def main() -> None:
            await broker.enqueue_async([low])
            await broker.enqueue_async([later, high])

        asyncio.run(main())
        assert ids(broker.fetch([queue], 10, lease=LEASE, wait=0)) == [high.id, low.id]
        assert status(broker, later.id) == JobStatus.SCHEDULED

    @requires(Capability.UNIQUE)
    def test_enqueue_unique_async_answers_with_the_holder_of_the_key(
        self, broker: Broker, queue: str
    ) -> None:
        key = UniqueKey(unique("key"))
        holder = dataclasses.replace(message(queue), unique=key)
        other = dataclasses.replace(message(queue), unique=key)

        async def main() -> tuple[list[str | None], list[str | None]]:
            return (
                await broker.enqueue_unique_async([holder]),
                await broker.enqueue_unique_async([other, holder]),
            )

        assert asyncio.run(main()) == ([None], [holder.id, holder.id])
        assert ids(broker.fetch([queue], 10, lease=LEASE, wait=0)) == [holder.id]

    @requires(Capability.RESULTS)
    def test_enqueue_async_clears_an_old_record_only_when_it_adds_the_job(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        reused = unique("job")
        results_storage.save({reused: b"earlier run"}, ttl=60)
        fresh = message(queue, job_id=reused, clear_record=True)
        assert asyncio.run(broker.enqueue_async([fresh])) == [True]
        assert results_storage.load(reused) is None
        results_storage.save({reused: b"kept"}, ttl=60)
        assert asyncio.run(broker.enqueue_async([fresh])) == [False]
        assert results_storage.load(reused) == b"kept"

    def test_a_blocking_fetch_wakes_up_when_a_job_arrives(self, broker: Broker, queue: str) -> None:
        started = threading.Event()
        result: list[list[Delivery]] = []

        def fetch() -> None:
            started.set()
            result.append(broker.fetch([queue], 1, lease=LEASE, wait=10.0))

        thread = threading.Thread(target=fetch)
        thread.start()
        started.wait(5)
        begin = time.monotonic()
        msg = message(queue)
        broker.enqueue([msg])
        thread.join(10)
        assert ids(result[0]) == [msg.id]
        assert time.monotonic() - begin < 5.0, "the fetch waited for its timeout, not the job"

    def test_a_blocking_fetch_gives_up_after_its_wait(self, broker: Broker, queue: str) -> None:
        begin = time.monotonic()
        assert broker.fetch([queue], 1, lease=LEASE, wait=0.2) == []
        assert time.monotonic() - begin >= 0.2 - CLOCK_SLACK

    # -- settling --------------------------------------------------------------------------

    def test_an_acked_job_is_gone_and_its_id_can_be_used_again(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        assert status(broker, msg.id) is JobStatus.RUNNING
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
        assert broker.job_state(msg.id) is None
        assert broker.fetch([queue], 1, lease=LEASE, wait=0) == []
        assert broker.enqueue([msg]) == [True]

    def test_settling_twice_is_refused_the_second_time(self, broker: Broker, queue: str) -> None:
        broker.enqueue([message(queue)])
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [False]

    def test_a_job_whose_lease_expires_is_delivered_again_with_a_new_token(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        [first] = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0)
        [second] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert second.id == msg.id
        assert second.attempts == 2
        assert second.token != first.token

    def test_an_ack_from_an_expired_lease_is_refused(self, broker: Broker, queue: str) -> None:
        broker.enqueue([message(queue)])
        [stale] = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0)
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert broker.settle([Settlement(stale, Outcome.ACK)]) == [False]
        assert broker.extend([stale], LEASE) == [LeaseState.LOST]
        assert status(broker, current.id) is JobStatus.RUNNING
        assert broker.settle([Settlement(current, Outcome.ACK)]) == [True]

    def test_an_ack_after_the_lease_ran_out_is_refused_even_before_redelivery(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([message(queue)])
        [delivery] = broker.fetch([queue], 1, lease=0.1, wait=0)
        time.sleep(0.1 + 2 * CLOCK_SLACK)  # nothing to wait on: the point is that time passed
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [False]
        assert ids(broker.fetch([queue], 1, lease=LEASE, wait=WAIT)) == [delivery.id]

    def test_extending_a_lease_keeps_the_job_from_being_delivered_again(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([message(queue)])
        [delivery] = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0)
        assert broker.extend([delivery], LEASE) == [LeaseState.HELD]
        assert broker.fetch([queue], 1, lease=LEASE, wait=SHORT_LEASE * 2) == []
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]

    @requires(Capability.DELAYED)
    def test_a_retried_job_waits_for_its_delay_and_counts_its_attempt(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([message(queue)])
        [first] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        settled_at = time.time()
        assert broker.settle([Settlement(first, Outcome.RETRY, 0.3, "ValueError: x")]) == [True]
        assert status(broker, first.id) is JobStatus.RETRYING
        assert broker.fetch([queue], 1, lease=LEASE, wait=0) == []
        [second] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert time.time() >= settled_at + 0.3 - CLOCK_SLACK
        assert (second.id, second.attempts) == (first.id, 2)

    @requires(Capability.DELAYED)
    def test_a_delayed_job_is_never_delivered_before_its_eta(
        self, broker: Broker, queue: str
    ) -> None:
        eta = time.time() + 0.4
        later, now = message(queue, eta=eta), message(queue)
        broker.enqueue([later, now])
        assert status(broker, later.id) is JobStatus.SCHEDULED
        assert ids(broker.fetch([queue], 10, lease=LEASE, wait=0)) == [now.id]
        [delivery] = broker.fetch([queue], 10, lease=LEASE, wait=WAIT)
        assert delivery.id == later.id
        assert time.time() >= eta - CLOCK_SLACK

    @requires(Capability.DELAYED)
    def test_an_eta_in_the_past_is_due_at_once(self, broker: Broker, queue: str) -> None:
        msg = message(queue, eta=time.time() - 60)
        broker.enqueue([msg])
        assert ids(broker.fetch([queue], 1, lease=LEASE, wait=0)) == [msg.id]

    @requires(Capability.DELAYED, Capability.PRIORITIES)
    def test_delayed_jobs_keep_their_priority_once_due(self, broker: Broker, queue: str) -> None:
        eta = time.time() + 0.2
        low, high = message(queue, priority=1, eta=eta), message(queue, priority=7, eta=eta)
        broker.enqueue([low, high])
        first = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert ids(first + broker.fetch([queue], 1, lease=LEASE, wait=WAIT)) == [high.id, low.id]

    @requires(Capability.DEAD_LETTER)
    def test_dead_letter_keeps_the_job_with_its_reason_then_requeue_and_purge(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue, b"body")
        broker.enqueue([msg])
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        assert broker.settle([Settlement(delivery, Outcome.DEAD, reason="KeyError: 'x'")]) == [True]
        assert status(broker, msg.id) is JobStatus.DEAD
        [dead] = broker.dead_jobs(queue)
        assert (dead.id, dead.body, dead.reason, dead.attempts) == (
            msg.id,
            b"body",
            "KeyError: 'x'",
            1,
        )
        assert broker.enqueue([msg]) == [False], "a dead job's id is still taken"
        assert broker.requeue_dead(queue) == 1
        [again] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        assert (again.id, again.attempts) == (msg.id, 1)
        broker.settle([Settlement(again, Outcome.DEAD, reason="again")])
        assert broker.purge_dead(queue) == 1
        assert broker.dead_jobs(queue) == []
        assert broker.job_state(msg.id) is None

    @requires(Capability.DEAD_LETTER)
    def test_requeue_dead_moves_only_the_ids_given(self, broker: Broker, queue: str) -> None:
        sent = [message(queue) for _ in range(3)]
        broker.enqueue(sent)
        deliveries = broker.fetch([queue], 3, lease=LEASE, wait=0)
        broker.settle([Settlement(d, Outcome.DEAD, reason="r") for d in deliveries])
        assert broker.requeue_dead(queue, [sent[1].id, "no-such-id"]) == 1
        assert ids(broker.fetch([queue], 3, lease=LEASE, wait=0)) == [sent[1].id]
        assert {d.id for d in broker.dead_jobs(queue)} == {sent[0].id, sent[2].id}

    @staticmethod
    def _retaining(
        request: pytest.FixtureRequest, broker: Broker
    ) -> Callable[[int, float], Broker]:
        """The optional ``retaining_broker`` fixture; the retention cases skip without it."""
        try:
            make: Callable[[int, float], Broker] = request.getfixturevalue("retaining_broker")
        except pytest.FixtureLookupError:
            pytest.skip(
                f"no `retaining_broker` fixture: give one to test {type(broker).__name__}'s "
                "dead-letter retention"
            )
        return make

    @requires(Capability.DEAD_LETTER)
    def test_dead_letter_retention_keeps_the_newest_dead_jobs_of_each_queue(
        self, request: pytest.FixtureRequest, broker: Broker, queue: str
    ) -> None:
        retaining = self._retaining(request, broker)(2, 3600.0)
        other = unique("contract")
        sent = [message(queue) for _ in range(3)]
        elsewhere = message(other)
        for msg in [*sent, elsewhere]:  # one after the other: the first died first
            retaining.enqueue([msg])
            [delivery] = retaining.fetch([msg.queue], 1, lease=LEASE, wait=0)
            assert retaining.settle([Settlement(delivery, Outcome.DEAD, reason="r")]) == [True]
        assert [d.id for d in retaining.dead_jobs(queue)] == [sent[2].id, sent[1].id]
        assert retaining.stats([queue])[0].dead == 2
        assert [d.id for d in retaining.dead_jobs(other)] == [elsewhere.id], "a bound per queue"
        assert retaining.enqueue([sent[0]]) == [True], "a dropped dead job's id is free again"
        assert retaining.requeue_dead(queue) == 2

    @requires(Capability.DEAD_LETTER)
    def test_dead_letter_retention_drops_jobs_dead_for_longer_than_its_age(
        self, request: pytest.FixtureRequest, broker: Broker, queue: str
    ) -> None:
        retaining = self._retaining(request, broker)(1000, 0.5)
        msg = message(queue)
        retaining.enqueue([msg])
        [delivery] = retaining.fetch([queue], 1, lease=LEASE, wait=0)
        assert retaining.settle([Settlement(delivery, Outcome.DEAD, reason="r")]) == [True]
        eventually(lambda: retaining.dead_jobs(queue) == [], what="the dead job to age out")
        assert retaining.stats([queue])[0].dead == 0
        assert retaining.enqueue([msg]) == [True], "an aged-out dead job's id is free again"

    def test_released_jobs_go_back_to_the_front_without_counting_an_attempt(
        self, broker: Broker, queue: str
    ) -> None:
        first, second = message(queue), message(queue)
        broker.enqueue([first, second])
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        broker.release([delivery])
        assert status(broker, first.id) is JobStatus.QUEUED
        got = broker.fetch([queue], 2, lease=LEASE, wait=0)
        assert ids(got) == [first.id, second.id]
        assert got[0].attempts == 1
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [False]

    def test_settle_and_fetch_settles_then_fetches(self, broker: Broker, queue: str) -> None:
        first, second = message(queue), message(queue)
        broker.enqueue([first, second])
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        applied, got = broker.settle_and_fetch(
            [Settlement(delivery, Outcome.ACK)], [queue], 5, lease=LEASE, wait=0
        )
        assert applied == [True]
        assert ids(got) == [second.id]
        assert broker.job_state(first.id) is None

    def test_settle_and_fetch_waits_for_a_job_enqueued_meanwhile(
        self, broker: Broker, queue: str
    ) -> None:
        first, later = message(queue), message(queue)
        broker.enqueue([first])
        delivery = fetch_one(broker, queue)
        timer = threading.Timer(0.2, lambda: broker.enqueue([later]))
        timer.start()
        try:
            applied, got = broker.settle_and_fetch(
                [Settlement(delivery, Outcome.ACK)], [queue], 5, lease=LEASE, wait=WAIT
            )
        finally:
            timer.join()
        assert applied == [True]
        assert ids(got) == [later.id]

    @requires(Capability.DELAYED)
    def test_settle_and_fetch_waits_for_a_delayed_job_to_come_due(
        self, broker: Broker, queue: str
    ) -> None:
        now = message(queue)
        broker.enqueue([now])
        delivery = fetch_one(broker, queue)
        eta = time.time() + 0.3
        delayed = message(queue, eta=eta)
        broker.enqueue([delayed])
        applied, got = broker.settle_and_fetch(
            [Settlement(delivery, Outcome.ACK)], [queue], 5, lease=LEASE, wait=WAIT
        )
        assert applied == [True]
        assert ids(got) == [delayed.id]
        assert time.time() >= eta - CLOCK_SLACK, "never before its time"

    def test_settle_and_fetch_with_a_stale_token_settles_nothing_and_still_fetches(
        self, broker: Broker, queue: str
    ) -> None:
        first, second = message(queue), message(queue)
        broker.enqueue([first])
        stale = fetch_one(broker, queue, lease=SHORT_LEASE)
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)  # once the lease ran out
        broker.enqueue([second])
        applied, got = broker.settle_and_fetch(
            [Settlement(stale, Outcome.ACK)], [queue], 5, lease=LEASE, wait=0
        )
        assert applied == [False]
        assert ids(got) == [second.id]
        assert status(broker, first.id) is JobStatus.RUNNING
        assert broker.settle([Settlement(current, Outcome.ACK)]) == [True]

    def test_stats_count_jobs_by_state(self, broker: Broker, queue: str) -> None:
        broker.enqueue([message(queue) for _ in range(4)])
        if Capability.DELAYED in broker.capabilities:
            broker.enqueue([message(queue, eta=time.time() + 60)])
        deliveries = broker.fetch([queue], 2, lease=LEASE, wait=0)
        if Capability.DEAD_LETTER in broker.capabilities:
            broker.settle([Settlement(deliveries[0], Outcome.DEAD, reason="r")])
        [stats] = broker.stats([queue])
        assert stats.queue == queue
        assert stats.ready == 2
        assert stats.delayed == (1 if Capability.DELAYED in broker.capabilities else 0)
        dead = 1 if Capability.DEAD_LETTER in broker.capabilities else 0
        assert (stats.running, stats.dead) == (2 - dead, dead)

    def test_stats_without_queues_lists_the_queues_in_use(self, broker: Broker, queue: str) -> None:
        broker.enqueue([message(queue)])
        assert queue in {s.queue for s in broker.stats()}

    def test_stats_without_queues_lists_only_queues_that_held_a_job(
        self, broker: Broker, queue: str
    ) -> None:
        looked_up = unique("looked-up")
        broker.enqueue([message(queue)])
        assert broker.fetch([looked_up], 1, lease=LEASE, wait=0) == []
        assert broker.job_state(unique("never-enqueued")) is None
        assert broker.stats([looked_up]) == [QueueStats(looked_up, 0, 0, 0, 0)]
        assert broker.dead_jobs(looked_up) == []
        listed = {s.queue for s in broker.stats()}
        assert queue in listed
        assert looked_up not in listed, "a queue that was only looked up is not in use"

    def test_the_state_of_an_unknown_job_is_none(self, broker: Broker) -> None:
        assert broker.job_state(unique("never-enqueued")) is None

    def test_settlements_of_several_jobs_are_applied_each_on_its_own(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([message(queue) for _ in range(3)])
        a, b, c = broker.fetch([queue], 3, lease=LEASE, wait=0)
        broker.settle([Settlement(b, Outcome.ACK)])
        outcomes = [
            Settlement(a, Outcome.ACK),
            Settlement(b, Outcome.ACK),
            Settlement(c, Outcome.ACK),
        ]
        assert broker.settle(outcomes) == [True, False, True]

    def test_it_is_safe_to_use_from_many_threads(self, broker: Broker, queue: str) -> None:
        total, threads = 200, 4
        broker.enqueue([message(queue) for _ in range(total)])
        seen: list[str] = []
        lock = threading.Lock()

        def drain() -> None:
            while got := broker.fetch([queue], 3, lease=LEASE, wait=0):
                applied = broker.settle([Settlement(d, Outcome.ACK) for d in got])
                assert all(applied)
                with lock:
                    seen.extend(ids(got))

        workers = [threading.Thread(target=drain) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(30)
        assert len(seen) == total
        assert len(set(seen)) == total

    def test_a_recipe_rebuilds_the_broker_on_the_same_jobs_after_pickling(
        self, broker: Broker, queue: str
    ) -> None:
        recipe = broker.recipe()
        if recipe is None:
            pytest.skip(f"{type(broker).__name__} gives no recipe (optional)")
        # As the lease keeper gets it: pickled to a process that imported none of the app.
        rebuilt = pickle.loads(pickle.dumps(recipe))()
        try:
            assert type(rebuilt) is type(broker)
            assert rebuilt.url == broker.url
            msg = message(queue)
            broker.enqueue([msg])
            [delivery] = rebuilt.fetch([queue], 1, lease=LEASE, wait=0)
            assert delivery.id == msg.id
            assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
            assert rebuilt.job_state(msg.id) is None
        finally:
            rebuilt.close()

    # -- job ids and job state -------------------------------------------------------------

    def test_the_same_id_twice_in_one_batch_is_one_job(self, broker: Broker, queue: str) -> None:
        other = unique()
        first = message(queue, b"first")
        again = Message(first.id, other, b"second")
        assert broker.enqueue([first, again]) == [True, False]
        assert [d.body for d in broker.fetch([queue, other], 10, lease=LEASE, wait=0)] == [b"first"]

    def test_an_id_waiting_or_running_in_one_queue_cannot_be_enqueued_to_another(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        msg = message(queue, b"original")
        broker.enqueue([msg])
        elsewhere = Message(msg.id, other, b"elsewhere")
        assert broker.enqueue([elsewhere]) == [False], "queued in another queue"
        delivery = fetch_one(broker, queue)
        assert broker.enqueue([elsewhere]) == [False], "running in another queue"
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.RUNNING, attempts=1)
        assert broker.fetch([other], 10, lease=LEASE, wait=0) == []
        assert broker.stats([other]) == [QueueStats(other, 0, 0, 0, 0)]
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
        assert broker.enqueue([elsewhere]) == [True], "an acked job's id is free in any queue"
        assert broker.job_state(msg.id) == JobState(other, JobStatus.QUEUED)
        assert [d.body for d in broker.fetch([queue, other], 10, lease=LEASE, wait=0)] == [
            b"elsewhere"
        ]

    @requires(Capability.DELAYED)
    def test_a_scheduled_or_retrying_id_cannot_be_enqueued_to_another_queue(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        scheduled, retrying = message(queue, eta=time.time() + 60), message(queue)
        broker.enqueue([scheduled, retrying])
        delivery = fetch_one(broker, queue)
        broker.settle([Settlement(delivery, Outcome.RETRY, 60, "ValueError: x")])
        assert broker.enqueue(
            [Message(scheduled.id, other, b""), Message(retrying.id, other, b"")]
        ) == [False, False]
        assert broker.job_state(scheduled.id) == JobState(queue, JobStatus.SCHEDULED)
        assert broker.job_state(retrying.id) == JobState(queue, JobStatus.RETRYING, attempts=1)
        assert broker.stats([other]) == [QueueStats(other, 0, 0, 0, 0)]

    @requires(Capability.DEAD_LETTER)
    def test_a_dead_id_cannot_be_enqueued_to_another_queue_until_it_is_purged(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        msg = message(queue)
        broker.enqueue([msg])
        broker.settle([Settlement(fetch_one(broker, queue), Outcome.DEAD, reason="r")])
        elsewhere = Message(msg.id, other, b"elsewhere")
        assert broker.enqueue([elsewhere]) == [False]
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.DEAD, attempts=1)
        assert [d.id for d in broker.dead_jobs(queue)] == [msg.id]
        assert broker.fetch([other], 1, lease=LEASE, wait=0) == []
        assert broker.purge_dead(queue) == 1
        assert broker.enqueue([elsewhere]) == [True], "a purged job's id is free again"
        assert ids(broker.fetch([other], 1, lease=LEASE, wait=0)) == [msg.id]

    def test_job_state_finds_a_job_by_id_alone_with_its_queue_status_and_attempts(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        here, there = message(queue), message(other)
        broker.enqueue([here, there])
        assert broker.job_state(here.id) == JobState(queue, JobStatus.QUEUED)
        assert broker.job_state(there.id) == JobState(other, JobStatus.QUEUED)
        delivery = fetch_one(broker, other)
        assert broker.job_state(there.id) == JobState(other, JobStatus.RUNNING, attempts=1)
        broker.release([delivery])
        assert broker.job_state(there.id) == JobState(other, JobStatus.QUEUED)
        delivery = fetch_one(broker, other)
        broker.settle([Settlement(delivery, Outcome.RETRY, 0, "ValueError: x")])
        state = broker.job_state(there.id)
        assert state is not None
        assert (state.queue, state.attempts) == (other, 1)
        assert state.status in (JobStatus.RETRYING, JobStatus.QUEUED), "a due retry may read queued"
        assert broker.job_state(here.id) == JobState(queue, JobStatus.QUEUED)

    def test_a_job_whose_lease_expired_reads_as_queued(self, broker: Broker, queue: str) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0)
        eventually(
            lambda: status(broker, msg.id) is JobStatus.QUEUED,
            what="the expired lease to read as queued",
        )
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.QUEUED, attempts=1)

    @requires(Capability.DELAYED)
    def test_a_delayed_job_that_is_due_reads_as_queued(self, broker: Broker, queue: str) -> None:
        msg = message(queue, eta=time.time() + 0.2)
        broker.enqueue([msg])
        assert status(broker, msg.id) is JobStatus.SCHEDULED
        eventually(
            lambda: status(broker, msg.id) is JobStatus.QUEUED, what="the due job to read queued"
        )

    # -- extend ----------------------------------------------------------------------------

    def test_extend_answers_for_each_lease_and_lost_for_stale_tokens_and_settled_jobs(
        self, broker: Broker, queue: str
    ) -> None:
        broker.enqueue([message(queue) for _ in range(3)])
        acked, held, expiring = broker.fetch([queue], 2, lease=LEASE, wait=0) + broker.fetch(
            [queue], 1, lease=SHORT_LEASE, wait=0
        )
        broker.settle([Settlement(acked, Outcome.ACK)])
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert current.id == expiring.id
        assert broker.extend([acked, held, expiring, current], LEASE) == [
            LeaseState.LOST,
            LeaseState.HELD,
            LeaseState.LOST,
            LeaseState.HELD,
        ]
        assert broker.settle([Settlement(held, Outcome.ACK), Settlement(current, Outcome.ACK)]) == [
            True,
            True,
        ]
        assert broker.extend([held], LEASE) == [LeaseState.LOST]

    @requires(Capability.PROGRESS)
    def test_progress_given_to_extend_shows_while_the_job_runs_and_is_gone_once_settled(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        delivery = fetch_one(broker, queue)
        assert broker.extend([delivery], LEASE, {delivery.id: b"\x00 10%"}) == [LeaseState.HELD]
        assert broker.job_state(msg.id) == JobState(
            queue, JobStatus.RUNNING, attempts=1, progress=b"\x00 10%"
        )
        broker.extend([delivery], LEASE)
        assert progress(broker, msg.id) == b"\x00 10%", "a renewal without progress keeps it"
        broker.extend([delivery], LEASE, {delivery.id: b"90%"})
        assert progress(broker, msg.id) == b"90%", "the latest progress wins"
        broker.settle([Settlement(delivery, Outcome.RETRY, 0, "ValueError: x")])
        assert progress(broker, msg.id) is None
        again = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)[0]
        assert progress(broker, msg.id) is None, "a new run starts without progress"
        broker.extend([again], LEASE, {again.id: b"1%"})
        broker.settle([Settlement(again, Outcome.ACK)])
        assert broker.job_state(msg.id) is None

    @requires(Capability.PROGRESS)
    def test_progress_is_dropped_when_the_job_is_released_or_its_lease_expires(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        delivery = fetch_one(broker, queue)
        broker.extend([delivery], LEASE, {msg.id: b"half"})
        broker.release([delivery])
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.QUEUED)
        expiring = fetch_one(broker, queue, lease=SHORT_LEASE)
        broker.extend([expiring], SHORT_LEASE, {msg.id: b"half"})
        eventually(lambda: status(broker, msg.id) is JobStatus.QUEUED, what="the lease to run out")
        assert progress(broker, msg.id) is None

    @requires(Capability.PROGRESS)
    def test_progress_for_a_lost_lease_is_ignored(self, broker: Broker, queue: str) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        stale = fetch_one(broker, queue, lease=SHORT_LEASE)
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert broker.extend([stale], LEASE, {msg.id: b"stale"}) == [LeaseState.LOST]
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.RUNNING, attempts=2)
        broker.settle([Settlement(current, Outcome.ACK)])

    # -- cancel ----------------------------------------------------------------------------

    @requires(Capability.CANCEL)
    def test_cancelling_a_queued_job_removes_it_and_frees_its_id(
        self, broker: Broker, queue: str
    ) -> None:
        before, cancelled, after = message(queue), message(queue), message(queue)
        broker.enqueue([before, cancelled, after])
        assert broker.cancel(cancelled.id) is CancelOutcome.REMOVED
        assert broker.job_state(cancelled.id) is None
        assert broker.stats([queue])[0].ready == 2
        assert ids(broker.fetch([queue], 10, lease=LEASE, wait=0)) == [before.id, after.id]
        assert broker.cancel(cancelled.id) is CancelOutcome.NOT_FOUND, "it is gone"
        assert broker.enqueue([cancelled]) == [True], "its id is free again"

    @requires(Capability.CANCEL, Capability.DELAYED)
    def test_cancelling_a_scheduled_job_removes_it_for_good(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue, eta=time.time() + 0.2)
        broker.enqueue([msg])
        assert broker.cancel(msg.id) is CancelOutcome.REMOVED
        assert broker.job_state(msg.id) is None
        assert broker.stats([queue])[0].delayed == 0
        assert broker.fetch([queue], 1, lease=LEASE, wait=0.5) == [], "not even once it is due"

    @requires(Capability.CANCEL, Capability.DELAYED)
    def test_cancelling_a_retrying_job_removes_it_for_good(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        broker.settle([Settlement(fetch_one(broker, queue), Outcome.RETRY, 0.2, "ValueError: x")])
        assert status(broker, msg.id) is JobStatus.RETRYING
        assert broker.cancel(msg.id) is CancelOutcome.REMOVED
        assert broker.job_state(msg.id) is None
        assert broker.fetch([queue], 1, lease=LEASE, wait=0.5) == [], "not even once it is due"
        assert broker.enqueue([msg]) == [True]

    @requires(Capability.CANCEL)
    def test_cancelling_a_running_job_flags_it_and_extend_answers_cancelling(
        self, broker: Broker, queue: str
    ) -> None:
        cancelled, other = message(queue), message(queue)
        broker.enqueue([cancelled, other])
        running, untouched = broker.fetch([queue], 2, lease=LEASE, wait=0)
        assert broker.cancel(cancelled.id) is CancelOutcome.REQUESTED
        assert broker.cancel(cancelled.id) is CancelOutcome.REQUESTED, "asking again is the same"
        assert broker.job_state(cancelled.id) == JobState(
            queue, JobStatus.RUNNING, attempts=1, cancel_requested=True
        )
        assert broker.extend([running, untouched], LEASE) == [
            LeaseState.CANCELLING,
            LeaseState.HELD,
        ]
        assert broker.extend([running], LEASE) == [LeaseState.CANCELLING], "and it stays so"
        assert broker.settle([Settlement(running, Outcome.ACK)]) == [True], "settle still applies"
        assert broker.job_state(cancelled.id) is None
        assert broker.extend([running], LEASE) == [LeaseState.LOST]
        assert broker.cancel(cancelled.id) is CancelOutcome.NOT_FOUND
        assert broker.settle([Settlement(untouched, Outcome.ACK)]) == [True]

    @requires(Capability.CANCEL)
    def test_a_retry_keeps_a_cancel_request_for_the_next_delivery(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        first = fetch_one(broker, queue)
        broker.cancel(msg.id)
        assert broker.settle([Settlement(first, Outcome.RETRY, 0, "ValueError: x")]) == [True]
        state = broker.job_state(msg.id)
        assert state is not None
        assert state.cancel_requested, "a retry must not forget that the job was cancelled"
        [second] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert second.cancel_requested
        assert broker.settle([Settlement(second, Outcome.ACK)]) == [True]
        assert broker.job_state(msg.id) is None

    @requires(Capability.CANCEL, Capability.DEAD_LETTER)
    def test_dead_lettering_a_job_drops_its_cancel_request(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        first = fetch_one(broker, queue)
        broker.cancel(msg.id)
        assert broker.settle([Settlement(first, Outcome.DEAD, 0, "ValueError: x")]) == [True]
        state = broker.job_state(msg.id)
        assert state is not None
        assert (state.status, state.cancel_requested) == (JobStatus.DEAD, False)

    @requires(Capability.CANCEL)
    def test_a_cancelled_job_whose_lease_expires_is_delivered_again_with_cancel_requested(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        first = fetch_one(broker, queue, lease=SHORT_LEASE)
        assert broker.cancel(msg.id) is CancelOutcome.REQUESTED
        [second] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert (second.id, second.attempts, second.cancel_requested) == (msg.id, 2, True)
        assert second.token != first.token
        assert broker.extend([second], LEASE) == [LeaseState.CANCELLING]
        assert broker.settle([Settlement(second, Outcome.ACK)]) == [True]

    @requires(Capability.CANCEL)
    def test_cancelling_a_running_job_whose_lease_expired_removes_it(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        delivery = fetch_one(broker, queue, lease=SHORT_LEASE)
        time.sleep(SHORT_LEASE + 2 * CLOCK_SLACK)  # nothing to wait on, nor to look at first
        assert broker.cancel(msg.id) is CancelOutcome.REMOVED
        assert broker.job_state(msg.id) is None
        assert broker.fetch([queue], 1, lease=LEASE, wait=0) == []
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [False]

    @requires(Capability.CANCEL)
    def test_cancelling_an_unknown_or_acked_job_finds_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        msg, bystander = message(queue), message(queue)
        broker.enqueue([msg])
        broker.settle([Settlement(fetch_one(broker, queue), Outcome.ACK)])
        broker.enqueue([bystander])
        assert broker.cancel(unique("never-enqueued")) is CancelOutcome.NOT_FOUND
        assert broker.cancel(msg.id) is CancelOutcome.NOT_FOUND
        assert broker.job_state(bystander.id) == JobState(queue, JobStatus.QUEUED)

    @requires(Capability.CANCEL, Capability.DEAD_LETTER)
    def test_cancelling_a_dead_job_finds_nothing_and_leaves_it_dead(
        self, broker: Broker, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        broker.settle([Settlement(fetch_one(broker, queue), Outcome.DEAD, reason="KeyError")])
        assert broker.cancel(msg.id) is CancelOutcome.NOT_FOUND
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.DEAD, attempts=1)
        assert [(d.id, d.reason) for d in broker.dead_jobs(queue)] == [(msg.id, "KeyError")]
        assert broker.requeue_dead(queue) == 1
        assert ids(broker.fetch([queue], 1, lease=LEASE, wait=0)) == [msg.id]

    # -- results -----------------------------------------------------------------------------

    @requires(Capability.RESULTS)
    def test_stores_results_in_is_a_question_with_no_side_effects(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        assert all(broker.stores_results_in(results_storage) for _ in range(3))
        assert ids(broker.fetch([queue], 1, lease=LEASE, wait=0)) == [msg.id]

    @requires(Capability.RESULTS)
    def test_a_settlement_writes_its_record_with_its_ttl(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        kept, short = message(queue), message(queue)
        broker.enqueue([kept, short])
        first, second = broker.fetch([queue], 2, lease=LEASE, wait=0)
        assert broker.job_status(kept.id, results_storage) == (
            JobState(queue, JobStatus.RUNNING, attempts=1),
            None,
        )
        assert broker.settle(
            [
                Settlement(first, Outcome.ACK, record=b"\x00result", ttl=60),
                Settlement(second, Outcome.ACK, record=b"short", ttl=0.3),
            ]
        ) == [True, True]
        assert results_storage.load(kept.id) == b"\x00result"
        assert broker.job_status(kept.id, results_storage) == (None, b"\x00result")
        assert results_storage.load(short.id) == b"short"
        eventually(lambda: results_storage.load(short.id) is None, what="the record to expire")

    @requires(Capability.RESULTS, Capability.DEAD_LETTER)
    def test_a_dead_letter_settlement_writes_its_record(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        delivery = fetch_one(broker, queue)
        settlement = Settlement(delivery, Outcome.DEAD, reason="KeyError", record=b"err", ttl=60)
        assert broker.settle([settlement]) == [True]
        assert broker.job_status(msg.id, results_storage) == (
            JobState(queue, JobStatus.DEAD, attempts=1),
            b"err",
        )

    @requires(Capability.RESULTS)
    def test_a_refused_settlement_writes_no_record(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        msg = message(queue)
        broker.enqueue([msg])
        stale = fetch_one(broker, queue, lease=SHORT_LEASE)
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        refused = Settlement(stale, Outcome.ACK, record=b"stale", ttl=60)
        assert broker.settle([refused]) == [False]
        assert results_storage.load(msg.id) is None
        assert broker.settle([Settlement(current, Outcome.ACK, record=b"ok", ttl=60)]) == [True]
        assert results_storage.load(msg.id) == b"ok"

    @requires(Capability.RESULTS)
    def test_clear_record_deletes_the_old_record_only_when_the_job_is_added(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        reused = unique("job")
        results_storage.save({reused: b"earlier run"}, ttl=60)
        assert broker.enqueue([message(queue, job_id=reused, clear_record=True)]) == [True]
        assert results_storage.load(reused) is None
        results_storage.save({reused: b"kept"}, ttl=60)
        assert broker.enqueue([message(queue, job_id=reused, clear_record=True)]) == [False]
        assert results_storage.load(reused) == b"kept", "a refused enqueue clears nothing"
        unflagged = unique("job")
        results_storage.save({unflagged: b"untouched"}, ttl=60)
        assert broker.enqueue([message(queue, job_id=unflagged)]) == [True]
        assert results_storage.load(unflagged) == b"untouched"

    @requires(Capability.RESULTS, Capability.CANCEL)
    def test_cancel_writes_its_record_only_when_it_removes_the_job(
        self, broker: Broker, results_storage: Storage, queue: str
    ) -> None:
        waiting, running = message(queue), message(queue)
        broker.enqueue([running, waiting])
        delivery = fetch_one(broker, queue)
        assert broker.cancel(waiting.id, b"cancelled", ttl=60) is CancelOutcome.REMOVED
        assert broker.job_status(waiting.id, results_storage) == (None, b"cancelled")
        assert broker.cancel(running.id, b"cancelled", ttl=60) is CancelOutcome.REQUESTED
        assert results_storage.load(running.id) is None, "its worker records how it ended"
        unknown = unique("never-enqueued")
        assert broker.cancel(unknown, b"cancelled", ttl=60) is CancelOutcome.NOT_FOUND
        assert results_storage.load(unknown) is None
        broker.settle([Settlement(delivery, Outcome.ACK, record=b"done", ttl=60)])
        assert results_storage.load(running.id) == b"done"

    # -- worker registry -----------------------------------------------------------------------

    @requires(Capability.WORKER_REGISTRY)
    def test_registered_workers_are_listed_until_they_leave_or_expire(self, broker: Broker) -> None:
        def info(worker_id: str, done: int) -> WorkerInfo:
            now = time.time()
            return WorkerInfo(
                worker_id, "host-a", 4242, now, ("q1", "q2"), 8, done, 1, now, (f"job-{done}",)
            )

        staying, leaving, expiring = unique("w"), unique("w"), unique("w")
        broker.register_worker(info(staying, 1), ttl=60)
        broker.register_worker(info(staying, 5), ttl=60)
        broker.register_worker(info(leaving, 0), ttl=60)
        broker.register_worker(info(expiring, 0), ttl=0.2)
        listed = {w.id: w for w in broker.workers()}
        assert {staying, leaving, expiring} <= set(listed)
        latest = listed[staying]
        assert (latest.done, latest.host, latest.pid, latest.queues, latest.current) == (
            5,
            "host-a",
            4242,
            ("q1", "q2"),
            ("job-5",),
        ), "the latest registration wins"
        broker.unregister_worker(leaving)
        time.sleep(0.2 + 2 * CLOCK_SLACK)  # nothing to wait on: the registration must lapse
        remaining = {w.id for w in broker.workers()}
        assert staying in remaining
        assert leaving not in remaining
        assert expiring not in remaining
