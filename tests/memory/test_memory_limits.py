"""The memory broker's unique keys, limits and schedules beyond the contract, on a hand clock.

These pin down the choices the spec leaves open (the Redis broker makes the same ones) and the
bounds of the reference implementation: exact GCRA slots, the set-aside bound per fetch, the
permit a released or expired job gives back, and state that does not pile up.
"""

from __future__ import annotations

import threading

from worq_core import CancelOutcome, JobState, JobStatus, Message, Outcome, Settlement
from worq_core.models import ConcurrencyLimit, RateLimit, UniqueKey, UniqueUntil
from worq_memory import MemoryBroker


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def msg(
    job_id: str,
    *,
    rate: RateLimit | None = None,
    concurrency: ConcurrencyLimit | None = None,
    unique: UniqueKey | None = None,
    queue: str = "q",
) -> Message:
    return Message(job_id, queue, b"", rate=rate, concurrency=concurrency, unique=unique)


def fetch_ids(broker: MemoryBroker, limit: int = 100) -> list[str]:
    return [d.id for d in broker.fetch(["q"], limit, lease=10_000, wait=0)]


def test_rate_slots_follow_gcra_exactly_and_an_idle_key_gets_its_burst_back() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    rate = RateLimit("r", interval=10, burst=3)
    broker.enqueue([msg(f"j{i}", rate=rate) for i in range(6)])
    assert fetch_ids(broker) == ["j0", "j1", "j2"]
    slots = {f"j{i}": broker._jobs[f"j{i}"].due for i in range(3, 6)}
    assert slots == {"j3": 1_010.0, "j4": 1_020.0, "j5": 1_030.0}
    clock.now = 1_009.999
    assert fetch_ids(broker) == []
    clock.now = 1_010.0
    assert fetch_ids(broker) == ["j3"]
    clock.now = 1_030.0
    assert fetch_ids(broker) == ["j4", "j5"], "each comes on its own reserved slot"
    clock.now = 2_000.0  # long idle: the whole burst again
    broker.enqueue([msg(f"k{i}", rate=rate) for i in range(4)])
    assert fetch_ids(broker) == ["k0", "k1", "k2"]
    assert broker.job_state("k3") == JobState("q", JobStatus.SCHEDULED)


def test_a_job_requeued_from_the_dead_letters_is_counted_against_its_rate_again() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    broker.enqueue([msg("j", rate=RateLimit("r", interval=60))])
    [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
    broker.settle([Settlement(delivery, Outcome.DEAD, reason="r")])
    assert broker.requeue_dead("q") == 1
    assert fetch_ids(broker) == []
    assert broker.job_state("j") == JobState("q", JobStatus.SCHEDULED)


def test_a_released_job_gives_its_permit_to_the_oldest_parked_job() -> None:
    broker = MemoryBroker()
    limit = ConcurrencyLimit("c", 1)
    broker.enqueue([msg(f"j{i}", concurrency=limit) for i in range(3)])
    [delivery] = broker.fetch(["q"], 10, lease=30, wait=0)
    broker.release([delivery])
    assert fetch_ids(broker) == ["j1"]
    assert broker.job_state("j0") == JobState("q", JobStatus.QUEUED)
    permits = broker._queues["q"].permits["c"]
    assert list(permits.parked) == ["j2", "j0"], "the released job waits behind the others"


def test_a_job_whose_lease_lapsed_gives_its_permit_to_the_oldest_parked_job() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    limit = ConcurrencyLimit("c", 1)
    broker.enqueue([msg(f"j{i}", concurrency=limit) for i in range(2)])
    broker.fetch(["q"], 10, lease=5, wait=0)
    clock.now += 5
    [delivery] = broker.fetch(["q"], 10, lease=30, wait=0)
    assert (delivery.id, broker.job_state("j0")) == ("j1", JobState("q", JobStatus.QUEUED, 1))


def test_more_limited_jobs_than_one_pass_sets_aside_do_not_hide_the_job_behind_them() -> None:
    broker = MemoryBroker()
    limit = ConcurrencyLimit("c", 1)
    broker.enqueue([msg(f"l{i}", concurrency=limit) for i in range(350)] + [msg("free")])
    assert fetch_ids(broker, 1) == ["l0"]
    assert fetch_ids(broker, 1) == [], "wait=0: one bounded pass"
    got = broker.fetch(["q"], 1, lease=30, wait=5)
    assert [d.id for d in got] == ["free"], "a blocking fetch goes on to it"
    [stats] = broker.stats(["q"])
    assert (stats.ready, stats.running) == (349, 2)


def test_a_blocked_fetch_wakes_when_a_permit_comes_back() -> None:
    broker = MemoryBroker()
    limit = ConcurrencyLimit("c", 1)
    broker.enqueue([msg("a", concurrency=limit), msg("b", concurrency=limit)])
    [running] = broker.fetch(["q"], 10, lease=30, wait=0)
    waiting = threading.Event()
    got: list[str] = []

    def fetch() -> None:
        waiting.set()
        got.extend(d.id for d in broker.fetch(["q"], 10, lease=30, wait=30))

    thread = threading.Thread(target=fetch)
    thread.start()
    waiting.wait(5)
    broker.settle([Settlement(running, Outcome.ACK)])
    thread.join(5)
    assert not thread.is_alive(), "the fetch slept on while a permit was free"
    assert got == ["b"]


def test_cancelling_a_job_unique_until_started_before_it_starts_starts_its_hold_for() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    key = UniqueKey("k", UniqueUntil.STARTED, hold_for=10)
    broker.enqueue_unique([msg("a", unique=key)])
    assert broker.cancel("a") is CancelOutcome.REMOVED
    assert broker.enqueue_unique([msg("b", unique=key)]) == ["a"]
    clock.now += 10
    assert broker.enqueue_unique([msg("b", unique=key)]) == [None]


def test_lapsed_unique_keys_and_idle_rate_states_do_not_pile_up() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    for n in range(2_000):
        key = UniqueKey(f"k{n}", UniqueUntil.STARTED, hold_for=1)
        broker.enqueue_unique([msg(f"j{n}", unique=key, rate=RateLimit(f"r{n}", 1))])
        [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
        broker.settle([Settlement(delivery, Outcome.ACK)])
        clock.now += 2
    queue = broker._queues["q"]
    assert len(queue.keys) + len(queue.tats) < 300
    assert queue.permits == {}


def test_permit_state_is_dropped_once_a_key_is_idle() -> None:
    broker = MemoryBroker()
    limit = ConcurrencyLimit("c", 1)
    broker.enqueue([msg(f"j{i}", concurrency=limit) for i in range(3)])
    assert broker.cancel("j2") is CancelOutcome.REMOVED
    for _ in range(2):
        [delivery] = broker.fetch(["q"], 10, lease=30, wait=0)
        broker.settle([Settlement(delivery, Outcome.ACK)])
    assert broker._queues["q"].permits == {}
