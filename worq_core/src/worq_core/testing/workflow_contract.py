"""The broker contract for workflows (chains, groups and chords), as tests.

:class:`~worq_core.testing.BrokerContract` inherits these cases, so every backend that runs it
runs them too; each is marked :attr:`Capability.WORKFLOWS` and skipped for a broker that does not
declare it. They pin down what worq-core builds workflows on: a settlement's ``then`` enqueued in
the same step as the settlement, a group's members counted once each as they end, its callback
enqueued exactly once by the step that counts the last one, and nothing kept once a group is
released (or expired, once complete).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from worq_core.broker import Broker
from worq_core.models import (
    CancelOutcome,
    Capability,
    Delivery,
    GroupMember,
    GroupSpec,
    GroupState,
    JobState,
    JobStatus,
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
    eventually,
    fetch_all,
    ids,
    requires,
    status,
    unique,
)

TTL = 0.3
"""A complete group's ttl short enough to wait for."""


def job(
    queue: str,
    body: bytes = b"payload",
    *,
    member: GroupMember | None = None,
    closes: str | None = None,
    job_id: str | None = None,
) -> Message:
    """A message with a fresh id, maybe a group's member or closing a group."""
    return Message(job_id or uuid.uuid4().hex, queue, body, member=member, closes=closes)


def members(queue: str, group: str, size: int) -> list[Message]:
    """One message per index of ``group``, in index order."""
    return [job(queue, f"member {i}".encode(), member=GroupMember(group, i)) for i in range(size)]


def fetch_by_id(broker: Broker, queue: str) -> dict[str, Delivery]:
    """Lease every job of ``queue`` that may be delivered now, by job id."""
    return {d.id: d for d in fetch_all(broker, queue)}


def ready(broker: Broker, queue: str) -> int:
    """How many jobs of ``queue`` wait for a worker."""
    [stats] = broker.stats([queue])
    return stats.ready


def settle(
    broker: Broker,
    delivery: Delivery,
    outcome: Outcome,
    *,
    reason: str = "",
    output: bytes | None = None,
    then: tuple[Message, ...] = (),
) -> None:
    """Settle one delivery, which must still hold its lease."""
    settlement = Settlement(delivery, outcome, reason=reason, then=then, output=output)
    assert broker.settle([settlement]) == [True]


def state(broker: Broker, group_id: str) -> GroupState:
    """The group's state, which the broker must still hold."""
    found = broker.group_state(group_id)
    assert found is not None, f"the broker lost group {group_id}"
    return found


class WorkflowBrokerContract(BrokerCases):
    """A settlement's ``then``, groups counted as their members settle, and their release.

    Part of :class:`~worq_core.testing.BrokerContract`; the same ``broker`` fixture serves.
    """

    # -- then --------------------------------------------------------------------------------

    @requires(Capability.WORKFLOWS)
    def test_then_is_enqueued_with_the_ack_that_carries_it(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        first, second, third = job(queue), job(other, b"next"), job(queue, b"also")
        broker.enqueue([first])
        [delivery] = fetch_all(broker, queue)
        assert broker.job_state(second.id) is None, "nothing is sent before the settlement"
        settle(broker, delivery, Outcome.ACK, then=(second, third))
        assert broker.job_state(first.id) is None
        assert broker.job_state(second.id) == JobState(other, JobStatus.QUEUED)
        assert [(d.id, d.body) for d in fetch_all(broker, other)] == [(second.id, b"next")]
        assert ids(fetch_all(broker, queue)) == [third.id]

    @requires(Capability.WORKFLOWS, Capability.DEAD_LETTER)
    def test_then_is_enqueued_with_a_retry_or_a_dead_letter_too(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        sent, after_retry, after_dead = job(queue), job(other), job(other)
        broker.enqueue([sent])
        [delivery] = fetch_all(broker, queue)
        settle(broker, delivery, Outcome.RETRY, reason="ValueError", then=(after_retry,))
        assert status(broker, after_retry.id) is JobStatus.QUEUED
        [again] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        settle(broker, again, Outcome.DEAD, reason="KeyError", then=(after_dead,))
        assert status(broker, sent.id) is JobStatus.DEAD
        assert ids(fetch_all(broker, other)) == [after_retry.id, after_dead.id]

    @requires(Capability.WORKFLOWS)
    def test_the_then_of_a_refused_settlement_is_not_enqueued(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        sent, stale_next, next_step = job(queue), job(other), job(other)
        broker.enqueue([sent])
        stale = fetch_all(broker, queue, lease=SHORT_LEASE)[0]
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert broker.settle([Settlement(stale, Outcome.ACK, then=(stale_next,))]) == [False]
        assert broker.job_state(stale_next.id) is None, "a refused settlement sends nothing"
        assert broker.stats([other])[0].ready == 0
        settle(broker, current, Outcome.ACK, then=(next_step,))
        assert broker.settle([Settlement(current, Outcome.ACK, then=(stale_next,))]) == [False]
        assert ids(fetch_all(broker, other)) == [next_step.id]

    @requires(Capability.WORKFLOWS)
    def test_a_then_whose_id_is_held_adds_nothing(self, broker: Broker, queue: str) -> None:
        held, sent, fresh = job(queue, b"held"), job(queue), job(queue, b"fresh")
        broker.enqueue([held, sent])
        deliveries = fetch_by_id(broker, queue)
        retaken = job(queue, b"replacement", job_id=held.id)
        settle(broker, deliveries[sent.id], Outcome.ACK, then=(retaken, fresh))
        assert broker.job_state(held.id) == JobState(queue, JobStatus.RUNNING, attempts=1)
        settle(broker, deliveries[held.id], Outcome.ACK)
        assert [d.body for d in fetch_all(broker, queue)] == [b"fresh"], "the held id won"

    # -- opening a group -----------------------------------------------------------------------

    @requires(Capability.WORKFLOWS)
    def test_open_group_records_the_group_and_enqueues_its_members(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        callback = job(callbacks, b"callback")
        sent = members(queue, gid, 3)
        assert broker.open_group(GroupSpec(gid, 3, callback), sent) == [True] * 3
        assert state(broker, gid) == GroupState(
            gid,
            3,
            outputs=(None, None, None),
            finished=frozenset(),
            failed=frozenset(),
            callback_id=callback.id,
            complete=False,
            callback_sent=False,
        )
        assert [status(broker, m.id) for m in sent] == [JobStatus.QUEUED] * 3
        assert broker.job_state(callback.id) is None, "the callback waits for the members"
        assert ids(fetch_all(broker, queue)) == [m.id for m in sent]

    @requires(Capability.WORKFLOWS)
    def test_open_group_answers_per_member_as_enqueue_does(
        self, broker: Broker, queue: str
    ) -> None:
        gid = unique("group")
        held = job(queue, b"held")
        broker.enqueue([held])
        first, second = members(queue, gid, 2)
        again = job(queue, member=second.member, job_id=held.id)
        assert broker.open_group(GroupSpec(gid, 2), [first, again]) == [True, False]
        assert [d.body for d in fetch_all(broker, queue)] == [b"held", b"member 0"]

    @requires(Capability.WORKFLOWS)
    def test_opening_a_group_id_already_recorded_raises_and_adds_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        gid = unique("group")
        broker.open_group(GroupSpec(gid, 1), members(queue, gid, 1))
        others = members(queue, gid, 2)
        with pytest.raises(ValueError):  # noqa: PT011 - the wording is the backend's
            broker.open_group(GroupSpec(gid, 2), others)
        assert [broker.job_state(m.id) for m in others] == [None, None]
        assert state(broker, gid).size == 1, "the first group stands"

    @requires(Capability.WORKFLOWS)
    def test_a_group_of_size_zero_is_complete_at_once_and_sends_its_callback(
        self, broker: Broker, queue: str
    ) -> None:
        gid, bare = unique("group"), unique("group")
        callback = job(queue, b"callback")
        assert broker.open_group(GroupSpec(gid, 0, callback), []) == []
        assert state(broker, gid) == GroupState(
            gid, 0, (), frozenset(), frozenset(), callback.id, complete=True, callback_sent=True
        )
        assert [d.body for d in fetch_all(broker, queue)] == [b"callback"]
        broker.open_group(GroupSpec(bare, 0), [])
        assert (state(broker, bare).complete, state(broker, bare).callback_id) == (True, None)

    # -- counting --------------------------------------------------------------------------------

    @requires(Capability.WORKFLOWS, Capability.DEAD_LETTER)
    def test_acks_and_dead_letters_are_counted_with_their_outputs(
        self, broker: Broker, queue: str
    ) -> None:
        gid = unique("group")
        sent = members(queue, gid, 3)
        broker.open_group(GroupSpec(gid, 3, run_on_failure=True), sent)
        deliveries = fetch_by_id(broker, queue)
        settle(broker, deliveries[sent[2].id], Outcome.ACK, output=b"\x00two\xff")
        after_ack = state(broker, gid)
        assert (after_ack.outputs, after_ack.finished, after_ack.failed) == (
            (None, None, b"\x00two\xff"),
            frozenset({2}),
            frozenset(),
        )
        assert not after_ack.complete
        settle(broker, deliveries[sent[0].id], Outcome.DEAD, reason="KeyError", output=b"err")
        after_dead = state(broker, gid)
        assert (after_dead.outputs, after_dead.finished, after_dead.failed) == (
            (b"err", None, b"\x00two\xff"),
            frozenset({0, 2}),
            frozenset({0}),
        )
        settle(broker, deliveries[sent[1].id], Outcome.ACK)
        final = state(broker, gid)
        assert final.outputs == (b"err", None, b"\x00two\xff"), "an ack without output is None"
        assert (final.finished, final.failed, final.complete) == (
            frozenset({0, 1, 2}),
            frozenset({0}),
            True,
        )

    @requires(Capability.WORKFLOWS)
    def test_a_retry_or_a_refused_settlement_counts_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        gid = unique("group")
        [sent] = members(queue, gid, 1)
        callback = job(queue, b"callback")
        broker.open_group(GroupSpec(gid, 1, callback), [sent])
        [first] = fetch_all(broker, queue)
        settle(broker, first, Outcome.RETRY, reason="ValueError", output=b"retry")
        assert state(broker, gid).finished == frozenset(), "a retry is not the end"
        stale = broker.fetch([queue], 1, lease=SHORT_LEASE, wait=WAIT)[0]
        [current] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        assert broker.settle([Settlement(stale, Outcome.ACK, output=b"stale")]) == [False]
        assert state(broker, gid) == GroupState(
            gid,
            1,
            (None,),
            frozenset(),
            frozenset(),
            callback.id,
            complete=False,
            callback_sent=False,
        )
        assert broker.stats([queue])[0].ready == 0, "no callback for a refused settlement"
        settle(broker, current, Outcome.ACK, output=b"ok")
        assert state(broker, gid).outputs == (b"ok",)
        assert [d.body for d in fetch_all(broker, queue)] == [b"callback"]

    @requires(Capability.WORKFLOWS)
    def test_the_last_member_sends_the_callback_in_its_own_step_and_queue(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        callback = Message(uuid.uuid4().hex, callbacks, b"callback", priority=3)
        sent = members(queue, gid, 3)
        broker.open_group(GroupSpec(gid, 3, callback), sent)
        deliveries = fetch_by_id(broker, queue)
        settle(broker, deliveries[sent[1].id], Outcome.ACK, output=b"1")
        settle(broker, deliveries[sent[0].id], Outcome.ACK, output=b"0")
        assert broker.job_state(callback.id) is None, "not before the last member"
        assert not state(broker, gid).callback_sent
        settle(broker, deliveries[sent[2].id], Outcome.ACK, output=b"2")
        assert broker.job_state(callback.id) == JobState(callbacks, JobStatus.QUEUED)
        done = state(broker, gid)
        assert (done.complete, done.callback_sent, done.outputs) == (True, True, (b"0", b"1", b"2"))
        assert ready(broker, queue) == 0, "the callback goes to its own queue"
        [delivered] = fetch_all(broker, callbacks)
        assert (delivered.id, delivered.body) == (callback.id, b"callback")

    @requires(Capability.WORKFLOWS)
    def test_members_settled_in_one_batch_send_the_callback_once(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        callback = job(callbacks)
        broker.open_group(GroupSpec(gid, 4, callback), members(queue, gid, 4))
        settlements = [Settlement(d, Outcome.ACK, output=d.body) for d in fetch_all(broker, queue)]
        assert broker.settle(settlements) == [True] * 4
        assert state(broker, gid).outputs == tuple(f"member {i}".encode() for i in range(4))
        assert ids(fetch_all(broker, callbacks)) == [callback.id]

    @requires(Capability.WORKFLOWS)
    def test_threads_racing_the_last_settlements_send_exactly_one_callback(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks, threads = unique("group"), unique(), 8
        callback = job(callbacks)
        broker.open_group(GroupSpec(gid, threads, callback), members(queue, gid, threads))
        deliveries = fetch_all(broker, queue)
        barrier = threading.Barrier(threads)
        results: list[bool] = []
        lock = threading.Lock()

        def ack(delivery: Delivery) -> None:
            barrier.wait(WAIT)
            [applied] = broker.settle([Settlement(delivery, Outcome.ACK, output=delivery.body)])
            with lock:
                results.append(applied)

        racers = [threading.Thread(target=ack, args=(d,)) for d in deliveries]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(WAIT * 2)
        assert results == [True] * threads
        done = state(broker, gid)
        assert (done.complete, done.callback_sent) == (True, True)
        assert len(done.finished) == threads
        assert ids(fetch_all(broker, callbacks)) == [callback.id], "exactly one callback"
        assert broker.fetch([callbacks], 10, lease=LEASE, wait=0.1) == []

    @requires(Capability.WORKFLOWS, Capability.DEAD_LETTER)
    def test_a_dead_member_withholds_the_callback_unless_run_on_failure(
        self, broker: Broker, queue: str
    ) -> None:
        callbacks = unique()
        for run_on_failure in (False, True):
            gid = unique("group")
            callback = job(callbacks)
            sent = members(queue, gid, 2)
            broker.open_group(GroupSpec(gid, 2, callback, run_on_failure=run_on_failure), sent)
            deliveries = fetch_by_id(broker, queue)
            settle(broker, deliveries[sent[0].id], Outcome.DEAD, reason="KeyError")
            settle(broker, deliveries[sent[1].id], Outcome.ACK, output=b"ok")
            done = state(broker, gid)
            assert (done.complete, done.failed, done.callback_id) == (
                True,
                frozenset({0}),
                callback.id,
            )
            assert done.callback_sent is run_on_failure
            expected = [callback.id] if run_on_failure else []
            assert ids(fetch_all(broker, callbacks)) == expected, f"{run_on_failure=}"

    @requires(Capability.WORKFLOWS, Capability.CANCEL)
    def test_cancelling_a_waiting_member_counts_it_failed_and_a_running_one_waits(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        callback = job(callbacks)
        running, waiting = members(queue, gid, 2)
        broker.open_group(GroupSpec(gid, 2, callback, run_on_failure=True), [running])
        [delivery] = fetch_all(broker, queue)
        broker.enqueue([waiting])
        assert broker.cancel(waiting.id) is CancelOutcome.REMOVED
        after = state(broker, gid)
        assert (after.finished, after.failed, after.outputs) == (
            frozenset({1}),
            frozenset({1}),
            (None, None),
        )
        assert broker.cancel(running.id) is CancelOutcome.REQUESTED
        assert state(broker, gid).finished == frozenset({1}), "it still runs: nothing counted"
        settle(broker, delivery, Outcome.ACK, output=b"ran")
        done = state(broker, gid)
        assert (done.outputs, done.failed, done.complete) == ((b"ran", None), frozenset({1}), True)
        assert ids(fetch_all(broker, callbacks)) == [callback.id]

    @requires(Capability.WORKFLOWS, Capability.CANCEL)
    def test_a_cancelled_member_withholds_the_callback_without_run_on_failure(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        first, second = members(queue, gid, 2)
        broker.open_group(GroupSpec(gid, 2, job(callbacks)), [first, second])
        assert broker.cancel(first.id) is CancelOutcome.REMOVED
        settle(broker, fetch_all(broker, queue)[0], Outcome.ACK)
        done = state(broker, gid)
        assert (done.complete, done.callback_sent) == (True, False)
        assert ready(broker, callbacks) == 0

    @requires(Capability.WORKFLOWS, Capability.DEAD_LETTER)
    def test_each_index_is_counted_once(self, broker: Broker, queue: str) -> None:
        gid, callbacks = unique("group"), unique()
        callback = job(callbacks)
        first, second = members(queue, gid, 2)
        broker.open_group(GroupSpec(gid, 2, callback, run_on_failure=True), [first, second])
        deliveries = fetch_by_id(broker, queue)
        settle(broker, deliveries[first.id], Outcome.DEAD, reason="KeyError", output=b"err")
        settle(broker, deliveries[second.id], Outcome.ACK, output=b"ok")
        settle(broker, fetch_all(broker, callbacks)[0], Outcome.ACK)  # its id is free again
        counted = state(broker, gid)
        assert broker.requeue_dead(queue) == 1
        [again] = fetch_all(broker, queue)
        settle(broker, again, Outcome.ACK, output=b"second try")
        duplicate = job(queue, member=GroupMember(gid, 1))
        broker.enqueue([duplicate])
        settle(broker, fetch_all(broker, queue)[0], Outcome.ACK, output=b"duplicate")
        assert state(broker, gid) == counted, "a later end of a counted index changes nothing"
        assert counted.outputs == (b"err", b"ok")
        assert broker.job_state(callback.id) is None, "and sends no second callback"
        assert ready(broker, callbacks) == 0

    @requires(Capability.WORKFLOWS)
    def test_members_enqueued_later_by_a_then_are_counted(self, broker: Broker, queue: str) -> None:
        gid, callbacks = unique("group"), unique()
        callback = job(callbacks)
        first, second = members(queue, gid, 2)
        step = job(queue, b"step")
        broker.enqueue([step])
        assert broker.open_group(GroupSpec(gid, 2, callback), [first]) == [True]
        deliveries = fetch_by_id(broker, queue)
        settle(broker, deliveries[step.id], Outcome.ACK, then=(second,))
        settle(broker, deliveries[first.id], Outcome.ACK, output=b"a")
        assert broker.job_state(callback.id) is None
        settle(broker, fetch_all(broker, queue)[0], Outcome.ACK, output=b"b")
        assert state(broker, gid).outputs == (b"a", b"b")
        assert ids(fetch_all(broker, callbacks)) == [callback.id]

    # -- release and expiry --------------------------------------------------------------------

    @requires(Capability.WORKFLOWS, Capability.DEAD_LETTER)
    def test_the_end_of_a_job_that_closes_a_group_releases_it(
        self, broker: Broker, queue: str
    ) -> None:
        for outcome in (Outcome.ACK, Outcome.DEAD):
            gid, callbacks = unique("group"), unique()
            callback = job(callbacks, b"callback", closes=gid)
            broker.open_group(GroupSpec(gid, 1, callback), members(queue, gid, 1))
            settle(broker, fetch_all(broker, queue)[0], Outcome.ACK, output=b"result")
            [delivered] = fetch_all(broker, callbacks)
            assert state(broker, gid).outputs == (b"result",), "kept while the callback runs"
            settle(broker, delivered, Outcome.RETRY, reason="ValueError")
            assert state(broker, gid).outputs == (b"result",), "a retry releases nothing"
            [again] = broker.fetch([callbacks], 1, lease=LEASE, wait=WAIT)
            settle(broker, again, outcome, reason="KeyError")
            assert broker.group_state(gid) is None, f"released by {outcome}"
            assert broker.open_group(GroupSpec(gid, 0), []) == [], "nothing of it is left"

    @requires(Capability.WORKFLOWS)
    def test_a_refused_settlement_of_a_closing_job_releases_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        gid, closers = unique("group"), unique()
        broker.open_group(GroupSpec(gid, 2), members(queue, gid, 2))
        broker.enqueue([job(closers, closes=gid)])
        [stale] = fetch_all(broker, closers, lease=SHORT_LEASE)
        [current] = broker.fetch([closers], 1, lease=LEASE, wait=WAIT)
        assert broker.settle([Settlement(stale, Outcome.ACK)]) == [False]
        assert state(broker, gid).size == 2, "a refused settlement releases nothing"
        settle(broker, current, Outcome.ACK)
        assert broker.group_state(gid) is None

    @requires(Capability.WORKFLOWS, Capability.CANCEL)
    def test_cancelling_a_waiting_job_that_closes_a_group_releases_it(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        callback = job(callbacks, closes=gid)
        broker.open_group(GroupSpec(gid, 1, callback), members(queue, gid, 1))
        settle(broker, fetch_all(broker, queue)[0], Outcome.ACK, output=b"result")
        assert state(broker, gid).complete
        assert broker.cancel(callback.id) is CancelOutcome.REMOVED
        assert broker.group_state(gid) is None

    @requires(Capability.WORKFLOWS)
    def test_members_of_a_released_group_settle_normally_and_send_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        gid, callbacks = unique("group"), unique()
        sent = members(queue, gid, 2)
        broker.open_group(GroupSpec(gid, 2, job(callbacks)), sent)
        broker.enqueue([job(queue, b"closer", closes=gid)])
        deliveries = {d.body: d for d in fetch_all(broker, queue)}
        settle(broker, deliveries[b"closer"], Outcome.ACK)
        assert broker.group_state(gid) is None, "an incomplete group is released too"
        settle(broker, deliveries[b"member 0"], Outcome.ACK, output=b"0")
        settle(broker, deliveries[b"member 1"], Outcome.ACK, output=b"1")
        assert broker.group_state(gid) is None, "settling its members recreates nothing"
        assert ready(broker, callbacks) == 0
        assert [broker.job_state(m.id) for m in sent] == [None, None]

    @requires(Capability.WORKFLOWS)
    def test_unknown_group_ids_are_no_error(self, broker: Broker, queue: str) -> None:
        gid = unique("group")
        assert broker.group_state(gid) is None
        stray, closer = job(queue, member=GroupMember(gid, 0)), job(queue, closes=gid)
        broker.enqueue([stray, closer])
        assert broker.settle(
            [Settlement(d, Outcome.ACK, output=b"x") for d in fetch_all(broker, queue)]
        ) == [True, True]
        assert broker.group_state(gid) is None
        assert [broker.job_state(m.id) for m in (stray, closer)] == [None, None]

    @requires(Capability.WORKFLOWS)
    def test_a_complete_group_nobody_releases_expires_after_its_ttl(
        self, broker: Broker, queue: str
    ) -> None:
        gid = unique("group")
        broker.open_group(GroupSpec(gid, 1, ttl=TTL), members(queue, gid, 1))
        completed = time.time()
        settle(broker, fetch_all(broker, queue)[0], Outcome.ACK, output=b"result")
        assert state(broker, gid).outputs == (b"result",)
        eventually(lambda: broker.group_state(gid) is None, what="the group to expire")
        assert time.time() >= completed + TTL - CLOCK_SLACK, "it expired early"

    @requires(Capability.WORKFLOWS)
    def test_an_incomplete_group_never_expires(self, broker: Broker, queue: str) -> None:
        gid = unique("group")
        first, second = members(queue, gid, 2)
        broker.open_group(GroupSpec(gid, 2, ttl=0.1), [first, second])
        deliveries = fetch_by_id(broker, queue)
        settle(broker, deliveries[first.id], Outcome.ACK, output=b"a")
        time.sleep(0.1 + 2 * CLOCK_SLACK)  # nothing to wait on: it must still be there
        assert state(broker, gid).outputs == (b"a", None)
        settle(broker, deliveries[second.id], Outcome.ACK, output=b"b")
        assert state(broker, gid).complete
        eventually(lambda: broker.group_state(gid) is None, what="the complete group to expire")

    # -- nesting -------------------------------------------------------------------------------

    @requires(Capability.WORKFLOWS)
    def test_a_callback_that_is_a_member_of_an_outer_group_counts_there_and_closes_its_own(
        self, broker: Broker, queue: str
    ) -> None:
        outer, inner, callbacks = unique("group"), unique("group"), unique()
        final = job(callbacks, b"final", closes=outer)
        inner_callback = job(queue, b"chord", member=GroupMember(outer, 0), closes=inner)
        sibling = job(queue, b"sibling", member=GroupMember(outer, 1))
        assert broker.open_group(GroupSpec(outer, 2, final), [sibling]) == [True]
        assert broker.open_group(GroupSpec(inner, 2, inner_callback), members(queue, inner, 2)) == [
            True,
            True,
        ]
        deliveries = {d.body: d for d in fetch_all(broker, queue)}
        settle(broker, deliveries[b"member 0"], Outcome.ACK, output=b"i0")
        settle(broker, deliveries[b"member 1"], Outcome.ACK, output=b"i1")
        settle(broker, deliveries[b"sibling"], Outcome.ACK, output=b"s")
        assert state(broker, outer).finished == frozenset({1})
        [chord] = fetch_all(broker, queue)
        assert chord.id == inner_callback.id
        assert state(broker, inner).outputs == (b"i0", b"i1"), "kept until the chord ends"
        settle(broker, chord, Outcome.ACK, output=b"summary")
        assert broker.group_state(inner) is None, "its closes released the inner group"
        done = state(broker, outer)
        assert (done.outputs, done.complete, done.callback_sent) == ((b"summary", b"s"), True, True)
        [delivered] = fetch_all(broker, callbacks)
        settle(broker, delivered, Outcome.ACK)
        assert broker.group_state(outer) is None
