"""The broker contract for unique jobs, limits and schedules, as tests.

:class:`~worq_core.testing.BrokerContract` inherits these cases, so every backend that runs it
runs them too; each is marked with the capability it needs (:attr:`Capability.UNIQUE`,
:attr:`Capability.LIMITS`, :attr:`Capability.SCHEDULES`) and skipped for a broker that does not
declare it.
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
    ConcurrencyLimit,
    Delivery,
    JobState,
    JobStatus,
    Message,
    Outcome,
    RateLimit,
    Settlement,
    UniqueKey,
    UniqueUntil,
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

INTERVAL = 0.2
"""A rate interval short enough to wait for, long enough to measure against the clock."""
FOREVER = 3600.0
"""A rate interval no case waits for: its set-aside jobs stay set aside."""


def job(
    queue: str,
    *,
    key: UniqueKey | str | None = None,
    rate: RateLimit | None = None,
    concurrency: ConcurrencyLimit | None = None,
    priority: int = 0,
    job_id: str | None = None,
) -> Message:
    """A message with a fresh id; a ``key`` given as text is unique until done."""
    if isinstance(key, str):
        key = UniqueKey(key)
    return Message(
        job_id or uuid.uuid4().hex,
        queue,
        b"payload",
        priority,
        unique=key,
        rate=rate,
        concurrency=concurrency,
    )


def counts(broker: Broker, queue: str) -> tuple[int, int, int]:
    """``queue``'s ready, delayed and running counts."""
    [stats] = broker.stats([queue])
    return stats.ready, stats.delayed, stats.running


def ack(broker: Broker, *deliveries: Delivery) -> None:
    """Acknowledge ``deliveries``, which must still hold their leases."""
    assert broker.settle([Settlement(d, Outcome.ACK) for d in deliveries]) == [True] * len(
        deliveries
    )


class SchedulingBrokerContract(BrokerCases):
    """Unique keys, rate and concurrency limits, and schedules' compare-and-set.

    Part of :class:`~worq_core.testing.BrokerContract`; the same ``broker`` fixture serves.
    """

    # -- unique jobs -----------------------------------------------------------------------

    @requires(Capability.UNIQUE)
    def test_a_job_whose_unique_key_is_held_is_not_added_and_gets_the_holders_id(
        self, broker: Broker, queue: str
    ) -> None:
        first, second = job(queue, key="k"), job(queue, key="k")
        assert broker.enqueue_unique([first]) == [None]
        assert broker.enqueue_unique([second]) == [first.id]
        assert broker.job_state(second.id) is None
        assert counts(broker, queue) == (1, 0, 0)
        assert ids(fetch_all(broker, queue)) == [first.id]

    @requires(Capability.UNIQUE)
    def test_a_unique_job_whose_id_is_held_gets_its_own_id(
        self, broker: Broker, queue: str
    ) -> None:
        plain, keyed = job(queue), job(queue, key="k")
        assert broker.enqueue_unique([plain, keyed]) == [None, None]
        assert broker.enqueue_unique([job(queue, key="other", job_id=plain.id)]) == [plain.id]
        assert broker.enqueue_unique([job(queue, key="k", job_id=keyed.id)]) == [keyed.id]
        assert broker.enqueue_unique([job(queue, job_id=plain.id)]) == [plain.id]
        assert broker.enqueue_unique([job(queue, key="free")]) == [None]
        assert counts(broker, queue) == (3, 0, 0)

    @requires(Capability.UNIQUE)
    def test_unique_keys_are_per_queue(self, broker: Broker, queue: str) -> None:
        other = unique()
        here, there = job(queue, key="k"), job(other, key="k")
        assert broker.enqueue_unique([here, there]) == [None, None]
        assert broker.enqueue_unique([job(other, key="k")]) == [there.id]
        assert ids(broker.fetch([queue, other], 10, lease=LEASE, wait=0)) == [here.id, there.id]

    @requires(Capability.UNIQUE)
    def test_a_job_added_in_a_batch_holds_its_key_for_the_messages_after_it(
        self, broker: Broker, queue: str
    ) -> None:
        first, again, plain, other = (
            job(queue, key="k"),
            job(queue, key="k"),
            job(queue),
            job(queue, key="j"),
        )
        assert broker.enqueue_unique([first, again, plain, other]) == [None, first.id, None, None]
        assert ids(fetch_all(broker, queue)) == [first.id, plain.id, other.id]

    @requires(Capability.UNIQUE)
    def test_enqueue_honours_a_unique_key_too(self, broker: Broker, queue: str) -> None:
        first, second = job(queue, key="k"), job(queue, key="k")
        assert broker.enqueue([first, second]) == [True, False]
        assert broker.enqueue([job(queue, key="k")]) == [False]
        assert broker.job_state(second.id) is None
        assert broker.enqueue_unique([second]) == [first.id], "one key, whichever way it came"

    @requires(Capability.UNIQUE)
    def test_a_key_unique_until_started_is_free_once_its_job_is_fetched(
        self, broker: Broker, queue: str
    ) -> None:
        key = UniqueKey("k", UniqueUntil.STARTED)
        first = job(queue, key=key)
        broker.enqueue_unique([first])
        assert broker.enqueue_unique([job(queue, key=key)]) == [first.id]
        [running] = fetch_all(broker, queue)
        second = job(queue, key=key)
        assert broker.enqueue_unique([second]) == [None], "an equal job may wait while one runs"
        assert broker.enqueue_unique([job(queue, key=key)]) == [second.id]
        broker.settle([Settlement(running, Outcome.RETRY, 0, "ValueError: x")])
        assert broker.enqueue_unique([job(queue, key=key)]) == [second.id]
        assert sorted(ids(fetch_all(broker, queue))) == sorted([first.id, second.id])
        assert broker.enqueue_unique([job(queue, key=key)]) == [None]

    @requires(Capability.UNIQUE)
    def test_a_key_unique_until_done_is_held_while_its_job_runs_and_freed_by_its_ack(
        self, broker: Broker, queue: str
    ) -> None:
        first = job(queue, key="k")
        broker.enqueue_unique([first])
        [running] = fetch_all(broker, queue)
        assert broker.enqueue_unique([job(queue, key="k")]) == [first.id]
        ack(broker, running)
        second = job(queue, key="k")
        assert broker.enqueue_unique([second]) == [None], "hold_for=0: free at once"
        assert broker.enqueue_unique([job(queue, key="k")]) == [second.id]

    @requires(Capability.UNIQUE)
    def test_a_retry_or_a_release_keeps_a_key_unique_until_done(
        self, broker: Broker, queue: str
    ) -> None:
        first = job(queue, key="k")
        broker.enqueue_unique([first])
        [delivery] = fetch_all(broker, queue)
        broker.settle([Settlement(delivery, Outcome.RETRY, 0, "ValueError: x")])
        assert broker.enqueue_unique([job(queue, key="k")]) == [first.id], "after a retry"
        [delivery] = broker.fetch([queue], 1, lease=LEASE, wait=WAIT)
        broker.release([delivery])
        assert broker.enqueue_unique([job(queue, key="k")]) == [first.id], "after a release"
        [delivery] = fetch_all(broker, queue)
        assert broker.enqueue_unique([job(queue, key="k")]) == [first.id], "running again"
        ack(broker, delivery)
        assert broker.enqueue_unique([job(queue, key="k")]) == [None]

    @requires(Capability.UNIQUE)
    def test_a_job_whose_lease_expires_keeps_its_key_and_is_delivered_again(
        self, broker: Broker, queue: str
    ) -> None:
        first = job(queue, key="k")
        broker.enqueue_unique([first])
        fetch_all(broker, queue, lease=SHORT_LEASE)
        eventually(lambda: status(broker, first.id) is JobStatus.QUEUED, what="the lease to lapse")
        assert broker.enqueue_unique([job(queue, key="k")]) == [first.id]
        [again] = fetch_all(broker, queue)
        assert (again.id, again.attempts) == (first.id, 2)
        assert broker.enqueue_unique([job(queue, key="k")]) == [first.id]
        ack(broker, again)
        assert broker.enqueue_unique([job(queue, key="k")]) == [None]

    @requires(Capability.UNIQUE, Capability.DEAD_LETTER)
    def test_dead_lettering_frees_the_key_and_requeue_dead_does_not_take_it_again(
        self, broker: Broker, queue: str
    ) -> None:
        first = job(queue, key="k")
        broker.enqueue_unique([first])
        [delivery] = fetch_all(broker, queue)
        broker.settle([Settlement(delivery, Outcome.DEAD, reason="KeyError")])
        second = job(queue, key="k")
        assert broker.enqueue_unique([second]) == [None]
        assert broker.requeue_dead(queue) == 1
        assert broker.enqueue_unique([job(queue, key="k")]) == [second.id]
        assert sorted(ids(fetch_all(broker, queue))) == sorted([first.id, second.id])

    @requires(Capability.UNIQUE, Capability.DEAD_LETTER)
    def test_a_purged_job_holds_neither_its_id_nor_its_key(
        self, broker: Broker, queue: str
    ) -> None:
        first = job(queue, key="k")
        broker.enqueue_unique([first])
        [delivery] = fetch_all(broker, queue)
        broker.settle([Settlement(delivery, Outcome.DEAD, reason="KeyError")])
        assert broker.enqueue_unique([job(queue, key="j", job_id=first.id)]) == [first.id]
        assert broker.purge_dead(queue) == 1
        assert broker.enqueue_unique([job(queue, key="k", job_id=first.id)]) == [None]
        assert broker.job_state(first.id) == JobState(queue, JobStatus.QUEUED)

    @requires(Capability.UNIQUE, Capability.CANCEL)
    def test_cancelling_the_holder_frees_its_key_once_it_is_removed(
        self, broker: Broker, queue: str
    ) -> None:
        waiting = job(queue, key="waiting")
        running = job(queue, key="running")
        broker.enqueue_unique([running])
        [delivery] = fetch_all(broker, queue)
        broker.enqueue_unique([waiting])
        assert broker.cancel(waiting.id) is CancelOutcome.REMOVED
        assert broker.enqueue_unique([job(queue, key="waiting")]) == [None]
        assert broker.cancel(running.id) is CancelOutcome.REQUESTED
        assert broker.enqueue_unique([job(queue, key="running")]) == [running.id], "still runs"
        ack(broker, delivery)
        assert broker.enqueue_unique([job(queue, key="running")]) == [None]

    @requires(Capability.UNIQUE)
    @pytest.mark.parametrize("until", list(UniqueUntil))
    def test_hold_for_keeps_the_key_taken_that_long_after_its_release(
        self, broker: Broker, queue: str, until: UniqueUntil
    ) -> None:
        key = UniqueKey("k", until, hold_for=0.3)
        first = job(queue, key=key)
        broker.enqueue_unique([first])
        released = time.time()  # just before the fetch (STARTED) or the ack (DONE) lets go
        [delivery] = fetch_all(broker, queue)
        if until is UniqueUntil.DONE:
            released = time.time()
            ack(broker, delivery)
            assert broker.job_state(first.id) is None
        assert broker.enqueue_unique([job(queue, key=key)]) == [first.id], "the holder's id"
        eventually(
            lambda: broker.enqueue_unique([job(queue, key=key)]) == [None],
            what="the key to be free after hold_for",
        )
        assert time.time() >= released + 0.3 - CLOCK_SLACK
        assert counts(broker, queue)[0] == 1

    # -- schedules ---------------------------------------------------------------------------
    # Every call names the queue the schedule's jobs go to, as the scheduler does: a broker may
    # keep a schedule's record with its queue (Redis Cluster keeps it in the queue's slot).

    @requires(Capability.SCHEDULES)
    def test_fire_schedule_is_a_compare_and_set_on_the_last_fire(
        self, broker: Broker, queue: str
    ) -> None:
        name = unique("schedule")
        tick, later = 1_800_000_000.123456, 1_800_000_060.123456
        mine = {name: queue}
        assert broker.schedule_fires([name], mine) == {}
        assert broker.fire_schedule(name, tick, None, None, queue) is True
        assert broker.schedule_fires([name], mine) == {name: tick}
        assert broker.fire_schedule(name, later, None, None, queue) is False, "it has a record"
        assert broker.fire_schedule(name, later, tick + 1e-6, None, queue) is False, "exactly"
        assert broker.schedule_fires([name], mine) == {name: tick}
        assert broker.fire_schedule(name, later, tick, None, queue) is True
        assert broker.schedule_fires([name], mine) == {name: later}
        assert broker.fire_schedule(name, later + 60, tick, None, queue) is False, "moved on"

    @requires(Capability.SCHEDULES)
    def test_a_fired_tick_enqueues_its_job_and_a_refused_one_enqueues_nothing(
        self, broker: Broker, queue: str
    ) -> None:
        name = unique("schedule")
        fired, refused = job(queue), job(queue)
        assert broker.fire_schedule(name, 100.0, None, fired, queue) is True
        assert broker.job_state(fired.id) == JobState(queue, JobStatus.QUEUED)
        assert broker.fire_schedule(name, 200.0, 50.0, refused, queue) is False
        assert broker.job_state(refused.id) is None
        assert broker.schedule_fires([name], {name: queue}) == {name: 100.0}
        assert ids(fetch_all(broker, queue)) == [fired.id]

    @requires(Capability.SCHEDULES)
    def test_a_tick_without_a_job_and_the_ticks_with_jobs_share_one_record(
        self, broker: Broker, queue: str
    ) -> None:
        name = unique("schedule")
        assert broker.fire_schedule(name, 100.0, None, None, queue) is True, "first seen"
        first = job(queue)
        assert broker.fire_schedule(name, 200.0, 100.0, first) is True, "queue: the message's"
        assert broker.fire_schedule(name, 300.0, 200.0, None, queue) is True, "a skipped tick"
        assert broker.fire_schedule(name, 400.0, 300.0, job(queue), queue) is True
        assert broker.schedule_fires([name], {name: queue}) == {name: 400.0}
        assert len(fetch_all(broker, queue)) == 2

    @requires(Capability.SCHEDULES)
    def test_a_ticks_job_may_go_to_another_queue_than_the_schedules(
        self, broker: Broker, queue: str
    ) -> None:
        name, elsewhere = unique("schedule"), unique()
        moved = job(elsewhere)  # as a middleware may route a scheduled job
        assert broker.fire_schedule(name, 100.0, None, None, queue) is True
        assert broker.fire_schedule(name, 200.0, 100.0, moved, queue) is True
        assert broker.job_state(moved.id) == JobState(elsewhere, JobStatus.QUEUED)
        assert broker.fire_schedule(name, 300.0, 100.0, job(elsewhere), queue) is False
        assert broker.schedule_fires([name], {name: queue}) == {name: 200.0}
        assert ids(fetch_all(broker, elsewhere)) == [moved.id]

    @requires(Capability.SCHEDULES)
    def test_a_tick_whose_job_id_is_held_adds_nothing_but_still_fires(
        self, broker: Broker, queue: str
    ) -> None:
        name = unique("schedule")
        held = job(queue)
        broker.enqueue([held])
        replacement = Message(held.id, queue, b"tick")
        assert broker.fire_schedule(name, 100.0, None, replacement, queue) is True
        assert broker.schedule_fires([name], {name: queue}) == {name: 100.0}
        assert [d.body for d in fetch_all(broker, queue)] == [b"payload"]

    @requires(Capability.SCHEDULES, Capability.UNIQUE)
    def test_a_tick_whose_unique_key_is_held_adds_nothing_but_still_fires(
        self, broker: Broker, queue: str
    ) -> None:
        name = unique("schedule")
        holder, tick = job(queue, key="report"), job(queue, key="report")
        broker.enqueue_unique([holder])
        assert broker.fire_schedule(name, 100.0, None, tick, queue) is True
        assert broker.schedule_fires([name], {name: queue}) == {name: 100.0}
        assert broker.job_state(tick.id) is None
        unheld = job(queue, key="other")
        assert broker.fire_schedule(name, 200.0, 100.0, unheld, queue) is True
        assert ids(fetch_all(broker, queue)) == [holder.id, unheld.id]

    @requires(Capability.SCHEDULES)
    def test_schedule_fires_lists_the_recorded_schedules(self, broker: Broker, queue: str) -> None:
        first, second, unknown = unique("schedule"), unique("schedule"), unique("schedule")
        other = unique()
        broker.fire_schedule(first, 10.0, None, None, queue)
        broker.fire_schedule(second, 20.5, None, None, other)
        homes = {first: queue, second: other, unknown: queue}
        assert broker.schedule_fires([first, unknown, second], homes) == {
            first: 10.0,
            second: 20.5,
        }
        assert broker.schedule_fires([unknown], homes) == {}
        assert broker.schedule_fires([first, second]) == {first: 10.0, second: 20.5}, "anywhere"
        everything = broker.schedule_fires()
        assert (everything[first], everything[second]) == (10.0, 20.5)
        assert unknown not in everything

    @requires(Capability.SCHEDULES)
    def test_threads_racing_one_compare_and_set_fire_the_tick_once(
        self, broker: Broker, queue: str
    ) -> None:
        name, threads = unique("schedule"), 8
        broker.fire_schedule(name, 100.0, None, None, queue)
        barrier = threading.Barrier(threads)
        results: list[bool] = []
        lock = threading.Lock()

        def fire() -> None:
            barrier.wait(WAIT)
            fired = broker.fire_schedule(name, 200.0, 100.0, job(queue), queue)
            with lock:
                results.append(fired)

        racers = [threading.Thread(target=fire) for _ in range(threads)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(WAIT * 2)
        assert sorted(results) == [False] * (threads - 1) + [True]
        assert broker.schedule_fires([name], {name: queue}) == {name: 200.0}
        assert len(fetch_all(broker, queue)) == 1, "exactly one job"

    # -- rate limits -------------------------------------------------------------------------

    @requires(Capability.LIMITS)
    def test_a_rate_limit_lets_a_burst_through_then_one_job_per_interval(
        self, broker: Broker, queue: str
    ) -> None:
        rate = RateLimit("calls", INTERVAL, burst=2)
        sent = [job(queue, rate=rate) for _ in range(4)]
        broker.enqueue(sent)
        begin = time.time()
        first = fetch_all(broker, queue)
        assert ids(first) == [m.id for m in sent[:2]], "the burst"
        assert counts(broker, queue) == (0, 2, 2), "the rest wait for their slots, delayed"
        assert status(broker, sent[2].id) is JobStatus.SCHEDULED
        fetched_at: list[float] = []
        later: list[Delivery] = []
        while len(later) < 2:
            got = broker.fetch([queue], 10, lease=LEASE, wait=WAIT)
            assert got, "a set-aside job never came due"
            later += got
            fetched_at += [time.time()] * len(got)
        assert ids(later) == [m.id for m in sent[2:]]
        for n, at in enumerate(fetched_at, start=1):
            assert at >= begin + n * INTERVAL - CLOCK_SLACK, f"slot {n} came early"

    @requires(Capability.LIMITS)
    def test_a_job_set_aside_for_its_rate_is_not_counted_again_when_its_slot_comes(
        self, broker: Broker, queue: str
    ) -> None:
        rate = RateLimit("calls", INTERVAL)
        first, second = job(queue, rate=rate), job(queue, rate=rate)
        broker.enqueue([first, second])
        assert ids(fetch_all(broker, queue)) == [first.id]
        eventually(lambda: status(broker, second.id) is JobStatus.QUEUED, what="its slot")
        assert ids(fetch_all(broker, queue)) == [second.id], "its slot was reserved already"

    @requires(Capability.LIMITS)
    def test_a_retried_job_is_counted_against_its_rate_again(
        self, broker: Broker, queue: str
    ) -> None:
        msg = job(queue, rate=RateLimit("calls", FOREVER))
        broker.enqueue([msg])
        [delivery] = fetch_all(broker, queue)
        broker.settle([Settlement(delivery, Outcome.RETRY, 0, "ValueError: x")])
        assert fetch_all(broker, queue) == []
        assert broker.job_state(msg.id) == JobState(queue, JobStatus.SCHEDULED, attempts=1)

    @requires(Capability.LIMITS)
    def test_a_released_job_keeps_its_rate_slot_and_a_lapsed_one_is_counted_again(
        self, broker: Broker, queue: str
    ) -> None:
        # Released: handed back unstarted (a stopping worker's prefetched job), so it keeps the
        # slot it took. Lapsed: its worker died, maybe mid-run, so the next run counts.
        msg = job(queue, rate=RateLimit("calls", FOREVER))
        broker.enqueue([msg])
        [delivery] = fetch_all(broker, queue)
        broker.release([delivery])
        [again] = fetch_all(broker, queue, lease=SHORT_LEASE)
        assert again.id == msg.id, "a released job is not counted against its rate twice"
        time.sleep(SHORT_LEASE + CLOCK_SLACK)
        assert fetch_all(broker, queue) == []
        assert status(broker, msg.id) is JobStatus.SCHEDULED, "its redelivery waits for a slot"

    @requires(Capability.LIMITS)
    def test_rate_limits_are_counted_per_key_and_per_queue(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        a, b = RateLimit("a", FOREVER), RateLimit("b", FOREVER)
        a1, a2, b1, elsewhere = (
            job(queue, rate=a),
            job(queue, rate=a),
            job(queue, rate=b),
            job(other, rate=a),
        )
        broker.enqueue([a1, a2, b1, elsewhere])
        assert ids(broker.fetch([queue, other], 10, lease=LEASE, wait=0)) == [
            a1.id,
            b1.id,
            elsewhere.id,
        ]
        assert status(broker, a2.id) is JobStatus.SCHEDULED

    # -- concurrency limits ------------------------------------------------------------------

    @requires(Capability.LIMITS)
    def test_jobs_beyond_a_concurrency_limit_wait_queued_without_being_delivered(
        self, broker: Broker, queue: str
    ) -> None:
        limit = ConcurrencyLimit("db", 2)
        sent = [job(queue, concurrency=limit) for _ in range(4)]
        broker.enqueue(sent)
        assert ids(fetch_all(broker, queue)) == [m.id for m in sent[:2]]
        assert fetch_all(broker, queue) == []
        assert broker.job_state(sent[2].id) == JobState(queue, JobStatus.QUEUED)
        assert counts(broker, queue) == (2, 0, 2), "parked jobs count as ready"

    @requires(Capability.LIMITS)
    @pytest.mark.parametrize(
        "outcome",
        [
            "ack",
            "retry",
            pytest.param("dead", marks=requires(Capability.DEAD_LETTER)),
            "release",
        ],
    )
    def test_a_permit_comes_back_when_its_job_is_settled_or_released(
        self, broker: Broker, queue: str, outcome: str
    ) -> None:
        limit = ConcurrencyLimit("db", 1)
        first, second = job(queue, concurrency=limit), job(queue, concurrency=limit)
        broker.enqueue([first, second])
        [delivery] = fetch_all(broker, queue)
        assert fetch_all(broker, queue) == []
        if outcome == "release":
            broker.release([delivery])
        else:
            verdict = {"ack": Outcome.ACK, "retry": Outcome.RETRY, "dead": Outcome.DEAD}[outcome]
            assert broker.settle([Settlement(delivery, verdict, 0, "r")]) == [True]
        [next_one] = fetch_all(broker, queue)
        assert next_one.id == second.id, "the parked job has the permit"
        assert fetch_all(broker, queue) == [], "and only one job of the key runs"

    @requires(Capability.LIMITS)
    def test_a_permit_comes_back_when_its_lease_expires(self, broker: Broker, queue: str) -> None:
        limit = ConcurrencyLimit("db", 1)
        first, second = job(queue, concurrency=limit), job(queue, concurrency=limit)
        broker.enqueue([first, second])
        fetch_all(broker, queue, lease=SHORT_LEASE)
        assert fetch_all(broker, queue) == []
        [delivery] = broker.fetch([queue], 10, lease=LEASE, wait=WAIT)
        assert delivery.id in (first.id, second.id)
        assert fetch_all(broker, queue) == [], "the expired lease's permit is given only once"
        assert counts(broker, queue) == (1, 0, 1)

    @requires(Capability.LIMITS)
    def test_parked_jobs_of_one_key_come_back_in_the_order_they_were_parked(
        self, broker: Broker, queue: str
    ) -> None:
        limit = ConcurrencyLimit("db", 2)
        sent = [job(queue, concurrency=limit) for _ in range(6)]
        broker.enqueue(sent)
        running = fetch_all(broker, queue)
        order = ids(running)
        ack(broker, *running)  # two permits back at once
        while running := broker.fetch([queue], 1, lease=LEASE, wait=0):
            order += ids(running)
            ack(broker, *running)
        assert order == [m.id for m in sent]

    @requires(Capability.LIMITS)
    def test_a_parked_job_goes_back_in_front_of_the_jobs_behind_it(
        self, broker: Broker, queue: str
    ) -> None:
        limit = ConcurrencyLimit("db", 1)
        first, parked = job(queue, concurrency=limit), job(queue, concurrency=limit)
        broker.enqueue([first, parked])
        [delivery] = fetch_all(broker, queue)
        behind = [job(queue) for _ in range(3)]
        broker.enqueue(behind)
        assert ids(broker.fetch([queue], 1, lease=LEASE, wait=0)) == [behind[0].id]
        ack(broker, delivery)
        assert ids(broker.fetch([queue], 1, lease=LEASE, wait=0)) == [parked.id]
        assert ids(fetch_all(broker, queue)) == [m.id for m in behind[1:]]

    @requires(Capability.LIMITS)
    def test_concurrency_limits_are_counted_per_key_and_per_queue(
        self, broker: Broker, queue: str
    ) -> None:
        other = unique()
        a, b = ConcurrencyLimit("a", 1), ConcurrencyLimit("b", 1)
        a1, a2, b1, elsewhere = (
            job(queue, concurrency=a),
            job(queue, concurrency=a),
            job(queue, concurrency=b),
            job(other, concurrency=a),
        )
        broker.enqueue([a1, a2, b1, elsewhere])
        got = broker.fetch([queue, other], 10, lease=LEASE, wait=0)
        assert ids(got) == [a1.id, b1.id, elsewhere.id]

    @requires(Capability.LIMITS)
    def test_a_job_with_both_limits_waits_for_its_permit_before_its_rate_is_counted(
        self, broker: Broker, queue: str
    ) -> None:
        limit, rate = ConcurrencyLimit("db", 1), RateLimit("calls", FOREVER, burst=2)
        first, second, third = (job(queue, rate=rate, concurrency=limit) for _ in range(3))
        broker.enqueue([first, second, third])
        [delivery] = fetch_all(broker, queue)
        assert counts(broker, queue) == (2, 0, 1), "parked without taking a rate slot"
        ack(broker, delivery)
        assert ids(fetch_all(broker, queue)) == [second.id], "the burst's second slot is free"
        assert broker.job_state(third.id) == JobState(queue, JobStatus.QUEUED)

    @requires(Capability.LIMITS)
    def test_workers_on_many_threads_never_hold_more_leases_of_a_key_than_its_limit(
        self, broker: Broker, queue: str
    ) -> None:
        limit, total, threads = ConcurrencyLimit("db", 2), 40, 4
        sent = [job(queue, concurrency=limit) for _ in range(total)]
        broker.enqueue(sent + [job(queue) for _ in range(total // 2)])
        lock = threading.Lock()
        live: set[str] = set()
        most = [0]
        done: set[str] = set()
        released: set[str] = set()
        failures: list[str] = []
        limited = {m.id for m in sent}

        def work() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with lock:
                    if len(done) == total * 3 // 2:
                        return
                got = broker.fetch([queue], 3, lease=LEASE, wait=0.05)
                with lock:
                    live.update(d.id for d in got if d.id in limited)
                    most[0] = max(most[0], len(live))
                    if len(live) > limit.limit:
                        failures.append(f"{len(live)} leases of the key at once")
                time.sleep(0.002)  # hold the leases a moment
                for delivery in got:
                    with lock:
                        live.discard(delivery.id)  # before the broker gives the permit back
                        release = delivery.id not in released and len(released) < 5
                        if release:
                            released.add(delivery.id)
                    if release:
                        broker.release([delivery])
                    elif delivery.attempts == 1 and hash(delivery.id) % 3 == 0:
                        broker.settle([Settlement(delivery, Outcome.RETRY, 0, "ValueError")])
                    else:
                        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
                        with lock:
                            done.add(delivery.id)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert failures == []
        assert len(done) == total * 3 // 2, "every job ran to the end"
        assert most[0] <= limit.limit

    # -- both, and what set-aside jobs look like -----------------------------------------------

    @requires(Capability.LIMITS)
    def test_limited_jobs_at_the_head_of_a_queue_do_not_hold_up_the_jobs_behind_them(
        self, broker: Broker, queue: str
    ) -> None:
        limit, rate = ConcurrencyLimit("db", 1), RateLimit("calls", FOREVER)
        parked = [job(queue, concurrency=limit) for _ in range(3)]
        waiting = [job(queue, rate=rate) for _ in range(3)]
        free = [job(queue) for _ in range(5)]
        broker.enqueue(parked + waiting + free)
        got = broker.fetch([queue], 10, lease=LEASE, wait=0)
        assert ids(got) == [parked[0].id, waiting[0].id] + [m.id for m in free]
        assert fetch_all(broker, queue) == []

    @requires(Capability.LIMITS)
    def test_set_aside_jobs_read_as_queued_or_scheduled_and_are_counted_so(
        self, broker: Broker, queue: str
    ) -> None:
        limit, rate = ConcurrencyLimit("db", 1), RateLimit("calls", FOREVER)
        running, parked = job(queue, concurrency=limit), job(queue, concurrency=limit)
        counted, waiting = job(queue, rate=rate), job(queue, rate=rate)
        broker.enqueue([running, parked, counted, waiting])
        assert ids(fetch_all(broker, queue)) == [running.id, counted.id]
        assert broker.job_state(parked.id) == JobState(queue, JobStatus.QUEUED)
        assert broker.job_state(waiting.id) == JobState(queue, JobStatus.SCHEDULED)
        assert counts(broker, queue) == (1, 1, 2)

    @requires(Capability.LIMITS, Capability.CANCEL)
    def test_cancelling_a_job_waiting_for_its_rate_slot_removes_it_for_good(
        self, broker: Broker, queue: str
    ) -> None:
        rate = RateLimit("calls", INTERVAL)
        first, cancelled = job(queue, rate=rate), job(queue, rate=rate)
        broker.enqueue([first, cancelled])
        assert ids(fetch_all(broker, queue)) == [first.id]
        assert broker.cancel(cancelled.id) is CancelOutcome.REMOVED
        assert broker.job_state(cancelled.id) is None
        assert counts(broker, queue) == (0, 0, 1)
        assert broker.fetch([queue], 10, lease=LEASE, wait=2 * INTERVAL) == [], "not at its slot"

    @requires(Capability.LIMITS, Capability.CANCEL)
    def test_cancelling_a_parked_job_removes_it_and_the_next_one_gets_the_permit(
        self, broker: Broker, queue: str
    ) -> None:
        limit = ConcurrencyLimit("db", 1)
        sent = [job(queue, concurrency=limit) for _ in range(4)]
        broker.enqueue(sent)
        [delivery] = fetch_all(broker, queue)
        assert broker.cancel(sent[1].id) is CancelOutcome.REMOVED
        assert broker.job_state(sent[1].id) is None
        assert counts(broker, queue) == (2, 0, 1)
        ack(broker, delivery)
        # The permit went to sent[2]; cancelling it before it is fetched passes it on.
        assert broker.cancel(sent[2].id) is CancelOutcome.REMOVED
        [delivery] = fetch_all(broker, queue)
        assert delivery.id == sent[3].id
        ack(broker, delivery)
        assert fetch_all(broker, queue) == []
        assert counts(broker, queue) == (0, 0, 0)
