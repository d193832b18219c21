"""Redis Sentinel: URLs and clients, ``wait_replicas``, and a master killed during a run.

Real servers of the tests' own (see ha_support.py): one set for the whole module on ports
17010-17014, and a fresh set per failover run on 17015-17019, each server stopped by its pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from ha_support import HOST, PORT_OFFSET, SERVICE, SentinelSet, wait_until
from redis.sentinel import Sentinel, SentinelConnectionPool
from redis_support import children, delete_prefix, new_prefix

from worq_core import BrokerConnectionError, BrokerError, StorageError, Worq
from worq_core.models import Message, Outcome, Settlement
from worq_core.testing import BrokerContract, StorageContract
from worq_redis import RedisBroker, RedisSettings, RedisStorage, ReplicasBehind, UnsupportedClient

HERE = Path(__file__).parent
SHARED_BASE = 17010 + PORT_OFFSET
FAILOVER_BASE = 17015 + PORT_OFFSET
JOBS = 5000
KILL_AT = 1500


def message(queue: str, job_id: str) -> Message:
    return Message(id=job_id, queue=queue, body=b"x")


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A master, a replica and three sentinels for the module (nothing here kills them)."""
    try:
        servers = SentinelSet(tmp_path_factory.mktemp("sentinel"), SHARED_BASE)
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot start the Sentinel servers under CI: {exc}")
        pytest.skip(f"cannot start the Sentinel servers: {exc}")
    yield servers
    servers.stop()


# -- URLs and clients (no I/O) -----------------------------------------------------------------


def test_a_sentinel_url_builds_a_master_client_without_io() -> None:
    url = (
        "redis+sentinel://me:s%40cret@127.0.0.1:1,[::1]:2,host/mymaster/3"
        "?prefix=app&wait_replicas=2&sentinel_password=sp"
    )
    broker = RedisBroker(url)
    pool = broker.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.is_master
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "s@cret"
    assert pool.connection_kwargs["username"] == "me"
    addresses = [
        (s.get_connection_kwargs()["host"], s.get_connection_kwargs()["port"])
        for s in pool.sentinel_manager.sentinels
    ]
    assert addresses == [("127.0.0.1", 1), ("::1", 2), ("host", 26379)]
    assert all(
        s.get_connection_kwargs()["password"] == "sp" for s in pool.sentinel_manager.sentinels
    )
    assert broker.prefix == "app"
    assert broker.settings.wait_replicas == 2
    assert broker.url == url
    assert "cret" not in repr(broker)
    assert "sp" not in repr(broker).replace("sentinel_password", "")
    broker.close()
    tls = RedisStorage("rediss+sentinel://127.0.0.1:1/m?ssl_cert_reqs=none")
    tls_pool = tls.client.connection_pool
    assert issubclass(tls_pool.connection_class, redis.SSLConnection)
    assert tls_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    tls.close()


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+sentinel://127.0.0.1:1", "names sentinels and a service"),
        ("redis+sentinel:///mymaster", "names sentinels and a service"),
        ("redis+sentinel://127.0.0.1:x/mymaster", "bad sentinel address"),
        ("redis+sentinel://127.0.0.1:1/mymaster/db", "bad database number"),
        ("redis+sentinel://127.0.0.1:1/mymaster?sentinel_pasword=x", "unknown"),
        ("redis://127.0.0.1:1/0?wait_replicas=two", "wait_replicas must be a number"),
        ("redis://127.0.0.1:1/0?wait_replicas=-1", "wait_replicas must be >= 0"),
    ],
)
def test_a_bad_sentinel_url_is_refused_with_a_clear_error(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        RedisBroker(url)


def test_no_sentinel_answering_is_a_connection_error_without_passwords() -> None:
    url = "redis+sentinel://me:pw1@127.0.0.1:1,127.0.0.1:2/m?sentinel_password=pw2"
    broker = RedisBroker(url, RedisSettings(connect_timeout=0.5, retries=0))
    with pytest.raises(BrokerConnectionError) as caught:
        broker.enqueue([message("q", "j")])
    assert "pw1" not in str(caught.value)
    assert "pw2" not in str(caught.value)
    assert "127.0.0.1:1,127.0.0.1:2/m" in str(caught.value)
    broker.close()


def test_an_unsupported_client_type_gets_a_typed_error_naming_what_is_supported() -> None:
    for build in (RedisBroker, RedisStorage):
        with pytest.raises(UnsupportedClient, match=r"redis\+sentinel://.*redis\.Redis client"):
            build(object())  # type: ignore[arg-type]
    assert issubclass(UnsupportedClient, BrokerError)
    assert issubclass(UnsupportedClient, StorageError)
    replica = Sentinel([(HOST, 1)]).slave_for("mymaster")
    with pytest.raises(ValueError, match="master_for"):
        RedisBroker(replica)


def test_wait_replicas_must_leave_room_below_the_socket_timeout() -> None:
    with pytest.raises(ValueError, match="wait_timeout"):
        RedisSettings(wait_replicas=1, wait_timeout=5.0, socket_timeout=5.0)
    RedisSettings(socket_timeout=0.3)  # no wait_replicas: the default wait_timeout is unused


# -- on real servers -----------------------------------------------------------------------------


def test_a_client_from_master_for_is_described_by_its_sentinels(sentinels: SentinelSet) -> None:
    manager = Sentinel([(HOST, port) for port in sentinels.sentinel_ports])
    client = manager.master_for(SERVICE, db=2)
    prefix = new_prefix()
    app = Worq(RedisBroker(client, prefix=prefix))
    try:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        assert broker.url.startswith("redis+sentinel://127.0.0.1:")
        assert broker.url.endswith(f"/{SERVICE}/2")
        # The storage the app builds from the broker's URL reaches the same master and db (it
        # used to be redis://localhost:6379/0, whatever the client talked to).
        storage = app.storage
        assert isinstance(storage, RedisStorage)
        assert broker.stores_results_in(RedisStorage(broker.url, prefix=prefix))
        broker.enqueue([message("q", "j1")])
        [got] = broker.fetch(["q"], 1, lease=30, wait=0)
        broker.settle([Settlement(got, Outcome.ACK, record=b"done", ttl=60)])
        assert RedisStorage(broker.url, prefix=prefix).load("j1") == b"done"
        direct = redis.Redis(HOST, sentinels.master_port, db=2)
        assert direct.get(f"{prefix}:res:{{j1}}") == b"done"
        delete_prefix(direct, prefix)
        direct.close()
    finally:
        client.close()


def test_wait_replicas_raises_when_the_replica_does_not_confirm(sentinels: SentinelSet) -> None:
    prefix = new_prefix()
    settings = RedisSettings(wait_replicas=1, wait_timeout=0.3)
    broker = RedisBroker(sentinels.url(query=f"prefix={prefix}"), settings)
    plain = RedisBroker(sentinels.url(query=f"prefix={prefix}"))
    replica = redis.Redis(HOST, sentinels.replica_port, socket_timeout=5)
    try:
        assert broker.enqueue([message("w", "a")]) == [True]
        # confirmed by the replica before enqueue returned: it is there already
        assert replica.hget(f"{prefix}:ids", "a") == b"w"
        stall = threading.Thread(target=replica.execute_command, args=("DEBUG", "SLEEP", "1.5"))
        stall.start()
        try:
            with pytest.raises(ReplicasBehind, match="only 0 of 1 replicas") as caught:
                broker.enqueue([message("w", "b"), message("w", "c")])
            assert isinstance(caught.value, BrokerError)
            assert plain.enqueue([message("w", "d")]) == [True], "without wait: no waiting"
        finally:
            stall.join()
        # the write stood on the master: enqueueing again adds nothing
        assert broker.enqueue([message("w", "b")]) == [False]
        got = broker.fetch(["w"], 4, lease=30, wait=0)
        assert sorted(d.id for d in got) == ["a", "b", "c", "d"]
        assert broker.settle([Settlement(d, Outcome.ACK) for d in got]) == [True] * 4
        wait_until(lambda: replica.hlen(f"{prefix}:ids") == 0, 5, "the acks on the replica")
    finally:
        master = redis.Redis(HOST, sentinels.master_port)
        delete_prefix(master, prefix)
        master.close()
        replica.close()
        broker.close()
        plain.close()


class SentinelBackend:
    @pytest.fixture
    def ha_prefix(self) -> str:
        return new_prefix()

    @pytest.fixture
    def broker(self, sentinels: SentinelSet, ha_prefix: str) -> Iterator[RedisBroker]:
        broker = RedisBroker(sentinels.url(query=f"prefix={ha_prefix}&wait_replicas=1"))
        yield broker
        delete_prefix(broker.client, broker.prefix)
        broker.close()

    @pytest.fixture
    def retaining_broker(
        self, sentinels: SentinelSet, ha_prefix: str
    ) -> Iterator[Callable[[int, float], RedisBroker]]:
        made: list[RedisBroker] = []

        def make(max_count: int, max_age: float) -> RedisBroker:
            settings = RedisSettings(dead_max_count=max_count, dead_max_age=max_age)
            url = sentinels.url(query=f"prefix={ha_prefix}&wait_replicas=1")
            made.append(RedisBroker(url, settings))
            return made[-1]

        yield make
        for broker in made:
            delete_prefix(broker.client, broker.prefix)
            broker.close()

    @pytest.fixture
    def storage(self, sentinels: SentinelSet, ha_prefix: str) -> Iterator[RedisStorage]:
        storage = RedisStorage(sentinels.url(query=f"prefix={ha_prefix}&wait_replicas=1"))
        yield storage
        delete_prefix(storage.client, storage.prefix)
        storage.close()


class TestSentinelBroker(SentinelBackend, BrokerContract):
    """The conformance suite through Sentinel, every write waiting for the replica."""


class TestSentinelStorage(SentinelBackend, StorageContract):
    pass


# -- failover during a run -----------------------------------------------------------------------


def _failover_run(directory: Path, ledger_url: str, wait_replicas: int) -> dict[str, int]:
    """5,000 jobs, three worker processes, the master SIGKILLed after 1,500 enqueues.

    Returns the counts: enqueues acknowledged, jobs run, runs beyond one, jobs lost (an
    acknowledged job that never ran).
    """
    servers = SentinelSet(directory, FAILOVER_BASE)
    prefix = new_prefix()
    ledger_key = f"{prefix}:ledger"
    query = f"prefix={prefix}" + (f"&wait_replicas={wait_replicas}" if wait_replicas else "")
    url = servers.url(query=query)
    ledger = redis.Redis.from_url(ledger_url)
    env = dict(
        os.environ, WORQ_HA_URL=url, WORQ_HA_LEDGER=ledger_key, WORQ_HA_LEDGER_URL=ledger_url
    )
    options = ["--processes", "3", "--concurrency", "4", "--queues", "ha", "--lease", "2"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "worq_core", "worker", "ha_app:app", *options],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.environ.update(WORQ_HA_URL=url, WORQ_HA_LEDGER=ledger_key, WORQ_HA_LEDGER_URL=ledger_url)
    sys.modules.pop("ha_app", None)
    import ha_app

    acknowledged: list[int] = []
    missing_after_failover = -1
    try:
        deadline = time.monotonic() + 60
        for n in range(JOBS):
            if n == KILL_AT:
                servers.master.kill()
                wait_until(
                    lambda: servers.current_master() == servers.replica_port,
                    30,
                    "the sentinels promoting the replica",
                )
                # A replica again for wait_replicas=1 to count: the old machine comes back.
                servers.bring_back_old_master()
                missing_after_failover = _missing(servers, prefix, ledger, ledger_key, KILL_AT)
            while True:
                assert time.monotonic() < deadline, f"enqueue {n} never got through"
                try:
                    ha_app.ha.options(job_id=f"ha-{n}").enqueue(n)
                    break
                except (BrokerConnectionError, ReplicasBehind):
                    time.sleep(0.05)  # the failover is under way; retry the same id
            acknowledged.append(n)

        def settled() -> bool:
            ran = {int(x) for x in ledger.lrange(ledger_key, 0, -1)}
            if ran >= set(acknowledged):
                return True
            stats = ha_app.app.broker.stats(["ha"])[0]
            return stats.ready + stats.delayed + stats.running == 0

        wait_until(settled, 60, "every acknowledged job run, or nothing left to run")
        runs = [int(x) for x in ledger.lrange(ledger_key, 0, -1)]
        ran = set(runs)
        assert worker.poll() is None, "the workers followed the failover"
        # Every job enqueued after the failover ran: producers and workers reach the new master.
        assert set(range(KILL_AT + 100, JOBS)) <= ran
        lost = sorted(set(acknowledged) - ran)
        if lost:  # what the servers did, to tell a lost write from a wiped server
            stats = ha_app.app.broker.stats(["ha"])[0]
            print(f"\nlost ids {lost[0]}..{lost[-1]}; on the master now: {stats}")
            print(f"missing on the new master right after the failover: {missing_after_failover}")
            print(servers.diagnostics())
        return {
            "acknowledged": len(acknowledged),
            "ran": len(ran),
            "duplicate_runs": len(runs) - len(ran),
            "lost": len(lost),
        }
    finally:
        if worker.poll() is None:
            for child in children(worker.pid):
                os.kill(child, 9)
            os.kill(worker.pid, 9)
        worker.communicate(timeout=15)
        ha_app.app.broker.close()
        servers.stop()
        ledger.delete(ledger_key)
        ledger.close()


def _missing(
    servers: SentinelSet, prefix: str, ledger: redis.Redis, ledger_key: str, enqueued: int
) -> int:
    """Jobs ``ha-0`` .. that the new master lacks and that never ran: lost at the failover."""
    master = redis.Redis(HOST, servers.replica_port)
    try:
        present = master.hmget(f"{prefix}:ids", [f"ha-{n}" for n in range(enqueued)])
    finally:
        master.close()
    # Read after the master: a job acked in between was recorded in the ledger before its ack.
    ran = {int(x) for x in ledger.lrange(ledger_key, 0, -1)}
    return sum(1 for n, there in enumerate(present) if there is None and n not in ran)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_master_killed_mid_run_fails_over_and_wait_replicas_loses_nothing(
    tmp_path: Path, real_redis_url: str, wait_replicas: int
) -> None:
    counts = _failover_run(tmp_path, real_redis_url, wait_replicas)
    print(f"\nfailover, wait_replicas={wait_replicas}: {counts}")
    assert counts["acknowledged"] == JOBS
    if wait_replicas:
        assert counts["lost"] == 0, counts
    assert counts["ran"] + counts["lost"] == JOBS
