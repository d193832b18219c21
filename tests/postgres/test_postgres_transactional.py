"""Transactional enqueue: a job written on the application's connection exists iff it commits."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from worq_core import JobStatus, Worq
from worq_core.models import Delivery
from worq_core.testing.support import eventually, running
from worq_core.worker import WorkerSettings
from worq_postgres import PostgresBroker, PostgresError


@pytest.fixture
def app(pg_url: str) -> Iterator[Worq]:
    app = Worq(pg_url)
    yield app
    app.close()


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """The application's own connection, with an orders table in the test schema."""
    schema = pg_url.rpartition("schema=")[2]
    with psycopg.connect(pg_url.split("?")[0]) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id integer PRIMARY KEY, total integer)")
        conn.commit()
        yield conn


def queue_name() -> str:
    return f"txn-{uuid.uuid4().hex[:8]}"


def test_a_job_enqueued_in_a_transaction_appears_only_when_it_commits(
    app: Worq, conn: psycopg.Connection[tuple[object, ...]], pg_url: str
) -> None:
    queue = queue_name()
    schema = pg_url.rpartition("schema=")[2]

    @app.task(queue=queue)
    def ship(order: int) -> int:
        with psycopg.connect(pg_url.split("?")[0]) as own:
            row = own.execute(f'SELECT total FROM "{schema}".orders WHERE id = %s', (order,))
            [(total,)] = row.fetchall()  # the order is committed before the job can run
        assert isinstance(total, int)
        return total

    broker = app.broker
    assert isinstance(broker, PostgresBroker)
    woken: list[list[Delivery]] = []
    started = threading.Event()

    def blocked_fetch() -> None:
        started.set()
        woken.append(broker.fetch([queue], 1, lease=30, wait=10))

    conn.execute("INSERT INTO orders VALUES (1, 250)")
    job = ship.options(connection=conn).enqueue(1)
    assert broker.job_state(job.id) is None, "not visible before the commit"
    assert broker.fetch([queue], 1, lease=30, wait=0) == []
    fetcher = threading.Thread(target=blocked_fetch)
    fetcher.start()
    assert started.wait(5)
    conn.commit()
    fetcher.join(10)
    [delivery] = woken[0]
    assert delivery.id == job.id, "the commit's NOTIFY woke the idle fetch"
    broker.release([delivery])
    with running(app.worker(settings=WorkerSettings(queues=(queue,), handle_signals=False))):
        assert job.result(timeout=10) == 250


def test_a_rolled_back_transaction_leaves_no_job(
    app: Worq, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    queue = queue_name()

    @app.task(queue=queue)
    def ship(order: int) -> None: ...

    conn.execute("INSERT INTO orders VALUES (2, 10)")
    job = ship.options(connection=conn, job_id=f"order-2-{queue}").enqueue(2)
    batch = ship.options(connection=conn).enqueue_many([(3,), (4,)])
    conn.rollback()
    assert job.status() is JobStatus.UNKNOWN
    assert all(j.status() is JobStatus.UNKNOWN for j in batch)
    assert app.broker.stats([queue])[0].ready == 0
    assert app.broker.fetch([queue], 10, lease=30, wait=0) == []
    again = ship.options(job_id=f"order-2-{queue}").enqueue(2)
    assert again.status() is JobStatus.QUEUED, "the id was never taken"


def test_a_producer_killed_before_its_commit_leaves_no_job(app: Worq, pg_url: str) -> None:
    job_id = f"crash-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("txn_child.py")), pg_url, job_id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        backend_pid = int(child.stdout.readline())
    finally:
        child.kill()  # SIGKILL: no rollback from the client, the server must see it gone
        child.wait(10)
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as watcher:

        def backend_gone() -> bool:
            query = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
            [(count,)] = watcher.execute(query, (backend_pid,)).fetchall()
            return count == 0

        eventually(backend_gone, timeout=10, what="the server to end the killed session")
    assert app.broker.job_state(job_id) is None
    assert app.broker.fetch(["txn-crash"], 10, lease=30, wait=0) == []


def test_a_connection_the_broker_cannot_use_is_refused(
    app: Worq, pg_base_url: str, pg_url: str
) -> None:
    @app.task(queue=queue_name())
    def ship() -> None: ...

    with pytest.raises(PostgresError, match=r"psycopg\.Connection"):
        ship.options(connection="not a connection").enqueue()
    other = pg_base_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(other) as elsewhere, pytest.raises(PostgresError, match="database"):
        ship.options(connection=elsewhere).enqueue()
