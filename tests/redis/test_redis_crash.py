"""Crashes: worker processes killed mid-job, leases that run out, and a Redis restart.

Real processes and a real server: SIGKILL is sent to our own children by pid, and the private
redis-server is started on a free loopback port and killed by its pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_support import Backend, RedisServer, new_prefix

from worq_core import BrokerConnectionError, JobStatus, Worker, WorkerSettings, Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisSettings, RedisStorage

HERE = Path(__file__).parent
EVENT_WAIT = 15.0


class Workers:
    """Worker subprocesses of one test; whatever is left is killed by pid at the end."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, lease: float, heartbeat: float | None = None) -> subprocess.Popen[str]:
        env = dict(os.environ, WORQ_TEST_URL=self.url, WORQ_TEST_PREFIX=self.prefix)
        env["WORQ_TEST_LEASE"] = str(lease)
        if heartbeat is not None:
            env["WORQ_TEST_HEARTBEAT"] = str(heartbeat)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker_proc.py")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)


@pytest.fixture
def workers(real_backend: Backend) -> Iterator[Workers]:
    kw = real_backend.client.get_connection_kwargs()
    url = f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"
    spawned = Workers(url, real_backend.prefix)
    yield spawned
    spawned.cleanup()


def producer(url: str, prefix: str) -> Worq:
    """The test's side of the app: the same task name and queue as worker_proc.py."""
    app = Worq(
        RedisBroker(url, prefix=prefix),
        storage=RedisStorage(url, prefix=prefix),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )

    @app.task(name="step", queue="crash", max_retries=5)
    def step(tag: str) -> int:  # runs only in worker processes
        raise AssertionError("not run here")

    return app


def next_event(backend: Backend) -> str:
    popped = backend.client.blpop([f"{backend.prefix}:events"], timeout=EVENT_WAIT)
    assert popped is not None, "no event from the worker in time"
    return str(popped[1].decode())


def open_gate(backend: Backend, pid: int, gate: int) -> None:
    backend.client.rpush(f"{backend.prefix}:gate:{pid}:{gate}", "go")


def effects(backend: Backend) -> list[bytes]:
    return list(backend.client.lrange(f"{backend.prefix}:effects", 0, -1))


@pytest.mark.parametrize("kill", ["before_the_side_effect", "after_the_side_effect"])
def test_a_worker_killed_mid_job_loses_nothing(
    real_backend: Backend, workers: Workers, kill: str
) -> None:
    app = producer(workers.url, workers.prefix)
    job = app.tasks["step"].enqueue("t")
    first = workers.spawn(lease=1.0)
    assert next_event(real_backend) == f"start:{first.pid}"
    if kill == "after_the_side_effect":
        open_gate(real_backend, first.pid, 1)
        assert next_event(real_backend) == f"effect:{first.pid}"
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    assert job.status() is JobStatus.RUNNING  # still leased by the dead worker
    second = workers.spawn(lease=1.0)
    assert next_event(real_backend) == f"start:{second.pid}"  # once the lease ran out
    open_gate(real_backend, second.pid, 1)
    open_gate(real_backend, second.pid, 2)
    assert job.result(timeout=EVENT_WAIT) == second.pid
    expected = [b"t"] if kill == "before_the_side_effect" else [b"t", b"t"]
    assert effects(real_backend) == expected  # at-least-once: an effect may happen twice
    os.kill(second.pid, signal.SIGTERM)
    assert second.wait(15) == 0


def test_a_job_whose_lease_expires_while_running_runs_again_and_its_late_ack_is_refused(
    real_backend: Backend, workers: Workers
) -> None:
    app = producer(workers.url, workers.prefix)
    job = app.tasks["step"].enqueue("t")
    slow = workers.spawn(lease=0.5)
    assert next_event(real_backend) == f"start:{slow.pid}"
    os.kill(slow.pid, signal.SIGSTOP)  # frozen (a VM pause, a swap storm): no heartbeat at all
    try:
        healthy = workers.spawn(lease=30.0)
        assert next_event(real_backend) == f"start:{healthy.pid}"  # once the lease ran out
    finally:
        os.kill(slow.pid, signal.SIGCONT)
    open_gate(real_backend, slow.pid, 1)
    open_gate(real_backend, slow.pid, 2)
    assert next_event(real_backend) == f"effect:{slow.pid}"
    os.kill(slow.pid, signal.SIGTERM)  # graceful: it settles what it finished, then exits
    _, stderr = slow.communicate(timeout=15)
    assert slow.returncode == 0, stderr
    # Either the broker refused the late ack, or the worker's heartbeat saw the lost lease first
    # and discarded the run itself; in both cases the stale run writes nothing.
    assert "refused" in stderr or "lease was lost" in stderr, stderr
    assert app.storage.load(job.id) is None, "the stale ack must not write a result"
    assert job.status() is JobStatus.RUNNING
    open_gate(real_backend, healthy.pid, 1)
    open_gate(real_backend, healthy.pid, 2)
    assert job.result(timeout=EVENT_WAIT) == healthy.pid
    assert effects(real_backend) == [b"t", b"t"]


# -- a private redis-server, killed and restarted ----------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    instance = RedisServer(tmp_path)
    try:
        instance.start()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    yield instance
    instance.kill()


def echo_app(url: str, settings: RedisSettings) -> Worq:
    app = Worq(
        RedisBroker(url, settings),
        storage=RedisStorage(url, settings),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )

    @app.task(name="echo", queue="restart")
    def echo(n: int) -> int:
        return n

    return app


def test_a_redis_restart_with_appendonly_loses_no_job(server: RedisServer) -> None:
    settings = RedisSettings(prefix=new_prefix(), socket_timeout=2.0, connect_timeout=1.0)
    app = echo_app(server.url, settings)
    echo = app.tasks["echo"]
    ready = echo.enqueue_many([(n,) for n in range(100)])
    delayed = [echo.options(delay=0.3).enqueue(n) for n in range(100, 110)]
    leased = app.broker.fetch(["restart"], 10, lease=1.0, wait=0)  # a worker that then died
    assert len(leased) == 10
    server.kill()
    server.start()
    worker = Worker(app, WorkerSettings(queues=("restart",), idle_wait=0.1, handle_signals=False))
    worker.run(burst=True)
    assert [job.result(timeout=5) for job in ready + delayed] == list(range(110))
    assert app.broker.stats(["restart"])[0].ready == 0


def test_a_running_worker_rides_out_a_redis_restart(server: RedisServer) -> None:
    settings = RedisSettings(prefix=new_prefix(), socket_timeout=1.0, connect_timeout=0.5)
    app = echo_app(server.url, settings)
    echo = app.tasks["echo"]
    worker = Worker(app, WorkerSettings(queues=("restart",), idle_wait=0.2, handle_signals=False))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        before = echo.enqueue_many([(n,) for n in range(50)])
        assert [job.result(timeout=10) for job in before] == list(range(50))
        server.kill()
        begin = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            echo.enqueue(-1)
        assert time.monotonic() - begin < 5.0, "enqueue must fail fast while Redis is down"
        server.start()
        after = echo.enqueue_many([(n,) for n in range(50, 100)])
        assert [job.result(timeout=20) for job in after] == list(range(50, 100))
        assert [job.result(timeout=1) for job in before] == list(range(50))  # results kept
    finally:
        worker.stop()
        thread.join(20)
    assert not thread.is_alive()


def test_without_persistence_a_restart_loses_the_queue(tmp_path: Path) -> None:
    """What docs/redis.md warns about: Redis without AOF or RDB forgets queued jobs."""
    instance = RedisServer(tmp_path, appendonly=False)
    try:
        instance.start()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        app = echo_app(instance.url, RedisSettings(prefix=new_prefix()))
        app.tasks["echo"].enqueue_many([(n,) for n in range(10)])
        instance.kill()
        instance.start()
        assert app.broker.stats(["restart"])[0].ready == 0
    finally:
        instance.kill()
