"""The broker contract for renewing a worker's leases at once (:attr:`Capability.WORKER_LEASES`).

:class:`~worq_core.testing.BrokerContract` inherits these cases; each is skipped for a broker
that does not declare the capability. The lease keeper is built on exactly these answers: it
renews by worker, so a lease that ``extend_worker`` renews when it should not would let a stale
run go on, and one it leaves out would run the job twice.
"""

from __future__ import annotations

import time
import uuid

from worq_core.broker import Broker
from worq_core.models import (
    CancelOutcome,
    Capability,
    Delivery,
    JobStatus,
    LeaseState,
    Message,
    Outcome,
    Settlement,
)
from worq_core.testing.support import (
    CLOCK_SLACK,
    LEASE,
    SHORT_LEASE,
    WAIT,
    BrokerCases,
    requires,
    status,
    unique,
)


def _enqueue(broker: Broker, queue: str, count: int) -> list[Message]:
    messages = [Message(uuid.uuid4().hex, queue, b"payload") for _ in range(count)]
    assert broker.enqueue(messages) == [True] * count
    return messages


def _held(*deliveries: Delivery) -> dict[str, LeaseState]:
    return {d.token: LeaseState.HELD for d in deliveries}


class WorkerLeasesBrokerContract(BrokerCases):
    """Leases recorded under the fetching worker, and renewed by worker with ``extend_worker``.

    Part of :class:`~worq_core.testing.BrokerContract`; the same ``broker`` fixture serves.
    """

    @requires(Capability.WORKER_LEASES)
    def test_extend_worker_renews_the_leases_fetched_for_that_worker_and_no_others(
        self, broker: Broker, queue: str
    ) -> None:
        worker, other = unique("worker"), unique("worker")
        _enqueue(broker, queue, 4)
        mine = broker.fetch([queue], 2, lease=LEASE, wait=0, worker=worker)
        theirs = broker.fetch([queue], 1, lease=LEASE, wait=0, worker=other)
        anonymous = broker.fetch([queue], 1, lease=LEASE, wait=0)
        assert [len(mine), len(theirs), len(anonymous)] == [2, 1, 1]
        assert broker.extend_worker(worker, [queue], LEASE) == _held(*mine)
        assert broker.extend_worker(other, [queue], LEASE) == _held(*theirs)
        assert broker.extend_worker(unique("worker"), [queue], LEASE) == {}
        leases = [*mine, *theirs, *anonymous]
        assert broker.settle([Settlement(d, Outcome.ACK) for d in leases]) == [True] * 4

    @requires(Capability.WORKER_LEASES)
    def test_extend_worker_keeps_a_short_lease_from_running_out(
        self, broker: Broker, queue: str
    ) -> None:
        worker = unique("worker")
        [msg] = _enqueue(broker, queue, 1)
        [delivery] = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0, worker=worker)
        assert broker.extend_worker(worker, [queue], LEASE) == _held(delivery)
        time.sleep(SHORT_LEASE + 2 * CLOCK_SLACK)  # past the lease the fetch granted
        assert broker.fetch([queue], 1, lease=LEASE, wait=0) == [], "delivered twice"
        assert status(broker, msg.id) is JobStatus.RUNNING
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]

    @requires(Capability.WORKER_LEASES)
    def test_extend_worker_never_renews_a_settled_released_or_expired_lease(
        self, broker: Broker, queue: str
    ) -> None:
        worker = unique("worker")
        acked, retried, released, held = _enqueue(broker, queue, 4)
        got = broker.fetch([queue], 4, lease=LEASE, wait=0, worker=worker)
        assert [d.id for d in got] == [acked.id, retried.id, released.id, held.id]
        [expiring_msg] = _enqueue(broker, queue, 1)
        [expiring] = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0, worker=worker)
        assert broker.settle(
            [
                Settlement(got[0], Outcome.ACK),
                Settlement(got[1], Outcome.RETRY, 3600.0, "ValueError: x"),
            ]
        ) == [True, True]
        broker.release([got[2]])
        # The released job and, once its lease runs out, the expiring one are taken by another
        # consumer, under tokens of its own.
        taken: dict[str, Delivery] = {}
        for _ in range(3):
            taken.update((d.id, d) for d in broker.fetch([queue], 2, lease=LEASE, wait=WAIT))
            if len(taken) == 2:
                break
        assert set(taken) == {released.id, expiring_msg.id}
        assert broker.extend_worker(worker, [queue], LEASE) == _held(got[3])
        assert broker.job_state(acked.id) is None, "an acked job came back"
        assert status(broker, retried.id) is JobStatus.RETRYING, "a retrying job was leased"
        assert broker.settle([Settlement(expiring, Outcome.ACK)]) == [False]
        leases = [got[3], *taken.values()]
        assert broker.settle([Settlement(d, Outcome.ACK) for d in leases]) == [True] * 3

    @requires(Capability.WORKER_LEASES)
    def test_a_job_fetched_again_by_the_same_worker_is_renewed_under_its_new_token_only(
        self, broker: Broker, queue: str
    ) -> None:
        worker = unique("worker")
        _enqueue(broker, queue, 1)
        first = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=0, worker=worker)[0]
        [second] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT, worker=worker)
        assert (second.id, second.attempts) == (first.id, 2)
        assert broker.extend_worker(worker, [queue], LEASE) == _held(second)
        assert broker.settle([Settlement(second, Outcome.ACK)]) == [True]
        assert broker.extend_worker(worker, [queue], LEASE) == {}

    @requires(Capability.WORKER_LEASES)
    def test_extend_worker_covers_the_queues_named_and_settle_and_fetch_records_too(
        self, broker: Broker
    ) -> None:
        worker = unique("worker")
        first, second = unique("contract"), unique("contract")
        _enqueue(broker, first, 1)
        _enqueue(broker, second, 2)
        both = broker.fetch([first, second], 2, lease=LEASE, wait=0, worker=worker)
        assert [d.queue for d in both] == [first, second]
        _, more = broker.settle_and_fetch(
            [Settlement(both[0], Outcome.ACK)], [second], 1, lease=LEASE, wait=0, worker=worker
        )
        assert len(more) == 1
        assert broker.extend_worker(worker, [first], LEASE) == {}
        assert broker.extend_worker(worker, [first, second], LEASE) == _held(both[1], *more)
        leases = [both[1], *more]
        assert broker.settle([Settlement(d, Outcome.ACK) for d in leases]) == [True, True]

    @requires(Capability.WORKER_LEASES, Capability.CANCEL)
    def test_extend_worker_answers_cancelling_for_a_job_asked_to_cancel(
        self, broker: Broker, queue: str
    ) -> None:
        worker = unique("worker")
        cancelled, _ = _enqueue(broker, queue, 2)
        running, untouched = broker.fetch([queue], 2, lease=LEASE, wait=0, worker=worker)
        assert broker.cancel(cancelled.id) is CancelOutcome.REQUESTED
        assert broker.extend_worker(worker, [queue], LEASE) == {
            running.token: LeaseState.CANCELLING,
            untouched.token: LeaseState.HELD,
        }
        assert broker.settle([Settlement(running, Outcome.ACK)]) == [True]
        assert broker.extend_worker(worker, [queue], LEASE) == _held(untouched)
        assert broker.settle([Settlement(untouched, Outcome.ACK)]) == [True]

    @requires(Capability.WORKER_LEASES, Capability.PROGRESS)
    def test_extend_worker_keeps_the_progress_of_its_own_leases_only(
        self, broker: Broker, queue: str
    ) -> None:
        worker, other = unique("worker"), unique("worker")
        mine_msg, theirs_msg = _enqueue(broker, queue, 2)
        [mine] = broker.fetch([queue], 1, lease=LEASE, wait=0, worker=worker)
        [theirs] = broker.fetch([queue], 1, lease=LEASE, wait=0, worker=other)
        progress = {mine_msg.id: b"\x00 50%", theirs_msg.id: b"not mine"}
        assert broker.extend_worker(worker, [queue], LEASE, progress) == _held(mine)
        states = {m.id: broker.job_state(m.id) for m in (mine_msg, theirs_msg)}
        assert {i: s.progress if s else None for i, s in states.items()} == {
            mine_msg.id: b"\x00 50%",
            theirs_msg.id: None,
        }
        assert broker.settle([Settlement(d, Outcome.ACK) for d in (mine, theirs)]) == [True] * 2
