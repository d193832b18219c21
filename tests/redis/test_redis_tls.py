"""worq-redis over TLS on real servers: one server, Sentinel and Cluster.

A throwaway CA and server certificate are made with ``openssl``; the servers (TLS only, no plain
port, replication and the cluster bus over TLS too) listen on loopback ports 17080-17089
(cluster bus ports 10000 above; shifted by ``WORQ_TEST_PORT_OFFSET``) and are stopped by pid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ha_support import PORT_OFFSET, ClusterSet, SentinelSet, Server, Tls, _data_args, make_tls
from redis_support import new_prefix

from worq_core import BrokerConnectionError, Worq
from worq_redis import RedisBroker, RedisClusterBroker, RedisStorage

SINGLE, SENTINEL_BASE, CLUSTER_BASE = (port + PORT_OFFSET for port in (17080, 17081, 17086))


def _start_or_skip(start: Callable[[], object], what: str) -> object:
    try:
        return start()
    except (RuntimeError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot start {what} under CI: {exc}")
        pytest.skip(f"cannot start {what}: {exc}")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    made = _start_or_skip(lambda: make_tls(tmp_path_factory.mktemp("tls")), "a test CA")
    assert isinstance(made, Tls)
    return made


def drain_through_a_worker(app: Worq, queues: list[str]) -> None:
    """Enqueue a job per queue, run a burst worker, and check every result came back."""

    @app.task(name="tls.square")
    def square(x: int) -> int:
        return x * x

    jobs = [square.options(queue=queue).enqueue(i) for i, queue in enumerate(queues)]
    app.worker(queues=queues, concurrency=2).run(burst=True)
    assert [job.result(timeout=10) for job in jobs] == [i * i for i in range(len(queues))]


def test_one_server_over_tls_runs_jobs_and_an_untrusted_certificate_is_a_connection_error(
    tls: Tls, tmp_path: Path
) -> None:
    def start() -> Server:
        args = _data_args(SINGLE, tmp_path, tls) + tls.server_args()
        return Server(SINGLE, args, tls)

    server = _start_or_skip(start, "a TLS redis-server")
    assert isinstance(server, Server)
    try:
        prefix = new_prefix()
        app = Worq(f"rediss://127.0.0.1:{SINGLE}/0?{tls.query}&prefix={prefix}")
        assert isinstance(app.broker, RedisBroker)
        drain_through_a_worker(app, ["tls-a", "tls-b"])
        app.close()

        # The system's CAs do not know the test CA: the handshake fails, typed, not a hang.
        untrusted = RedisBroker(f"rediss://127.0.0.1:{SINGLE}/0?prefix={prefix}")
        with pytest.raises(BrokerConnectionError):
            untrusted.stats()
        untrusted.close()
    finally:
        server.kill()


def test_sentinel_over_tls_finds_the_master_and_waits_for_its_replica(
    tls: Tls, tmp_path: Path
) -> None:
    servers = _start_or_skip(lambda: SentinelSet(tmp_path, SENTINEL_BASE, tls), "TLS Sentinel")
    assert isinstance(servers, SentinelSet)
    try:
        prefix = new_prefix()
        app = Worq(servers.url(query=f"prefix={prefix}&wait_replicas=1"))
        assert app.broker.url.startswith("rediss+sentinel://")
        assert isinstance(app.storage, RedisStorage)
        drain_through_a_worker(app, ["tls-a", "tls-b"])
        app.close()
    finally:
        servers.stop()


@pytest.fixture
def tls_cluster(tls: Tls, tmp_path: Path) -> Iterator[ClusterSet]:
    def start() -> ClusterSet:
        return ClusterSet(tmp_path, CLUSTER_BASE, masters=3, replicas=0, tls=tls)

    servers = _start_or_skip(start, "a TLS Redis Cluster")
    assert isinstance(servers, ClusterSet)
    yield servers
    servers.stop()


def test_cluster_over_tls_spreads_queues_and_runs_their_jobs(
    tls: Tls, tls_cluster: ClusterSet
) -> None:
    prefix = new_prefix()
    app = Worq(f"{tls_cluster.url}?{tls.query}&prefix={prefix}")
    assert isinstance(app.broker, RedisClusterBroker)
    queues = [f"tls-{i}" for i in range(6)]
    drain_through_a_worker(app, queues)
    app.close()
