"""worq-redis beyond the conformance suite: URLs, errors, retention, slots, round trips.

Job ids across queues, cancel, progress and records written by the scripts are in
``test_redis_job_control.py``.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_support import (
    Backend,
    Clock,
    counting_client,
    delete_prefix,
    keyslot,
    new_prefix,
    queue_base,
)

from worq_core import (
    BrokerConnectionError,
    BrokerError,
    JobStatus,
    StorageConnectionError,
    Worker,
    WorkerSettings,
    Worq,
)
from worq_core.models import CancelOutcome, JobState, LeaseState, Message, Outcome, Settlement
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisSettings, RedisStorage, lua
from worq_redis.connection import redact


def msg(queue: str, job_id: str | None = None, **kwargs: object) -> Message:
    return Message(job_id or uuid.uuid4().hex, queue, b"body", **kwargs)  # type: ignore[arg-type]


# -- construction, URLs and errors -----------------------------------------------------------------


def test_building_from_any_supported_url_does_no_io() -> None:
    for url in (
        "redis://user:secret@127.0.0.1:1/3?prefix=app",
        "rediss://127.0.0.1:1/0",
        "unix:///tmp/no-such.sock?db=2",
    ):
        broker = RedisBroker.from_url(url)
        storage = RedisStorage.from_url(url)
        assert broker.url == url
        broker.close()
        storage.close()
    assert RedisBroker.from_url("redis://h/0?prefix=app").prefix == "app"
    assert RedisBroker("redis://h/0?prefix=app", prefix="mine").prefix == "mine"


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://user:secret@127.0.0.1:1/3?prefix=url&wait_replicas=1", {}),
        # The keyword arguments win over the URL's parameters, and must still in the rebuild.
        ("redis://127.0.0.1:1/3?prefix=url&wait_replicas=1", {"prefix": "kw", "wait_replicas": 0}),
        ("redis+sentinel://127.0.0.1:1,127.0.0.1:2/main/2?prefix=s", {"prefix": "kw"}),
        ("unix:///tmp/no-such.sock?db=2", {}),
    ],
)
def test_a_recipe_rebuilds_the_same_broker_after_pickling(
    url: str, options: dict[str, object]
) -> None:
    settings = RedisSettings(socket_timeout=1.5, dead_max_count=7)
    broker = RedisBroker(url, settings, **options)  # type: ignore[arg-type]
    recipe = broker.recipe()
    assert recipe is not None
    rebuilt = pickle.loads(pickle.dumps(recipe))()
    assert type(rebuilt) is RedisBroker
    assert (rebuilt.url, rebuilt.settings) == (broker.url, broker.settings)
    assert rebuilt.prefix == (options.get("prefix") or broker.prefix)
    broker.close()
    rebuilt.close()


def test_no_recipe_for_a_client_handed_in_a_test_clock_or_a_subclass_of_another_shape() -> None:
    class Named(RedisBroker):
        def __init__(self, name: str) -> None:
            super().__init__(f"redis://127.0.0.1:1/0?prefix={name}")

    class Plain(RedisBroker):
        pass

    client = redis.Redis(port=1)
    assert RedisBroker(client).recipe() is None
    assert RedisBroker("redis://127.0.0.1:1/0", clock=time.time).recipe() is None
    assert Named("n").recipe() is None
    assert Plain("redis://127.0.0.1:1/0").recipe() is not None
    client.close()


def test_the_password_never_appears_in_error_messages() -> None:
    assert redact("redis://user:secret@host:6380/0") == "redis://user:***@host:6380/0"
    assert redact("redis://host/0") == "redis://host/0"


def test_a_client_that_decodes_responses_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisBroker(redis.Redis(decode_responses=True))


def test_prefixes_with_braces_and_empty_queue_names_are_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisSettings(prefix="a{b}")
    broker = RedisBroker("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="queue name"):
        broker.enqueue([msg("")])


def test_enqueue_to_a_closed_port_raises_a_connection_error_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker = RedisBroker(f"redis://user:pw@127.0.0.1:{port}/0")
    begin = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        broker.enqueue([msg("q")])
    assert time.monotonic() - begin < 3.0
    assert "pw" not in str(info.value)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    storage = RedisStorage(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StorageConnectionError):
        storage.load("x")


def test_enqueue_to_a_server_that_never_answers_fails_within_the_socket_timeout() -> None:
    with socket.socket() as listener:  # accepts TCP connections (backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        settings = RedisSettings(socket_timeout=0.3, connect_timeout=0.3, retries=1)
        broker = RedisBroker(f"redis://127.0.0.1:{port}/0", settings)
        begin = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.enqueue([msg("q")])
        assert time.monotonic() - begin < 3.0
        broker.close()


def test_a_script_error_becomes_a_broker_error(backend: Backend) -> None:
    broker = backend.broker()
    backend.client.set(f"{backend.prefix}:{{q}}:ready", "not a zset")
    with pytest.raises(BrokerError) as info:
        broker.enqueue([msg("q")])
    assert not isinstance(info.value, BrokerConnectionError)


# -- scripts survive SCRIPT FLUSH ------------------------------------------------------------------


def test_scripts_are_reloaded_after_script_flush(request: pytest.FixtureRequest) -> None:
    fakeredis = pytest.importorskip("fakeredis")
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())  # SCRIPT FLUSH is server-wide
    broker = RedisBroker(client, prefix=new_prefix())
    broker.enqueue([msg("q"), msg("q")])
    client.script_flush()
    [first] = broker.fetch(["q"], 1, lease=30, wait=0)
    client.script_flush()
    applied, [second] = broker.settle_and_fetch(
        [Settlement(first, Outcome.ACK)], ["q"], 5, lease=30, wait=0
    )
    assert applied == [True]
    client.script_flush()
    broker.enqueue([msg("q", job_id=f"j{i}") for i in range(5)] + [msg("other")])
    assert broker.stats(["q"])[0].ready == 5
    assert second.id != first.id
    storage = RedisStorage(client, prefix=broker.prefix)
    client.script_flush()  # job_status pipelines job_state with a GET: NOSCRIPT is handled too
    running = JobState("q", JobStatus.RUNNING, attempts=1)
    assert broker.job_status(second.id, storage) == (running, None)
    client.script_flush()
    assert broker.job_state(second.id) == running
    client.script_flush()
    assert broker.extend([second], 30, {second.id: b"p"}) == [LeaseState.HELD]
    client.script_flush()
    assert broker.cancel(second.id) is CancelOutcome.REQUESTED


# -- retention and bookkeeping ---------------------------------------------------------------------


def test_the_dead_letter_queue_is_trimmed_by_count_then_by_age(backend: Backend) -> None:
    clock = Clock()
    settings = RedisSettings(prefix=backend.prefix, dead_max_count=3, dead_max_age=60.0)
    broker = RedisBroker(backend.client, settings, clock=clock)
    broker.enqueue([msg("q", job_id=f"j{i}") for i in range(5)])
    for delivery in broker.fetch(["q"], 5, lease=30, wait=0):
        clock.now += 1
        broker.settle([Settlement(delivery, Outcome.DEAD, reason=f"r{delivery.id}")])
    dead = broker.dead_jobs("q")
    assert [d.id for d in dead] == ["j4", "j3", "j2"]
    assert [d.died_at for d in dead] == [clock.now, clock.now - 1, clock.now - 2]
    assert broker.enqueue([msg("q", job_id="j0")]) == [True], "trimmed ids are free again"
    clock.now += 58.5  # j2 is 60.5 s dead, j3 59.5 s
    assert [d.id for d in broker.dead_jobs("q")] == ["j4", "j3"]
    clock.now += 1
    assert [d.id for d in broker.dead_jobs("q")] == ["j4"]
    clock.now += 1
    assert broker.dead_jobs("q") == []
    assert broker.stats(["q"])[0].dead == 0


def test_job_state_sees_due_jobs_and_expired_leases_as_queued(backend: Backend) -> None:
    clock = Clock()
    broker = backend.broker(clock=clock)
    broker.enqueue([msg("q", job_id="late", eta=clock.now + 10), msg("q", job_id="now")])
    [delivery] = broker.fetch(["q"], 1, lease=5, wait=0)
    broker.extend([delivery], 5, {"now": b"half"})
    assert broker.job_state("now") == JobState("q", JobStatus.RUNNING, 1, b"half")
    assert broker.job_state("late") == JobState("q", JobStatus.SCHEDULED)
    clock.now += 5
    assert broker.job_state("now") == JobState("q", JobStatus.QUEUED, 1), "and no progress"
    clock.now += 5
    assert broker.job_state("late") == JobState("q", JobStatus.QUEUED)
    before = backend.snapshot()
    broker.job_state("now")
    assert backend.snapshot() == before, "job_state is read-only"
    assert broker.stats(["q"])[0].ready == 2
    assert broker.reap("q") == 1
    assert broker.extend([delivery], 30) == [LeaseState.LOST]


def test_a_large_batch_is_all_or_nothing_across_chunks_and_queues(backend: Backend) -> None:
    settings = RedisSettings(prefix=backend.prefix, enqueue_chunk=10)
    broker = RedisBroker(backend.client, settings)
    sent = [msg("a") for _ in range(35)] + [msg("b") for _ in range(7)]
    assert broker.enqueue([*sent, sent[0]]) == [True] * 42 + [False]
    assert [(s.queue, s.ready) for s in broker.stats(["a", "b"])] == [("a", 35), ("b", 7)]
    got = broker.fetch(["a"], 100, lease=30, wait=0)
    assert [d.id for d in got] == [m.id for m in sent[:35]]


def test_extend_and_release_span_several_queues(backend: Backend) -> None:
    broker = backend.broker()
    broker.enqueue([msg("a"), msg("b")])
    got = broker.fetch(["a", "b"], 5, lease=30, wait=0)
    assert [d.queue for d in got] == ["a", "b"]
    assert broker.extend(got, 60, {got[1].id: b"b's"}) == [LeaseState.HELD] * 2
    assert broker.job_state(got[1].id) == JobState("b", JobStatus.RUNNING, 1, b"b's")
    broker.release(got)
    assert [(s.ready, s.running) for s in broker.stats(["a", "b"])] == [(1, 0), (1, 0)]


def test_a_worker_id_that_would_break_a_lease_token_is_refused_before_anything_changes(
    backend: Backend,
) -> None:
    broker = backend.broker()
    broker.enqueue([Message("job", "q", b"x")])
    for bad in ("", "host|1"):
        with pytest.raises(ValueError, match="worker id"):
            broker.fetch(["q"], 1, lease=30, wait=0, worker=bad)
        with pytest.raises(ValueError, match="worker id"):
            broker.extend_worker(bad, ["q"], 30)
    assert [d.id for d in broker.fetch(["q"], 1, lease=30, wait=0, worker="host:1:ab")] == ["job"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(worker=st.text(min_size=1, max_size=40).filter(lambda w: "|" not in w))
def test_any_worker_id_without_a_bar_names_its_leases_and_nothing_else(
    real_backend: Backend, worker: str
) -> None:
    broker = real_backend.broker()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    try:
        broker.enqueue([Message(uuid.uuid4().hex, queue, b"x") for _ in range(2)])
        [mine] = broker.fetch([queue], 1, lease=30, wait=0, worker=worker)
        [theirs] = broker.fetch([queue], 1, lease=30, wait=0, worker=worker + "@x")
        assert broker.extend_worker(worker, [queue], 30) == {mine.token: LeaseState.HELD}
        acks = [Settlement(mine, Outcome.ACK), Settlement(theirs, Outcome.ACK)]
        assert broker.settle(acks) == [True, True]
        assert broker.extend_worker(worker, [queue], 30) == {}
        record = f"{queue_base(real_backend, queue)}held:{worker}"
        assert not real_backend.client.exists(record), "the worker's record outlived its leases"
    finally:
        broker.close()


def test_a_workers_record_of_leases_is_gone_once_its_leases_are(backend: Backend) -> None:
    clock = Clock()
    broker = backend.broker(clock=clock)
    broker.enqueue([Message(f"job{n}", "q", b"x") for n in range(3)])
    acked, released, expiring = broker.fetch(["q"], 3, lease=30, wait=0, worker="w1")
    record = f"{queue_base(backend, 'q')}held:w1"
    assert backend.client.hlen(record) == 3
    broker.settle([Settlement(acked, Outcome.ACK)])
    broker.release([released])
    assert backend.client.hkeys(record) == [expiring.id.encode()]
    clock.now += 31  # its lease runs out; the next fetch reaps it
    assert [d.id for d in broker.fetch(["q"], 3, lease=30, wait=0)] == ["job1", "job2"]
    assert not backend.client.exists(record)


def test_acks_settled_together_leave_their_workers_records(real_backend: Backend) -> None:
    # Several plain acks in one call take the batched path of the settle script: each lease must
    # still leave its worker's record, or the keeper renews it for ever.
    broker = real_backend.broker()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    try:
        broker.enqueue([Message(uuid.uuid4().hex, queue, b"x") for _ in range(3)])
        first = broker.fetch([queue], 2, lease=30, wait=0, worker="w1")
        other = broker.fetch([queue], 1, lease=30, wait=0, worker="w2")
        acks = [Settlement(d, Outcome.ACK) for d in first + other]
        assert broker.settle(acks) == [True, True, True]
        base = queue_base(real_backend, queue)
        for worker in ("w1", "w2"):
            assert not real_backend.client.exists(f"{base}held:{worker}"), worker
        assert broker.extend_worker("w1", [queue], 30) == {}
    finally:
        broker.close()


def test_a_settlement_with_follow_ups_and_a_fetch_for_a_worker_do_both(backend: Backend) -> None:
    broker = backend.broker()
    broker.enqueue([Message("first", "q", b"x")])
    [first] = broker.fetch(["q"], 1, lease=30, wait=0, worker="w1")
    following = Message("next", "q", b"y")
    done = Settlement(first, Outcome.ACK, output=b"out", then=(following,))
    applied, [nxt] = broker.settle_and_fetch([done], ["q"], 1, lease=30, wait=0, worker="w1")
    assert (applied, nxt.id) == ([True], "next")
    assert broker.extend_worker("w1", ["q"], 30) == {nxt.token: LeaseState.HELD}


def test_stores_results_only_in_a_storage_on_the_same_server_and_prefix(backend: Backend) -> None:
    broker = backend.broker()
    assert broker.stores_results_in(backend.storage())
    assert not broker.stores_results_in(backend.storage(prefix=new_prefix()))
    assert not broker.stores_results_in(RedisStorage("redis://127.0.0.1:1/0"))


def test_a_stale_ack_writes_no_result(backend: Backend) -> None:
    clock = Clock()
    broker, storage = backend.broker(clock=clock), backend.storage()
    assert broker.stores_results_in(storage)
    broker.enqueue([msg("q", job_id="j")])
    [stale] = broker.fetch(["q"], 1, lease=1, wait=0)
    clock.now += 2
    [current] = broker.fetch(["q"], 1, lease=30, wait=0)
    late = Settlement(stale, Outcome.ACK, record=b"stale", ttl=60)
    assert broker.settle([late]) == [False]
    assert storage.load("j") is None
    assert broker.settle([Settlement(current, Outcome.ACK, record=b"fresh", ttl=60)]) == [True]
    assert storage.load("j") == b"fresh"


def test_a_waiter_in_another_client_wakes_on_the_ack(backend: Backend) -> None:
    broker, storage = backend.broker(), backend.storage()
    assert broker.stores_results_in(storage)
    broker.enqueue([msg("q", job_id="j")])
    [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
    got: list[bytes | None] = []
    armed = threading.Event()

    def wait() -> None:
        armed.set()
        got.append(storage.wait("j", timeout=10))

    thread = threading.Thread(target=wait)
    thread.start()
    armed.wait(5)
    broker.settle([Settlement(delivery, Outcome.ACK, record=b"value", ttl=60)])
    thread.join(10)
    assert got == [b"value"]


# -- Redis Cluster readiness -----------------------------------------------------------------------


def test_every_script_call_keeps_its_queue_keys_in_one_cluster_slot(
    real_backend: Backend,
) -> None:
    url = real_backend.client.get_connection_kwargs()
    client, counter = counting_client(f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}")
    prefix = real_backend.prefix
    try:
        app = Worq(
            RedisBroker(client, prefix=prefix),
            storage=RedisStorage(client, prefix=prefix),
            serializer=MsgpackSerializer(),
            registry=Registry(),
        )

        @app.task(queue="slots", max_retries=1)
        def work(n: int) -> int:
            if n % 3 == 0:
                raise ValueError(n)
            return n

        jobs = work.enqueue_many([(n,) for n in range(30)])
        work.options(delay=0.05).enqueue(1)
        work.enqueue(2)  # a plain job one by one: enqueue_one
        worker = Worker(
            app,
            WorkerSettings(queues=("slots",), concurrency=4, idle_wait=0.05, handle_signals=False),
        )
        worker.run(burst=True)
        assert jobs[1].result(timeout=5) == 1
        broker = app.broker
        broker.stats()
        broker.dead_jobs("slots")
        broker.requeue_dead("slots")
        broker.purge_dead("slots")
        broker.reap("slots")
        broker.job_state(jobs[0].id)
        broker.enqueue([msg("slots", job_id="c1"), msg("slots", job_id="c2", clear_record=True)])
        broker.cancel("c1", b"cancelled", ttl=60)
        [running] = broker.fetch(["slots"], 1, lease=30, wait=0)
        broker.extend([running], 30, {running.id: b"1%"})
        broker.cancel(running.id)
        scripts = [c for c in counter.commands if c[0] in (b"EVALSHA", b"EVAL")]
        ids, registry = f"{prefix}:ids".encode(), f"{prefix}:queues".encode()
        names, one_job = set(), set()
        for command in scripts:
            count = int(command[2])
            keys = command[3 : 3 + count]
            if count == 3:  # a result script: the job's result, marker and wake-up list
                assert len({keyslot(k) for k in keys}) == 1, keys
                continue
            if count == 1:  # job_state: the id index alone (it reads the queue's keys by name)
                assert keys == [ids] or keys == (ids,), keys
                continue
            if count == 6:  # enqueue_one: five keys of the queue, then the id index
                one_job.add(keys[0].rsplit(b":", 1)[-1])
                assert len({keyslot(k) for k in keys[:5]}) == 1, keys
                assert keys[5] == ids
                continue
            queue_keys, shared, rest = keys[:10], keys[10], keys[11:]
            names.add(queue_keys[0].rsplit(b":", 1)[-1])
            assert len({keyslot(k) for k in queue_keys}) == 1, queue_keys
            # the one key every queue shares: Cluster needs a decision here (docs/redis.md)
            assert shared == ids
            if rest[:1] == [registry] or rest[:1] == (registry,):  # enqueue: the queue registry
                rest = rest[1:]
            # results: 3 keys of one job (one slot per job, see docs/redis.md), or the record
            # alone that enqueue deletes (clear_record)
            for key in rest:
                assert key.startswith(f"{prefix}:res:{{".encode()), key
        assert len(scripts) > 30
        assert names == one_job == {b"ready"}
    finally:
        client.close()


def test_the_keyslot_helper_follows_the_cluster_specification() -> None:
    assert keyslot(b"123456789") == 0x31C3  # the CRC16/XMODEM check value
    assert keyslot(b"foo") == 12182
    assert keyslot(b"{user1000}.following") == keyslot(b"{user1000}.followers")
    assert keyslot(b"a{}b") == keyslot(b"a{}b") != keyslot(b"b")  # empty tag: whole key
    assert keyslot(b"worq:{default}:ready") == keyslot(b"default")


# -- round trips -----------------------------------------------------------------------------------


@pytest.fixture
def counted(real_backend: Backend) -> Iterator[tuple[redis.Redis, type, str]]:
    kw = real_backend.client.get_connection_kwargs()
    client, counter = counting_client(f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}")
    client.ping()
    yield client, counter, real_backend.prefix
    client.close()


def test_enqueue_costs_one_round_trip_per_call(counted: tuple[redis.Redis, type, str]) -> None:
    client, counter, prefix = counted
    broker = RedisBroker(client, prefix=prefix)
    counter.reset()
    for _ in range(50):
        broker.enqueue([msg("rt")])
    assert counter.round_trips == 50
    assert [c[0] for c in counter.commands] == [b"EVALSHA"] * 50, "the registry is in the script"
    counter.reset()
    broker.enqueue([msg("rt", clear_record=True)])
    broker.enqueue([msg("rt") for _ in range(1000)])
    assert counter.round_trips == 2


def test_draining_costs_about_one_round_trip_per_job(
    counted: tuple[redis.Redis, type, str],
) -> None:
    client, counter, prefix = counted
    app = Worq(
        RedisBroker(client, prefix=prefix),
        storage=RedisStorage(client, prefix=prefix),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )

    @app.task(queue="rt")
    def noop() -> None:
        return None

    total = 500
    for concurrency in (1, 8):
        noop.enqueue_many([() for _ in range(total)])
        counter.reset()
        Worker(
            app,
            WorkerSettings(
                queues=("rt",), concurrency=concurrency, idle_wait=0.05, handle_signals=False
            ),
        ).run(burst=True)
        per_job = counter.round_trips / total
        # one settle+fetch pipeline per job, plus a few for the burst check at the end
        assert per_job <= 1.1, (concurrency, counter.round_trips)


def test_a_workers_steady_state_is_one_settle_fetch_script_per_round_trip(
    counted: tuple[redis.Redis, type, str],
) -> None:
    client, counter, prefix = counted
    broker = RedisBroker(client, prefix=prefix)
    storage = RedisStorage(client, prefix=prefix)
    assert broker.stores_results_in(storage)
    broker.enqueue([msg("rt") for _ in range(60)])
    [first] = broker.fetch(["rt"], 1, lease=30, wait=0)  # warm up: registry, script cache
    pending = [Settlement(first, Outcome.ACK, record=b"r", ttl=60)]
    counter.reset()
    for _ in range(59):
        applied, got = broker.settle_and_fetch(pending, ["rt"], 1, lease=30, wait=0)
        assert applied == [True]
        pending = [Settlement(d, Outcome.ACK, record=b"r", ttl=60) for d in got]
    assert counter.round_trips == 59
    sha = lua_sha("settle_fetch")
    assert [(c[0], c[1]) for c in counter.commands] == [(b"EVALSHA", sha)] * 59
    assert storage.load(first.id) == b"r"
    # settlements of another queue ride in the same round trip
    broker.enqueue([msg("other")])
    [other] = broker.fetch(["other"], 1, lease=30, wait=0)
    counter.reset()
    applied, _ = broker.settle_and_fetch(
        [*pending, Settlement(other, Outcome.ACK)], ["rt"], 1, lease=30, wait=0
    )
    assert applied == [True, True]
    assert counter.round_trips == 1


def test_job_status_is_one_round_trip_with_a_storage_on_the_same_server(
    counted: tuple[redis.Redis, type, str],
) -> None:
    client, counter, prefix = counted
    app = Worq(
        RedisBroker(client, prefix=prefix),
        storage=RedisStorage(client, prefix=prefix),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )

    @app.task(queue="st")
    def noop() -> None:
        return None

    job = noop.enqueue()
    counter.reset()
    assert job.status() is JobStatus.QUEUED
    assert counter.round_trips == 1
    Worker(app, WorkerSettings(queues=("st",), idle_wait=0.05, handle_signals=False)).run(
        burst=True
    )
    counter.reset()
    assert job.status() is JobStatus.SUCCEEDED
    assert counter.round_trips == 1
    assert app.job("nope").status() is JobStatus.UNKNOWN


def test_extend_job_state_and_job_status_cost_one_round_trip_each(
    counted: tuple[redis.Redis, type, str],
) -> None:
    client, counter, prefix = counted
    broker = RedisBroker(client, prefix=prefix)
    storage = RedisStorage(client, prefix=prefix)
    broker.enqueue([msg("a", job_id="ja"), msg("b", job_id="jb")])
    got = broker.fetch(["a", "b"], 2, lease=30, wait=0)
    broker.settle([Settlement(got[0], Outcome.ACK, record=b"r", ttl=60)])  # warm the cache
    broker.job_status("ja", storage)
    counter.reset()
    assert broker.extend(got[1:], 30, {"jb": b"1%"}) == [LeaseState.HELD]
    assert broker.job_state("jb") == JobState("b", JobStatus.RUNNING, 1, b"1%")
    assert broker.job_status("ja", storage) == (None, b"r")
    assert counter.round_trips == 3
    counter.reset()
    assert broker.cancel("jb") is CancelOutcome.REQUESTED
    assert counter.round_trips == 2, "a lookup of the queue, then the script"


def lua_sha(name: str) -> bytes:
    from worq_redis.connection import SCRIPTS

    return SCRIPTS[name].sha.encode()


# -- nothing grows without bound -------------------------------------------------------------------


def test_after_thousands_of_jobs_only_live_queues_and_results_remain(backend: Backend) -> None:
    app = Worq(
        backend.broker(),
        storage=backend.storage(),
        serializer=MsgpackSerializer(),
        registry=Registry(),
        result_ttl=600,
    )

    @app.task(queue="keys", max_retries=0)
    def work(n: int) -> int:
        if n % 100 == 0:
            raise ValueError("dead on purpose")
        return n

    total = 3000 if backend.kind == "redis" else 600
    jobs = work.enqueue_many([(n,) for n in range(total)])
    Worker(
        app,
        WorkerSettings(queues=("keys",), concurrency=8, idle_wait=0.05, handle_signals=False),
    ).run(burst=True)
    app.broker.purge_dead("keys")
    assert jobs[1].result(timeout=5) == 1
    keys = set(backend.keys())
    results = {k for k in keys if ":res:" in k}
    assert len(results) == total  # successes and dead jobs' errors, each with a TTL
    assert all(0 < backend.client.pttl(k) <= 600_000 for k in list(results)[:200])
    p = backend.prefix
    assert keys - results == {f"{p}:queues", f"{p}:{{keys}}:seq"}


def test_test_prefixes_never_touch_other_keys(real_backend: Backend) -> None:
    other = new_prefix()
    real_backend.client.set(f"{other}:mine", "1")
    try:
        broker = real_backend.broker()
        broker.enqueue([msg("q")])
        delete_prefix(real_backend.client, real_backend.prefix)
        assert real_backend.client.get(f"{other}:mine") == b"1"
    finally:
        real_backend.client.delete(f"{other}:mine")


def test_every_script_is_registered_with_the_lua_module() -> None:
    assert set(lua.QUEUE_SCRIPTS) >= {
        "enqueue",
        "fetch",
        "extend",
        "settle",
        "release",
        "reap",
        "cancel",
    }
    assert set(lua.LOOKUP_SCRIPTS) == {"job_state", "find_job"}


def test_every_script_is_a_lua_file_shipped_in_the_package() -> None:
    from importlib import resources

    folder = resources.files("worq_redis").joinpath("lua")
    names = [
        *lua.QUEUE_SCRIPTS,
        *lua.ONE_JOB_SCRIPTS,
        *lua.SCHEDULE_SCRIPTS,
        *lua.LOOKUP_SCRIPTS,
        *lua.RESULT_SCRIPTS,
        *lua.CLUSTER_SCRIPTS,
    ]
    files = {entry.name for entry in folder.iterdir() if entry.name.endswith(".lua")}
    assert files == {f"{name}.lua" for name in [*names, lua.HELPERS, lua.CLUSTER]}
    for name in [*names, *(f"{n}@cluster" for n in lua.CLUSTER_VARIANTS)]:
        file_name = name.removesuffix("@cluster")
        body = folder.joinpath(f"{file_name}.lua").read_text("utf-8").rstrip("\n")
        source = lua.source(name).rstrip("\n")
        if name.endswith("@cluster"):  # run as a function, with the outbox entries it added
            assert source.endswith(f"{body}\nend return cluster_reply(script_body())")
            assert "local function script_body() " + body.split("\n")[0] in source
        else:
            assert source.endswith(body)
        # every line Redis would report maps back to the same text in a file (the wrapped
        # script's first line ends with its file's first line; its added last line is none)
        for number, line in enumerate(lua.source(name).split("\n")[:-1], start=1):
            file, at = lua.locate(name, f"user_script:{number}").split(":")
            lines = folder.joinpath(file).read_text("utf-8").split("\n")
            if int(at) > len(lines) - 1 and file == f"{file_name}.lua":
                assert line == "end return cluster_reply(script_body())"
                continue
            expected = lines[int(at) - 1]
            assert line in (expected, f"local function script_body() {expected}")


def test_a_script_error_names_the_lua_file_and_line(real_backend: Backend) -> None:
    from importlib import resources

    broker = real_backend.broker()
    broker.enqueue([msg("clobbered")])
    real_backend.client.set(f"{real_backend.prefix}:{{clobbered}}:meta", "not a hash")
    with pytest.raises(BrokerError, match="WRONGTYPE") as caught:
        broker.fetch(["clobbered"], 1, lease=30, wait=0)
    text = str(caught.value)
    assert "user_script" not in text
    file, line = text.rsplit("on @", 1)[1].rstrip(".").split(":")
    source = resources.files("worq_redis").joinpath("lua", file).read_text("utf-8")
    read = source.split("\n")[int(line) - 1]
    assert "HMGET" in read or "K_META" in read, "the line that read the clobbered key"


def test_a_cluster_call_redirected_on_every_attempt_says_so() -> None:
    """redis-py gives up after 16 MOVED, ASK or TRYAGAIN replies with "TTL exhausted."."""
    from redis.exceptions import ClusterError

    from worq_redis.connection import located

    text = located(ClusterError("TTL exhausted."))
    assert "MOVED, ASK or TRYAGAIN" in text
    assert "did not run" in text
    assert located(ClusterError("other")) == "other"


# -- worker registry and the lease keeper's URL ----------------------------------------------------


def test_workers_register_expire_and_unregister(backend: Backend) -> None:
    from worq_core.models import WorkerInfo

    broker = backend.broker()
    now = time.time()
    info = WorkerInfo("w1", "host", 123, now, ("a", "b"), 8, 5, 1, now)
    broker.register_worker(info, ttl=30)
    broker.register_worker(WorkerInfo("w2", "host", 124, now + 1, ("a",), 1, 0, 0, now), ttl=0.01)
    other = RedisBroker(backend.client, prefix=backend.prefix)
    deadline = time.monotonic() + 5
    while len(other.workers()) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # nothing to wait on: a registration's TTL running out
    assert other.workers() == [info]
    broker.unregister_worker("w1")
    assert other.workers() == []
    assert backend.keys() == [], "an empty registry leaves no keys"
