"""Unique jobs, limits and schedules on Redis: what the broker contract cannot see.

The contract checks the answers; these cases check the keys behind them. Idle keys vanish (a
released unique key, a rate key's TAT once it falls behind the clock, an empty permit set or
parking list), nothing grows per job, a unique key whose holder vanished behind the scripts'
backs is free, two brokers (as two processes would) racing one schedule's compare-and-set fire it
once, a fetch that only sets jobs aside leaves no stale wake-up behind, and jobs without unique
keys or limits go through the scripts exactly as before (five-field meta, no derived keys, the
same script arguments).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis_support import Backend, Clock, counting_client, keyslot, leftovers, queue_base

from worq_core.models import (
    CancelOutcome,
    ConcurrencyLimit,
    Delivery,
    JobStatus,
    Message,
    Outcome,
    RateLimit,
    Settlement,
    UniqueKey,
    UniqueUntil,
)
from worq_redis import RedisBroker, RedisSettings, lua
from worq_redis.connection import ids_key, schedules_key


def msg(queue: str, job_id: str, **kwargs: Any) -> Message:
    return Message(job_id, queue, b"body", **kwargs)


def ack_all(broker: RedisBroker, deliveries: list[Delivery]) -> None:
    assert broker.settle([Settlement(d, Outcome.ACK) for d in deliveries]) == [True] * len(
        deliveries
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(backend: Backend) -> Iterator[RedisBroker]:
    broker = backend.broker()
    yield broker
    broker.close()


# -- keys that vanish ------------------------------------------------------------------------


def test_unique_keys_are_gone_once_released_and_held_ones_name_their_holder(
    backend: Backend, broker: RedisBroker
) -> None:
    b = queue_base(backend, "u")
    done, started = UniqueKey("done"), UniqueKey("started", UniqueUntil.STARTED)
    assert broker.enqueue_unique([msg("u", "d1", unique=done), msg("u", "s1", unique=started)]) == [
        None,
        None,
    ]
    assert backend.client.get(b + "u:done") == b"d1"
    assert backend.client.pttl(b + "u:done") == -1, "no TTL while held"
    assert backend.client.hget(b + "meta", "d1") == b"q|0|0000000000000001|0||u"
    assert backend.client.hget(b + "meta", "s1") == b"q|0|0000000000000002|0||U"
    first = broker.fetch(["u"], 2, lease=30, wait=0)
    assert not backend.client.exists(b + "u:started"), "until started: gone at its first lease"
    assert backend.client.hkeys(b + "unique") == [b"d1"]
    ack_all(broker, first)
    assert leftovers(backend) == set(), "nothing left but the queue's counter"


def test_a_released_key_with_hold_for_expires_by_itself(
    backend: Backend, broker: RedisBroker
) -> None:
    key = UniqueKey("k", hold_for=0.3)
    broker.enqueue_unique([msg("h", "h1", unique=key)])
    ack_all(broker, broker.fetch(["h"], 1, lease=30, wait=0))
    k = queue_base(backend, "h") + "u:k"
    assert backend.client.get(k) == b"h1"
    assert 0 < backend.client.pttl(k) <= 300
    assert broker.enqueue_unique([msg("h", "h2", unique=key)]) == ["h1"]
    time.sleep(0.45)
    assert not backend.client.exists(k)
    assert broker.enqueue_unique([msg("h", "h3", unique=key)]) == [None]


def test_rate_keys_expire_once_their_tat_falls_behind_and_permit_keys_empty(
    backend: Backend, broker: RedisBroker
) -> None:
    rate = RateLimit("api", interval=0.05, burst=2)
    permits = ConcurrencyLimit("db", 2)
    sent = [msg("r", f"r{n}", rate=rate, concurrency=permits) for n in range(6)]
    broker.enqueue(sent)
    b = queue_base(backend, "r")
    finished = 0
    deadline = time.monotonic() + 10
    while finished < len(sent):
        assert time.monotonic() < deadline
        got = broker.fetch(["r"], 10, lease=30, wait=0.2)
        assert len(got) <= 2
        ack_all(broker, got)
        finished += len(got)
    tat = backend.client.get(b + "r:api")
    assert tat is not None
    assert 0 < backend.client.pttl(b + "r:api") <= 100
    time.sleep(0.15)
    assert leftovers(backend) == set(), "the TAT expired, the permit set and list are empty"


def test_keys_do_not_grow_with_the_number_of_jobs(backend: Backend, broker: RedisBroker) -> None:
    total = 300 if backend.kind == "redis" else 100
    for start in range(0, total, 50):
        broker.enqueue_unique(
            [
                msg(
                    "g",
                    f"g{n}",
                    unique=UniqueKey(f"k{n % 7}"),
                    concurrency=ConcurrencyLimit(f"c{n % 3}", 2),
                    rate=RateLimit(f"r{n % 5}", interval=0.001, burst=1000),
                )
                for n in range(start, start + 50)
            ]
        )
        while got := broker.fetch(["g"], 8, lease=30, wait=0):
            ack_all(broker, got)
    assert backend.client.hlen(queue_base(backend, "g") + "meta") == 0
    time.sleep(0.05)
    assert leftovers(backend) == set()


def test_every_key_of_a_limited_or_unique_job_is_in_its_queues_slot(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.enqueue_unique(
        [
            msg("s", "s1", unique=UniqueKey("a"), concurrency=ConcurrencyLimit("c", 1)),
            msg("s", "s2", concurrency=ConcurrencyLimit("c", 1), rate=RateLimit("r", 60.0)),
            msg("s", "s3", rate=RateLimit("r", 60.0)),
        ]
    )
    broker.fetch(["s"], 3, lease=30, wait=0)  # s1 leased, s2 parked, s3 waits for its slot
    names = backend.keys()
    keys = [k for k in names if ":{s}:" in k]
    suffixes = {k.split(":{s}:", 1)[1] for k in keys}
    assert {"unique", "limits", "aside", "u:a", "c:c", "w:c", "r:r"} <= suffixes
    assert set(lua.DERIVED_KEY_SUFFIXES) <= suffixes
    assert len({keyslot(k.encode()) for k in keys}) == 1


# -- unique keys never get stuck -------------------------------------------------------------


def test_a_key_whose_holder_was_removed_behind_the_scripts_back_is_free(
    backend: Backend, broker: RedisBroker
) -> None:
    key = UniqueKey("stuck")
    broker.enqueue_unique([msg("x", "x1", unique=key)])
    assert broker.enqueue_unique([msg("x", "x2", unique=key)]) == ["x1"]
    backend.client.hdel(ids_key(backend.prefix), "x1")  # say, a hand-made cleanup
    assert broker.enqueue_unique([msg("x", "x3", unique=key)]) == [None]
    assert backend.client.get(queue_base(backend, "x") + "u:stuck") == b"x3"
    # A key whose holder's unique record is gone (a path that forgot to release) is free too.
    backend.client.hdel(queue_base(backend, "x") + "unique", "x3")
    assert broker.enqueue_unique([msg("x", "x4", unique=key)]) == [None]
    # And one whose holder id was reused by a plain job in the same queue.
    ack_all(broker, broker.fetch(["x"], 10, lease=30, wait=0))
    backend.client.set(queue_base(backend, "x") + "u:stuck", "x5")
    broker.enqueue([msg("x", "x5")])
    assert broker.enqueue_unique([msg("x", "x6", unique=key)]) == [None]


# -- schedules across brokers ----------------------------------------------------------------


def test_two_brokers_racing_one_tick_from_many_threads_fire_it_once(backend: Backend) -> None:
    brokers = [backend.broker(), backend.broker()]
    rounds, threads = 20, 8
    wins: list[tuple[int, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def race(n: int) -> None:
        broker = brokers[n % 2]
        last: float | None = None
        for tick in range(1, rounds + 1):
            barrier.wait()
            message = msg("sched", f"tick-{tick}-{n}")
            if broker.fire_schedule("beat", float(tick), last, message):
                with lock:
                    wins.append((tick, message.id))
            barrier.wait()
            last = broker.schedule_fires(["beat"])["beat"]

    workers = [threading.Thread(target=race, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(tick for tick, _ in wins) == list(range(1, rounds + 1)), "each tick once"
    [stats] = brokers[0].stats(["sched"])
    assert stats.ready == rounds, "exactly one job per tick"
    assert backend.client.hgetall(schedules_key(backend.prefix)) == {b"beat": repr(20.0).encode()}
    for broker in brokers:
        broker.close()


def test_a_schedule_record_is_the_repr_of_the_tick_compared_as_text(
    backend: Backend, broker: RedisBroker
) -> None:
    tick = 1_733_323_000.25 + 2**-21  # no six-digit decimal is this float
    assert broker.fire_schedule("s", tick, None, None)
    assert backend.client.hget(schedules_key(backend.prefix), "s") == repr(tick).encode()
    assert broker.schedule_fires() == {"s": tick}
    assert not broker.fire_schedule("s", tick + 1, round(tick, 6), None), "exact, not close"
    assert broker.fire_schedule("s", tick + 1, tick, msg("q", "j", eta=time.time() + 60))
    [stats] = broker.stats()
    assert (stats.queue, stats.delayed) == ("q", 1), "the queue is registered by the same script"


# -- set-asides and the wake-up signal -------------------------------------------------------


def test_a_fetch_that_only_sets_jobs_aside_leaves_no_ready_signal(
    backend: Backend, broker: RedisBroker
) -> None:
    permits = ConcurrencyLimit("one", 1)
    broker.enqueue([msg("w", f"w{n}", concurrency=permits) for n in range(5)])
    [running] = broker.fetch(["w"], 1, lease=30, wait=0)
    signal = queue_base(backend, "w") + "signal"
    assert broker.fetch(["w"], 4, lease=30, wait=0) == []
    assert backend.client.zscore(signal, "ready") is None, "parked jobs left ready empty"
    assert backend.client.zcard(queue_base(backend, "w") + "ready") == 0
    assert backend.client.lrange(queue_base(backend, "w") + "w:one", 0, -1) == [
        b"w1",
        b"w2",
        b"w3",
        b"w4",
    ]
    assert broker.job_state("w1").status is JobStatus.QUEUED  # type: ignore[union-attr]
    ack_all(broker, [running])
    assert backend.client.zscore(signal, "ready") is not None, "the woken job signals"
    assert backend.client.smembers(queue_base(backend, "w") + "c:one") == {b"w1"}, "reserved for it"
    assert [d.id for d in broker.fetch(["w"], 4, lease=30, wait=0)] == ["w1"]


def test_a_worker_blocked_on_parked_jobs_sleeps_until_a_permit_comes_back(
    real_backend: Backend,
) -> None:
    kw = real_backend.client.get_connection_kwargs()
    client, counter = counting_client(f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}")
    try:
        broker = RedisBroker(client, prefix=real_backend.prefix)
        other = real_backend.broker()
        permits = ConcurrencyLimit("one", 1)
        broker.enqueue([msg("b", f"b{n}", concurrency=permits) for n in range(3)])
        [running] = other.fetch(["b"], 1, lease=30, wait=0)
        got: list[Delivery] = []
        counter.reset()
        begin = time.monotonic()
        thread = threading.Thread(
            target=lambda: got.extend(broker.fetch(["b"], 2, lease=30, wait=5))
        )
        thread.start()
        time.sleep(0.6)
        assert not got
        ack_all(other, [running])
        thread.join(5)
        elapsed = time.monotonic() - begin
        assert [d.id for d in got] == ["b1"]
        assert elapsed < 1.5, "woken by the permit given back, not by a timeout"
        scripts = [c for c in counter.commands if c[0] == b"EVALSHA"]
        assert len(scripts) <= 4, f"no busy loop: {len(scripts)} fetches in {elapsed:.2f}s"
        other.close()
    finally:
        client.close()


def test_a_permit_of_an_unreaped_expired_lease_goes_to_one_job_only(
    backend: Backend, clock: Clock
) -> None:
    # reap_batch=1 leaves an expired lease unreaped at the next fetch (as a worker that died
    # holding more than reap_batch leases does): the fetch that prunes it from the permit set
    # wakes the parked job, and must not also hand the same permit to the job it is admitting.
    broker = backend.broker(RedisSettings(reap_batch=1), clock=clock)
    one = ConcurrencyLimit("k", 1)
    broker.enqueue([msg("p", "plain")])
    assert [d.id for d in broker.fetch(["p"], 1, lease=10, wait=0)] == ["plain"]
    broker.enqueue([msg("p", "a", concurrency=one)])
    assert [d.id for d in broker.fetch(["p"], 1, lease=10, wait=0)] == ["a"]
    broker.enqueue([msg("p", "parked", concurrency=one)])
    assert broker.fetch(["p"], 1, lease=10, wait=0) == []
    broker.enqueue([msg("p", "late", concurrency=one)])
    clock.now += 20  # both leases expired; one fetch reaps one of them
    leased = [d.id for d in broker.fetch(["p"], 2, lease=100, wait=0)]
    leased += [d.id for d in broker.fetch(["p"], 2, lease=100, wait=0)]
    running = [
        job
        for job in ("a", "parked", "late")
        if broker.job_state(job).status is JobStatus.RUNNING  # type: ignore[union-attr]
    ]
    assert len(running) == 1, (leased, running)
    assert "parked" in running, "the permit went to the job that waited longest"


def test_a_rate_set_aside_gives_the_fetch_its_due_time(backend: Backend, clock: Clock) -> None:
    broker = backend.broker(clock=clock)
    rate = RateLimit("slow", interval=10.0)
    broker.enqueue([msg("t", "t1", rate=rate), msg("t", "t2", rate=rate)])
    [first] = broker.fetch(["t"], 2, lease=300, wait=0)
    assert first.id == "t1"
    assert broker.job_state("t2").status is JobStatus.SCHEDULED  # type: ignore[union-attr]
    meta = backend.client.hget(queue_base(backend, "t") + "meta", "t2")
    assert meta is not None
    assert meta.decode().endswith("|Lg"), meta
    assert backend.client.zscore(queue_base(backend, "t") + "delayed", "t2") == clock.now + 10
    clock.now += 10
    [second] = broker.fetch(["t"], 2, lease=300, wait=0)
    assert second.id == "t2", "its granted slot is not counted again"
    meta = backend.client.hget(queue_base(backend, "t") + "meta", "t2")
    assert meta is not None
    assert meta.decode().endswith("|L"), "g is used up at its lease"


def test_cancelling_set_aside_jobs_leaves_nothing_behind(
    backend: Backend, broker: RedisBroker
) -> None:
    permits, rate = ConcurrencyLimit("c", 1), RateLimit("r", 3600.0)
    broker.enqueue(
        [
            msg("c", "c1", concurrency=permits),
            msg("c", "c2", concurrency=permits),
            msg("c", "c3", rate=rate),
            msg("c", "c4", rate=rate),
        ]
    )
    running = broker.fetch(["c"], 4, lease=30, wait=0)
    assert [d.id for d in running] == ["c1", "c3"]  # c2 parked, c4 waits an hour for its slot
    [stats] = broker.stats(["c"])
    assert (stats.ready, stats.delayed) == (1, 1)
    assert broker.cancel("c2") is CancelOutcome.REMOVED
    assert broker.cancel("c4") is CancelOutcome.REMOVED
    b = queue_base(backend, "c")
    assert not backend.client.exists(b + "w:c", b + "aside")
    assert set(backend.client.hkeys(b + "limits")) == {b"c1", b"c3"}
    ack_all(broker, running)
    ack_all(broker, broker.fetch(["c"], 4, lease=30, wait=0))
    assert broker.stats(["c"])[0].ready == 0
    backend.client.delete(b + "r:r")  # an hour-long TAT; the rest must be gone already
    assert leftovers(backend) == set()


# -- the plain path stays as it was ----------------------------------------------------------


@pytest.fixture
def counted(real_backend: Backend) -> Iterator[tuple[redis.Redis, Any]]:
    kw = real_backend.client.get_connection_kwargs()
    client, counter = counting_client(f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}")
    yield client, counter
    client.close()


def test_plain_jobs_keep_five_field_meta_and_make_no_derived_keys(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.enqueue([msg("p", "p1")])
    broker.enqueue([msg("p", f"b{n}") for n in range(3)])
    b = queue_base(backend, "p")
    metas = [v.decode() for v in backend.client.hvals(b + "meta")]
    assert all(len(m.split("|")) == 5 for m in metas), metas
    deliveries = broker.fetch(["p"], 4, lease=30, wait=0)
    assert all(len(v.split(b"|")) == 5 for v in backend.client.hvals(b + "meta"))
    broker.settle([Settlement(deliveries[0], Outcome.RETRY)])
    broker.release(deliveries[1:2])
    broker.settle([Settlement(deliveries[2], Outcome.DEAD, reason="x")])
    assert all(len(v.split(b"|")) == 5 for v in backend.client.hvals(b + "meta"))
    keys = backend.keys()
    names = {k.split(":{p}:", 1)[1] for k in keys if ":{p}:" in k}
    assert not names & {*lua.DERIVED_KEY_SUFFIXES}
    assert not any(n[:2] in ("u:", "r:", "c:", "w:") for n in names)


def test_plain_enqueues_send_the_arguments_they_always_sent(
    counted: tuple[redis.Redis, Any], real_backend: Backend
) -> None:
    client, counter = counted
    broker = RedisBroker(client, prefix=real_backend.prefix)
    broker.enqueue([msg("a", "a0")])  # the queue's first enqueue registers it
    counter.reset()
    broker.enqueue([msg("a", "a1")])
    broker.enqueue([msg("a", f"m{n}") for n in range(3)])
    broker.enqueue([msg("a", "u1", unique=UniqueKey("k"))])
    broker.enqueue([msg("a", "m9"), msg("a", "l1", concurrency=ConcurrencyLimit("c", 1))])
    scripts = [c for c in counter.commands if c[0] == b"EVALSHA"]
    argc = [len(c) - 3 - int(c[2]) for c in scripts]
    # a plain job alone (enqueue_one): queue, id, body, score; then enqueue's clock, queue,
    # register, n, then 5 per job; 2 more per job once one is unique or limited
    assert argc == [4, 4 + 5 * 3, 4 + 7, 4 + 7 * 2]
    assert int(scripts[0][2]) == 6, "enqueue_one: five of the queue's keys and the index"
    assert all(int(c[2]) == 12 for c in scripts[1:]), "the queue's keys, the index, the registry"
