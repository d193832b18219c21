"""The broker contract: what every :class:`~worq_core.Broker` must do, as tests."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

from worq_core.broker import Broker
from worq_core.models import (
    Capability,
    Delivery,
    JobStatus,
    Message,
    Outcome,
    Settlement,
    WorkerInfo,
)
from worq_core.testing.support import (
    CLOCK_SLACK,
    BrokerCases,
    requires,
    unique,
)

LEASE = 30.0
SHORT_LEASE = 0.3
WAIT = 5.0


def message(
    queue: str,
    body: bytes = b"payload",
    *,
    priority: int = 0,
    eta: float | None = None,
    job_id: str | None = None,
) -> Message:
    """A message with a fresh id."""
    return Message(job_id or uuid.uuid4().hex, queue, body, priority, eta)


def ids(deliveries: Sequence[Delivery]) -> list[str]:
    """The job ids of ``deliveries``, in order."""
    return [d.id for d in deliveries]


class BrokerContract(BrokerCases):
    """Subclass and provide a ``broker`` fixture yielding a fresh broker.

    Every case uses queues of its own, so a broker shared between cases also works.
    """

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
        assert broker.job_state(queue, msg.id) is JobStatus.RUNNING
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
        assert broker.job_state(queue, msg.id) is None
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
        assert broker.extend([stale], LEASE) == [False]
        assert broker.job_state(queue, current.id) is JobStatus.RUNNING
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
        assert broker.extend([delivery], LEASE) == [True]
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
        assert broker.job_state(queue, first.id) is JobStatus.RETRYING
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
        assert broker.job_state(queue, later.id) is JobStatus.SCHEDULED
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
        assert broker.job_state(queue, msg.id) is JobStatus.DEAD
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
        assert broker.job_state(queue, msg.id) is None

    @requires(Capability.DEAD_LETTER)
    def test_requeue_dead_moves_only_the_ids_given(self, broker: Broker, queue: str) -> None:
        sent = [message(queue) for _ in range(3)]
        broker.enqueue(sent)
        deliveries = broker.fetch([queue], 3, lease=LEASE, wait=0)
        broker.settle([Settlement(d, Outcome.DEAD, reason="r") for d in deliveries])
        assert broker.requeue_dead(queue, [sent[1].id, "no-such-id"]) == 1
        assert ids(broker.fetch([queue], 3, lease=LEASE, wait=0)) == [sent[1].id]
        assert {d.id for d in broker.dead_jobs(queue)} == {sent[0].id, sent[2].id}

    def test_released_jobs_go_back_to_the_front_without_counting_an_attempt(
        self, broker: Broker, queue: str
    ) -> None:
        first, second = message(queue), message(queue)
        broker.enqueue([first, second])
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=0)
        broker.release([delivery])
        assert broker.job_state(queue, first.id) is JobStatus.QUEUED
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
        assert broker.job_state(queue, first.id) is None

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

    def test_the_state_of_an_unknown_job_is_none(self, broker: Broker, queue: str) -> None:
        assert broker.job_state(queue, "never-enqueued") is None

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

    # -- worker registry -----------------------------------------------------------------------

    @requires(Capability.WORKER_REGISTRY)
    def test_registered_workers_are_listed_until_they_leave_or_expire(self, broker: Broker) -> None:
        def info(worker_id: str, done: int) -> WorkerInfo:
            now = time.time()
            return WorkerInfo(worker_id, "host-a", 4242, now, ("q1", "q2"), 8, done, 1, now)

        staying, leaving, expiring = unique("w"), unique("w"), unique("w")
        broker.register_worker(info(staying, 1), ttl=60)
        broker.register_worker(info(staying, 5), ttl=60)
        broker.register_worker(info(leaving, 0), ttl=60)
        broker.register_worker(info(expiring, 0), ttl=0.2)
        listed = {w.id: w for w in broker.workers()}
        assert {staying, leaving, expiring} <= set(listed)
        latest = listed[staying]
        assert (latest.done, latest.host, latest.pid, latest.queues) == (
            5,
            "host-a",
            4242,
            ("q1", "q2"),
        ), "the latest registration wins"
        broker.unregister_worker(leaving)
        time.sleep(0.2 + 2 * CLOCK_SLACK)  # nothing to wait on: the registration must lapse
        remaining = {w.id for w in broker.workers()}
        assert staying in remaining
        assert leaving not in remaining
        assert expiring not in remaining
