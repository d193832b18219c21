"""The lease keeper tells the truth, tested through `worq worker` on real Redis.

It reports lost leases back, so a stale run never writes its result; it stops renewing for a
worker that is frozen (SIGSTOP), so that worker's jobs go elsewhere after one lease.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_support import children, delete_prefix, new_prefix

from worq_core import JobStatus, Worq
from worq_redis import RedisBroker

HERE = Path(__file__).parent
LEASE = "1"


class KeeperRun:
    """One test's prefix, its `worq worker keeper_app:app` process and its ledger."""

    def __init__(self, base_url: str) -> None:
        self.prefix = new_prefix()
        self.url = f"{base_url}?prefix={self.prefix}"
        self.log = f"{self.prefix}:log"
        self.client = redis.Redis.from_url(base_url)
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = ""

    def app(self) -> Worq:
        os.environ["WORQ_KEEPER_URL"] = self.url
        os.environ["WORQ_KEEPER_LOG"] = self.log
        sys.modules.pop("keeper_app", None)
        import keeper_app

        return keeper_app.app

    def start_worker(self) -> subprocess.Popen[str]:
        env = dict(os.environ, WORQ_KEEPER_URL=self.url, WORQ_KEEPER_LOG=self.log)
        options = ["--queues", "keeper", "--concurrency", "1", "--lease", LEASE, "--grace", "5"]
        options += ["--log-level", "info"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worq_core", "worker", "keeper_app:app", *options],
            cwd=HERE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self.proc

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Read the worker's log until a line contains ``text`` (with a deadline)."""
        assert self.proc is not None
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} not logged within {timeout}s:\n{self.stderr[-3000:]}"
            ready, _, _ = select.select([self.proc.stderr], [], [], remaining)
            if ready:
                line = self.proc.stderr.readline()
                assert line, f"the worker exited:\n{self.stderr[-3000:]}"
                self.stderr += line

    def wait_started(self) -> None:
        got = self.client.blpop([f"{self.log}:started"], timeout=20)
        assert got is not None, "the job did not start"

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for child in children(self.proc.pid):
                os.kill(child, signal.SIGKILL)
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.communicate(timeout=15)
        delete_prefix(self.client, self.prefix)
        self.client.close()


@pytest.fixture
def keeper_run(real_redis_url: str) -> Iterator[KeeperRun]:
    run = KeeperRun(real_redis_url)
    yield run
    run.cleanup()


@pytest.mark.timeout(90)
def test_a_lease_lost_under_the_keeper_is_reported_and_the_stale_result_never_stored(
    keeper_run: KeeperRun,
) -> None:
    app = keeper_run.app()
    job = app.tasks["handoff"].enqueue()
    keeper_run.start_worker()
    keeper_run.wait_for_log("leases renewed by a separate process")
    keeper_run.wait_started()
    # Another consumer whose clock runs an hour ahead sees the lease as expired and takes the
    # job over with a token of its own: the worker's lease is now lost.
    thief = RedisBroker(keeper_run.url, clock=lambda: time.time() + 3600)
    [taken] = thief.fetch(["keeper"], 1, lease=3600, wait=0)
    assert taken.id == job.id
    keeper_run.wait_for_log("lease lost")
    keeper_run.client.rpush(f"{keeper_run.log}:go", "1")
    keeper_run.wait_for_log("the result of this run is discarded")
    assert app.storage.load(job.id) is None, "the stale run wrote its result"
    state = app.broker.job_state(job.id)
    assert state is not None
    assert state.status is JobStatus.RUNNING, "still the new owner's"
    thief.close()


@pytest.mark.timeout(90)
def test_the_keeper_stops_renewing_for_a_frozen_worker(keeper_run: KeeperRun) -> None:
    app = keeper_run.app()
    job = app.tasks["handoff"].enqueue()
    proc = keeper_run.start_worker()
    keeper_run.wait_for_log("leases renewed by a separate process")
    keeper_run.wait_started()
    assert children(proc.pid), "the lease keeper runs as the worker's child"
    os.kill(proc.pid, signal.SIGSTOP)  # the worker only; its keeper goes on running
    # With a renewing keeper the job would stay leased for ever; a keeper that notices the
    # frozen worker lets the lease run out, and the job can be fetched again.
    broker = RedisBroker(keeper_run.url)
    deadline = time.monotonic() + 30
    got = []
    while not got and time.monotonic() < deadline:
        got = broker.fetch(["keeper"], 1, lease=60, wait=1.0)
    assert [d.id for d in got] == [job.id], "the frozen worker's lease never ran out"
    assert got[0].attempts == 2
    broker.close()


@pytest.mark.timeout(90)
def test_the_keeper_builds_its_broker_without_importing_the_app(keeper_run: KeeperRun) -> None:
    # Importing the app twice costs its time and memory again, and runs its module-level code
    # (here an RPUSH; in an app, perhaps an enqueue) in a process the user never asked for.
    app = keeper_run.app()
    app.tasks["handoff"].enqueue()
    proc = keeper_run.start_worker()
    keeper_run.wait_for_log("leases renewed by a separate process")
    keeper_run.wait_started()
    imported = {int(pid) for pid in keeper_run.client.lrange(f"{keeper_run.log}:imported", 0, -1)}
    assert imported == {os.getpid(), proc.pid}, f"the worker's children: {children(proc.pid)}"
    keeper_run.client.rpush(f"{keeper_run.log}:go", "1")
