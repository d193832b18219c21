"""Redis Cluster: worq-core's conformance suite on a real three-master cluster, and the errors.

The cluster (three masters, one replica each) is started by the module's fixture on loopback
ports 17050-17055 (bus ports 27050-27055, no other test uses them), and stopped by pid.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from ha_support import HOST, PORT_OFFSET, ClusterSet, wait_until
from redis_support import keyslot, new_prefix

from worq_core import BrokerError, Capability, Worq
from worq_core.models import Message, Outcome, Settlement
from worq_core.testing import BrokerContract, StorageContract, WorkerContract
from worq_redis import (
    ClusterNotSupported,
    RedisBroker,
    RedisClusterBroker,
    RedisSettings,
    RedisStorage,
    UnsupportedClient,
)

BASE = 17050 + PORT_OFFSET


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    try:
        servers = ClusterSet(tmp_path_factory.mktemp("cluster"), BASE)
    except (RuntimeError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot start the Redis Cluster under CI: {exc}")
        pytest.skip(f"cannot start the Redis Cluster: {exc}")
    yield servers
    servers.stop()


def delete_prefix(client: redis.RedisCluster, prefix: str) -> None:
    """Delete the prefix's keys on every master (key by key: they live in many slots)."""
    for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
        client.delete(key)


@pytest.fixture
def cluster_client(cluster: ClusterSet) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster(HOST, cluster.ports[0])
    yield client
    client.close()


class ClusterBackend:
    @pytest.fixture
    def prefix(self, cluster_client: redis.RedisCluster) -> Iterator[str]:
        prefix = new_prefix()
        yield prefix
        delete_prefix(cluster_client, prefix)

    @pytest.fixture
    def broker(self, cluster: ClusterSet, prefix: str) -> Iterator[RedisClusterBroker]:
        broker = RedisClusterBroker(f"{cluster.url}?prefix={prefix}")
        yield broker
        broker.close()

    @pytest.fixture
    def retaining_broker(
        self, cluster: ClusterSet, prefix: str
    ) -> Iterator[Callable[[int, float], RedisClusterBroker]]:
        made: list[RedisClusterBroker] = []

        def make(max_count: int, max_age: float) -> RedisClusterBroker:
            settings = RedisSettings(dead_max_count=max_count, dead_max_age=max_age)
            made.append(RedisClusterBroker(f"{cluster.url}?prefix={prefix}", settings))
            return made[-1]

        yield make
        for broker in made:
            broker.close()

    @pytest.fixture
    def storage(self, cluster: ClusterSet, prefix: str) -> Iterator[RedisStorage]:
        storage = RedisStorage(f"{cluster.url}?prefix={prefix}")
        yield storage
        storage.close()


class TestClusterBroker(ClusterBackend, BrokerContract):
    pass


class TestClusterStorage(ClusterBackend, StorageContract):
    pass


class TestClusterWorker(ClusterBackend, WorkerContract):
    """Whole jobs through a worker: the storage writes results, then the broker settles."""

    def test_the_worker_saves_results_itself(
        self, broker: RedisClusterBroker, storage: RedisStorage
    ) -> None:
        assert not broker.stores_results_in(storage)


def test_queues_spread_over_the_masters_and_each_script_stays_in_its_slot(
    cluster: ClusterSet, cluster_client: redis.RedisCluster
) -> None:
    prefix = new_prefix()
    broker = RedisClusterBroker(cluster_client, prefix=prefix)
    queues = [f"q{n}" for n in range(12)]
    try:
        assert broker.enqueue([Message(id=f"j{q}", queue=q, body=b"x") for q in queues]) == [
            True
        ] * len(queues)
        got = broker.fetch(queues, 100, lease=30, wait=0)
        assert sorted(d.id for d in got) == sorted(f"j{q}" for q in queues)
        assert broker.settle([Settlement(d, Outcome.ACK) for d in got]) == [True] * len(got)
        masters = {cluster_client.get_node_from_key(f"{prefix}:{{{q}}}:seq").port for q in queues}
        assert len(masters) == 3, "twelve queues land on all three masters"
        # Every key of a queue (the id index too) is in the queue's slot.
        for key in cluster_client.scan_iter(match=f"{prefix}:{{*"):
            name = key.decode()
            queue = name.split("{", 1)[1].split("}", 1)[0]
            assert keyslot(key) == keyslot(f"{prefix}:{{{queue}}}".encode())
    finally:
        delete_prefix(cluster_client, prefix)
        broker.close()


def test_each_queue_keeps_its_own_id_index_checked_before_an_enqueue(
    cluster: ClusterSet, cluster_client: redis.RedisCluster
) -> None:
    prefix = new_prefix()
    broker = RedisClusterBroker(f"{cluster.url}?prefix={prefix}")
    other = RedisClusterBroker(f"{cluster.url}?prefix={prefix}")  # knows the queues by registry
    try:
        assert broker.enqueue([Message(id="same", queue="a", body=b"1")]) == [True]
        assert cluster_client.hget(f"{prefix}:{{a}}:ids", "same") == b"a"
        assert not cluster_client.exists(f"{prefix}:ids"), "no index outside the queues' slots"
        assert other.enqueue([Message(id="same", queue="b", body=b"2")]) == [False]
        assert other.enqueue([Message(id="new", queue="b", body=b"3")]) == [True]
        state = other.job_state("same")
        assert state is not None
        assert state.queue == "a"
        [got] = broker.fetch(["a"], 1, lease=30, wait=0)
        assert broker.settle([Settlement(got, Outcome.ACK)]) == [True]
        assert other.enqueue([Message(id="same", queue="b", body=b"4")]) == [True], "freed"
    finally:
        delete_prefix(cluster_client, prefix)
        broker.close()
        other.close()


def test_the_cluster_url_picks_the_cluster_broker(cluster: ClusterSet) -> None:
    prefix = new_prefix()
    app = Worq(f"{cluster.url}?prefix={prefix}")
    assert isinstance(app.broker, RedisClusterBroker)
    assert isinstance(app.storage, RedisStorage)
    assert not app.broker_stores_results
    assert Capability.WORKFLOWS not in app.broker.capabilities
    app.broker.close()
    app.storage.close()


def test_unsupported_clients_get_a_typed_error_naming_what_is_supported(
    cluster: ClusterSet, cluster_client: redis.RedisCluster
) -> None:
    with pytest.raises(ClusterNotSupported, match="RedisClusterBroker"):
        RedisBroker(cluster_client)
    with pytest.raises(ClusterNotSupported, match=r"redis\+cluster://"):
        RedisBroker(cluster.url)
    with pytest.raises(UnsupportedClient, match=r"redis\.RedisCluster client"):
        RedisClusterBroker(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"redis\+cluster://"):
        RedisClusterBroker(f"redis://{HOST}:{cluster.ports[0]}/0")


def _migrate_slot(client: redis.RedisCluster, key: str, per_call: int = 2) -> tuple[int, int]:
    """Move the slot of ``key`` to another master, as ``redis-cli --cluster reshard`` does.

    IMPORTING on the target, MIGRATING on the source, ``MIGRATE`` of its keys a few at a time
    (meanwhile the source answers ``ASK`` for keys already moved and ``TRYAGAIN`` for calls
    whose keys are split between the two), then ``SETSLOT ... NODE`` on every master
    (``MOVED`` from then on). Returns the source and target ports.
    """
    slot = client.keyslot(key)
    source = client.get_node_from_key(key)
    nodes = client.get_primaries()
    target = next(n for n in nodes if n.port != source.port)
    src = redis.Redis(source.host, source.port)
    dst = redis.Redis(target.host, target.port)
    try:
        src_id = src.execute_command("CLUSTER MYID").decode()
        dst_id = dst.execute_command("CLUSTER MYID").decode()
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while True:
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, per_call)
            if not keys:
                break
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            time.sleep(0.05)  # let the workers run against the half-moved slot for a while
        for node in nodes:
            other = redis.Redis(node.host, node.port)
            other.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            other.close()
    finally:
        src.close()
        dst.close()
    return source.port, target.port


def test_a_queue_whose_slot_migrates_during_a_run_loses_nothing(
    cluster: ClusterSet, cluster_client: redis.RedisCluster
) -> None:
    """Producers and a worker keep going through ASK, TRYAGAIN and then MOVED replies.

    While the queue's keys are split between two masters, a script naming keys on both is
    refused (``TRYAGAIN``) until they meet again; redis-py retries it a few times, and a call
    still refused raises ``BrokerError``, which the loops here ride out as a worker does (and
    retry the same settlements or batch, which nothing applied).
    """
    prefix = new_prefix()
    broker = RedisClusterBroker(f"{cluster.url}?prefix={prefix}")
    total = 3000
    ran: list[str] = []
    errors: list[BaseException] = []
    refused: list[BrokerError] = []
    stop = threading.Event()

    def work() -> None:
        pending: list[Settlement] = []
        try:
            while not stop.is_set() or pending:
                try:
                    _, got = broker.settle_and_fetch(pending, ["mig"], 20, lease=60, wait=0.05)
                except BrokerError as exc:
                    refused.append(exc)
                    continue
                ran.extend(d.id for d in got)
                pending = [Settlement(d, Outcome.ACK) for d in got]
                if stop.is_set() and not got:
                    broker.settle(pending)
                    pending = []
        except BaseException as exc:  # noqa: BLE001 - the test asserts there were none
            errors.append(exc)

    def produce(start: int) -> None:
        try:
            for n in range(start, start + total // 2, 10):
                batch = [Message(id=f"m{i}", queue="mig", body=b"x") for i in range(n, n + 10)]
                while True:
                    try:
                        assert broker.enqueue(batch) == [True] * 10
                        break
                    except BrokerError as exc:
                        refused.append(exc)
        except BaseException as exc:  # noqa: BLE001 - the test asserts there were none
            errors.append(exc)

    try:
        produce(0)  # half before the move
        worker = threading.Thread(target=work)
        producer = threading.Thread(target=produce, args=(total // 2,))
        worker.start()
        producer.start()
        source, target = _migrate_slot(cluster_client, f"{prefix}:{{mig}}:ready")
        producer.join(60)
        deadline = time.monotonic() + 60
        while len(set(ran)) < total and not errors and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker thread drains the queue; nothing to block on here
        stop.set()
        worker.join(30)
        assert not errors, errors
        print(f"\nslot {source}->{target}: {len(refused)} calls refused (TRYAGAIN) and retried")
        assert all("TRYAGAIN" in str(exc) or "ASK" in str(exc) for exc in refused), refused[:3]
        fresh = redis.RedisCluster(HOST, cluster.ports[0])
        assert fresh.get_node_from_key(f"{prefix}:{{mig}}:ready").port == target
        fresh.close()
        owner: Any = broker.client  # the broker's own client followed MOVED to the new owner
        assert owner.get_node_from_key(f"{prefix}:{{mig}}:ready").port == target
        assert source != target
        assert sorted(set(ran)) == sorted(f"m{i}" for i in range(total)), "nothing lost"
        assert len(ran) == total, "nothing ran twice (the leases never ran out)"
        stats = broker.stats(["mig"])[0]
        assert (stats.ready, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)
    finally:
        stop.set()
        delete_prefix(cluster_client, prefix)
        broker.close()


FAILOVER_BASE = 17070 + PORT_OFFSET


@pytest.mark.timeout(180)
def test_a_master_killed_and_replaced_keeps_every_enqueue_wait_replicas_acknowledged(
    tmp_path: Path,
) -> None:
    """A cluster of its own (ports 17070-17075): the queue's master is SIGKILLed mid-run.

    Its replica takes over (``cluster-node-timeout`` 2 s); the killed node is started again
    and rejoins as the new master's replica, so ``WAIT 1`` can be answered again. Every
    enqueue that returned is then on the new master.
    """
    servers = ClusterSet(tmp_path, FAILOVER_BASE)
    prefix = new_prefix()
    broker = RedisClusterBroker(f"{servers.url}?prefix={prefix}", wait_replicas=1)
    key = f"{prefix}:{{fo}}:ready"
    try:
        probe = redis.RedisCluster(HOST, servers.ports[0])
        victim = probe.get_node_from_key(key).port
        probe.close()
        acknowledged: list[int] = []
        retried = 0
        deadline = time.monotonic() + 90
        for n in range(2000):
            if n == 600:
                servers.server(victim).kill()
                wait_until(lambda: _owner(servers, key, victim) != victim, 30, "a new master")
                servers.restart(victim)
            while True:
                assert time.monotonic() < deadline, f"enqueue {n} never got through"
                try:
                    broker.enqueue([Message(id=f"f{n}", queue="fo", body=b"x")])
                    break
                except BrokerError:  # no master yet, or no replica confirmed: the same id again
                    retried += 1
                    time.sleep(0.05)
            acknowledged.append(n)
        print(f"\ncluster failover: {len(acknowledged)} acknowledged, {retried} calls retried")
        seen: set[str] = set()
        while True:
            got = broker.fetch(["fo"], 500, lease=60, wait=0)
            if not got:
                break
            seen.update(d.id for d in got)
        assert seen == {f"f{n}" for n in acknowledged}, "every acknowledged enqueue survived"
    finally:
        broker.close()
        servers.stop()


def _owner(servers: ClusterSet, key: str, skip: int) -> int:
    """The port of the master that serves ``key`` now, asking a node other than ``skip``."""
    port = next(p for p in servers.ports if p != skip)
    client = redis.RedisCluster(HOST, port)
    try:
        return int(client.get_node_from_key(key).port)
    except redis.RedisError:
        return skip
    finally:
        client.close()


def test_wait_replicas_waits_on_the_master_each_write_went_to(
    cluster: ClusterSet, cluster_client: redis.RedisCluster
) -> None:
    prefix = new_prefix()
    query = f"prefix={prefix}&wait_replicas=1"
    broker = RedisClusterBroker(f"{cluster.url}?{query}")
    storage = RedisStorage(f"{cluster.url}?{query}")

    def waits(key: str) -> int:
        node = cluster_client.get_node_from_key(key)
        direct = redis.Redis(node.host, node.port)
        try:
            stats = direct.info("commandstats").get("cmdstat_wait", {"calls": 0})
            return int(stats["calls"])
        finally:
            direct.close()

    queue_key, record_key = f"{prefix}:{{w}}:ready", f"{prefix}:res:{{j1}}"
    try:
        # Warm up: a node that lacks a script (NOSCRIPT) gets it and the call and WAIT again.
        broker.enqueue([Message(id="j0", queue="w", body=b"x")])
        broker.settle(
            [Settlement(d, Outcome.ACK) for d in broker.fetch(["w"], 1, lease=30, wait=0)]
        )
        storage.save({"j1": b"warm"}, 60)
        before = waits(queue_key)
        assert broker.enqueue([Message(id="j1", queue="w", body=b"x")]) == [True]
        assert waits(queue_key) == before + 1
        [got] = broker.fetch(["w"], 1, lease=30, wait=0)
        assert broker.settle([Settlement(got, Outcome.ACK)]) == [True]
        assert waits(queue_key) == before + 2
        before = waits(record_key)
        storage.save({"j1": b"r"}, 60)
        assert waits(record_key) == before + 1
        assert storage.load("j1") == b"r"
    finally:
        delete_prefix(cluster_client, prefix)
        broker.close()
        storage.close()
