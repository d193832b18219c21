"""worq_core.testing.in_memory: an app on a fresh memory broker, drained by the test itself."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from worq_core import JobFailed, JobStatus, RetryPolicy, TaskError, Worq, current_job
from worq_core.testing import Drainer, in_memory

ROOT = Path(__file__).resolve().parents[2]


def make_app(broker: str = "memory://", storage: str | None = None) -> Worq:
    app = Worq(broker, storage=storage)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="fan_out")
    def fan_out(n: int) -> int:
        add.enqueue_many([(i, i) for i in range(n)])
        return n

    @app.task(name="flaky", max_retries=2, retry=RetryPolicy(base=0.01))
    def flaky() -> int:
        if current_job().attempt < 3:
            raise ConnectionError("not yet")
        return current_job().attempt

    @app.task(name="broken", max_retries=1, retry=RetryPolicy(base=0.01))
    def broken() -> None:
        raise ValueError("always")

    @app.task(name="elsewhere", queue="other")
    def elsewhere() -> str:
        return "other"

    return app


def test_drain_runs_every_queued_job_and_returns_how_many_ran() -> None:
    app = make_app()
    with in_memory(app) as worker:
        assert isinstance(worker, Drainer)
        jobs = [app.get_task("add").enqueue(i, 1) for i in range(5)]
        assert worker.drain() == 5
        assert [job.result(timeout=0) for job in jobs] == [1, 2, 3, 4, 5]
        assert worker.drain() == 0  # nothing left: returns at once


def test_drain_runs_the_jobs_that_jobs_enqueue_and_waits_for_delayed_ones() -> None:
    app = make_app()
    fan_out = app.get_task("fan_out")
    add = app.get_task("add")
    with in_memory(app) as worker:
        parent = fan_out.enqueue(3)
        later = add.options(delay=0.2).enqueue(20, 22)
        assert worker.drain() == 5
        assert parent.result(timeout=0) == 3
        assert later.result(timeout=0) == 42


def test_drain_counts_each_attempt_of_retried_and_dead_jobs() -> None:
    app = make_app()
    with in_memory(app) as worker:
        third_time = app.get_task("flaky").enqueue()
        doomed = app.get_task("broken").enqueue()
        assert worker.drain() == 3 + 2
        assert third_time.result(timeout=0) == 3
        assert doomed.status() is JobStatus.DEAD
        with pytest.raises(JobFailed, match="always"):
            doomed.result(timeout=0)


def test_drain_takes_only_the_queues_given() -> None:
    app = make_app()
    with in_memory(app, concurrency=4) as worker:
        other = app.get_task("elsewhere").enqueue()
        mine = app.get_task("add").enqueue(1, 1)
        assert worker.drain(["default"]) == 1
        assert mine.result(timeout=0) == 2
        assert other.status() is JobStatus.QUEUED
        assert worker.drain() == 1  # the default: every queue the app's tasks declare
        assert other.result(timeout=0) == "other"


def test_drain_raises_timeout_error_when_the_queues_do_not_empty_in_time() -> None:
    app = make_app()
    with in_memory(app) as worker:
        add = app.get_task("add")
        done = add.enqueue(1, 2)
        stuck = add.options(delay=3600).enqueue(3, 4)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"still held jobs after 0\.3s"):
            worker.drain(timeout=0.3)
        assert time.monotonic() - started < 10
        assert done.result(timeout=0) == 3
        assert stuck.status() is JobStatus.SCHEDULED  # still there for a later drain


def test_each_block_starts_empty_and_the_app_gets_its_own_broker_back() -> None:
    app = make_app("redis://127.0.0.1:1/0", storage="redis://127.0.0.1:1/1")  # never reached
    before = repr(app)
    add = app.get_task("add")
    with in_memory(app):
        assert app.broker.name == "memory"
        assert app.storage.name == "memory"
        add.enqueue(1, 1)  # left undrained on purpose
    assert repr(app) == before
    assert app._storage_spec == "redis://127.0.0.1:1/1"
    assert "broker" not in app.__dict__  # closed, nothing cached
    assert "storage" not in app.__dict__
    with in_memory(app) as worker:
        assert worker.drain() == 0


def test_an_app_whose_broker_was_used_is_refused() -> None:
    app = make_app()
    assert app.broker.name == "memory"
    refused = pytest.raises(TaskError, match="before the app's broker or storage is used")
    with refused, in_memory(app):
        pass  # pragma: no cover
    assert app.broker.name == "memory"  # untouched


def test_the_testing_example_passes_as_a_user_would_run_it() -> None:
    example = ROOT / "examples" / "testing"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout, done.stdout
