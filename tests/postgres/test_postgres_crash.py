"""Crashes: worker processes SIGKILLed mid-job, and a PostgreSQL restarted mid-run.

Real processes and real servers. SIGKILL goes to our own children, by pid; the private
PostgreSQL is a throwaway cluster (initdb) on a loopback port of ours, stopped by its pid file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pg_support import drop_schema, new_schema, with_schema

from worq_core import BrokerConnectionError, JobStatus, Worq
from worq_core.testing.support import eventually, running
from worq_core.worker import WorkerSettings
from worq_postgres import migrate

HERE = Path(__file__).parent
# The loopback ports these tests may use, shifted by WORQ_TEST_PORT_OFFSET so two test runs on one
# machine can use disjoint ones.
_OFFSET = int(os.environ.get("WORQ_TEST_PORT_OFFSET", "0"))
PORTS = range(55432 + _OFFSET, 55440 + _OFFSET)
BIN = Path(os.environ.get("WORQ_TEST_PG_BIN", "/usr/local/bin"))


@pytest.fixture
def app_url(pg_base_url: str) -> Iterator[str]:
    schema = new_schema()
    url = with_schema(pg_base_url, schema)
    migrate(url)
    with psycopg.connect(pg_base_url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".runs (tag text, pid integer)')
    yield url
    drop_schema(pg_base_url, schema)


def runs(url: str) -> dict[str, set[int]]:
    """Which processes ran each tag."""
    schema = url.rpartition("schema=")[2]
    with psycopg.connect(url.split("?")[0]) as conn:
        rows = conn.execute(f'SELECT tag, pid FROM "{schema}".runs').fetchall()
    ran: dict[str, set[int]] = {}
    for tag, pid in rows:
        ran.setdefault(tag, set()).add(pid)
    return ran


def spawn_worker(url: str, lease: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, WORQ_PG_APP_URL=url)
    command = [sys.executable, "-m", "worq_core", "worker", "pg_app:app", "--queues", "pg-app"]
    command += ["--concurrency", "4", "--lease", str(lease)]
    return subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL)


def test_jobs_running_in_a_sigkilled_worker_run_again_elsewhere_and_none_is_lost(
    app_url: str,
) -> None:
    os.environ["WORQ_PG_APP_URL"] = app_url
    sys.modules.pop("pg_app", None)
    import pg_app

    jobs = [pg_app.record.enqueue(f"job-{n}", 0.3) for n in range(24)]
    victim = spawn_worker(app_url, lease=1.0)
    survivor = None
    try:
        eventually(lambda: len(runs(app_url)) >= 4, timeout=30, what="the victim to start jobs")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        killed_in = {tag for tag, pids in runs(app_url).items() if victim.pid in pids}
        survivor = spawn_worker(app_url, lease=1.0)
        results = [job.result(timeout=60) for job in jobs]
    finally:
        for proc in (victim, survivor):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        pg_app.app.close()
    assert results == [f"job-{n}" for n in range(24)], "every job finished with its own result"
    ran = runs(app_url)
    assert set(ran) == {f"job-{n}" for n in range(24)}
    unfinished = {tag for tag in killed_in if not ran[tag] <= {victim.pid}}
    assert unfinished, "the jobs the victim was running ran again in the survivor"
    assert all(survivor is not None and survivor.pid in ran[tag] for tag in unfinished)
    assert all(job.status() is JobStatus.SUCCEEDED for job in jobs)


# -- a private PostgreSQL restarted mid-run ----------------------------------------------------


def _free_port(after: int = 0) -> int:
    for port in PORTS:
        if port <= after:
            continue
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    pytest.skip(f"no free port among {PORTS.start}-{PORTS.stop - 1}")


class PrivateServer:
    """A throwaway cluster: initdb, pg_ctl start/stop. Runs as the postgres user under root."""

    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            message = f"no initdb in {BIN}; set WORQ_TEST_PG_BIN"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="worq-pg-"))
        self.data = self.root / "data"
        os.chmod(self.root, 0o777)  # the postgres user writes its cluster and log here
        self._run(BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *command: object) -> None:
        args = [str(c) for c in command]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            args = ["runuser", "-u", "postgres", "--", *args]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{args[-1]} failed ({done.returncode}): {done.stdout}{done.stderr}\nlog: {tail}"
            )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            BIN / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "log", "-w", "start"
        )

    def first_start(self) -> None:
        """Start on a free port of ours; another one if that port was taken in the meantime."""
        for _ in range(3):
            try:
                self.start()
                return
            except RuntimeError as exc:
                if "already in use" not in str(exc):
                    raise
                self.port = _free_port(after=self.port)

    def stop(self, mode: str = "fast") -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def cleanup(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    try:
        server.first_start()
        yield server
    finally:
        server.cleanup()


def test_a_postgresql_restarted_mid_run_loses_no_job(server: PrivateServer) -> None:
    url = f"{server.url}?schema=worq"
    migrate(url)
    app = Worq(url)
    done: set[int] = set()
    lock = threading.Lock()
    queue = f"restart-{uuid.uuid4().hex[:6]}"

    @app.task(queue=queue, max_retries=10)
    def work(n: int) -> int:
        time.sleep(0.02)  # a little work, so that the restart lands while jobs are in flight
        with lock:
            done.add(n)
        return n

    def enqueue_retrying(n: int) -> None:
        """A producer retries what an outage refused (idempotent: the same job id)."""

        def sent() -> bool:
            try:
                work.options(job_id=f"work-{n}").enqueue(n)
            except BrokerConnectionError:
                return False
            return True

        eventually(sent, timeout=30, what=f"job {n} to be enqueued")

    for n in range(100):
        enqueue_retrying(n)
    settings = WorkerSettings(queues=(queue,), concurrency=4, lease=2.0, handle_signals=False)
    try:
        with running(app.worker(settings=settings)):
            eventually(lambda: len(done) >= 10, timeout=30, what="the worker to get going")
            server.stop("immediate")  # a crash: no shutdown checkpoint, WAL recovery on start
            with lock:
                before = len(done)
            assert before < 100, "the restart came mid-run"
            server.start()
            for n in range(100, 150):
                enqueue_retrying(n)
            eventually(lambda: len(done) == 150, timeout=60, what="every job to run")
            jobs = [app.job(f"work-{n}") for n in range(150)]
            assert [job.result(timeout=30) for job in jobs] == list(range(150))
    finally:
        app.close()
