"""The production worker runtime on real Redis: `worq worker` processes, a supervisor, chaos.

Every process is started by the test and signalled by its own pid; a private redis-server is
used where connections get cut, so other test runs sharing the main server are never touched.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from redis_support import RedisServer, Runtime, children, stop

from worq_core import JobFailed, JobStatus, WorkerSettings, Worq

HERE = Path(__file__).parent


@pytest.mark.timeout(180)
def test_chaos_sigkill_a_worker_every_second_and_lose_nothing(runtime: Runtime) -> None:
    total, processes, concurrency = 5000, 3, 4
    app = runtime.app()
    app.tasks["chaos"].enqueue_many([(n,) for n in range(total)])
    supervisor = runtime.worker(
        "--processes",
        str(processes),
        "--concurrency",
        str(concurrency),
        "--queues",
        "chaos",
        "--lease",
        "2",
        "--grace",
        "5",
    )
    kills = 0
    deadline = time.monotonic() + 120
    while len(set(runtime.ledger("ledger"))) < total:
        assert time.monotonic() < deadline, "the jobs did not all run"
        assert supervisor.poll() is None, supervisor.communicate()[1][-3000:]
        time.sleep(1.0)  # the chaos schedule: one SIGKILL a second
        workers = children(supervisor.pid)
        if workers and len(set(runtime.ledger("ledger"))) < total:
            os.kill(workers[kills % len(workers)], signal.SIGKILL)
            kills += 1
    while True:  # the jobs in flight at the last kill come back when their leases run out
        [stats] = app.broker.stats(["chaos"])
        if stats.ready == stats.delayed == stats.running == 0:
            break
        assert time.monotonic() < deadline, f"jobs left behind: {stats}"
        time.sleep(0.1)
    log = stop(supervisor)
    assert supervisor.returncode == 0, log[-3000:]
    ledger = runtime.ledger("ledger")
    assert {int(n) for n in ledger} == set(range(total)), "every job ran at least once"
    assert stats.dead == 0
    duplicates = len(ledger) - total
    print(f"\nchaos: {total} jobs, {kills} SIGKILLs, {duplicates} duplicate executions")
    assert kills >= 1
    # Only the leases a killed worker held run again: concurrency + prefetch at most.
    assert duplicates <= kills * (concurrency + WorkerSettings().prefetch)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefetch", [0, 4])
def test_a_sigkill_reruns_at_most_concurrency_plus_prefetch_jobs(
    runtime: Runtime, prefetch: int
) -> None:
    total = 3000
    app = runtime.app()
    app.tasks["tally"].enqueue_many([(n,) for n in range(total)])
    options = ("--queues", "tally", "--concurrency", "1", "--lease", "1")
    first = runtime.worker(*options, "--prefetch", str(prefetch))
    deadline = time.monotonic() + 60
    while len(runtime.ledger("tally")) < total // 4:
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the worker did not get going"
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=10)
    [at_kill] = app.broker.stats(["tally"])
    assert at_kill.running <= 1 + prefetch, "the dead worker held at most 1 + prefetch leases"
    second = runtime.worker(*options)
    while True:
        [stats] = app.broker.stats(["tally"])
        if stats.ready == stats.delayed == stats.running == 0:
            break
        assert time.monotonic() < deadline, f"jobs left behind: {stats}"
        time.sleep(0.05)
    log = stop(second)
    assert second.returncode == 0, log[-3000:]
    ledger = [int(n) for n in runtime.ledger("tally")]
    assert set(ledger) == set(range(total)), "every job ran"
    print(
        f"\nprefetch {prefetch}: {at_kill.running} leases at the kill, {len(ledger) - total} reruns"
    )
    # What ran twice had finished in the first worker without its ack reaching Redis.
    assert len(ledger) - total <= at_kill.running


def test_sigterm_lets_the_running_job_finish_and_the_supervisor_exit_zero(
    runtime: Runtime,
) -> None:
    app = runtime.app()
    job = app.tasks["long"].enqueue(1.5)
    supervisor = runtime.worker("--processes", "2", "--queues", "runtime", "--lease", "5")
    assert runtime.wait_for("events").startswith(b"started:")
    log = stop(supervisor)
    assert supervisor.returncode == 0, log[-3000:]
    assert job.result(timeout=0) == "finished"
    assert "finishing in-flight jobs" in log


def test_a_task_that_segfaults_its_process_is_retried_then_dead_lettered(
    runtime: Runtime,
) -> None:
    app = runtime.app()
    job = app.tasks["segfault"].enqueue()
    ok = app.tasks["work"].enqueue(7)
    supervisor = runtime.worker(
        "--queues", "runtime", "--lease", "1", "--processes", "1", "--max-jobs-per-process", "1000"
    )
    with pytest.raises(JobFailed) as failed:
        job.result(timeout=30)
    assert failed.value.error_type == "worq.AttemptsExhausted"
    assert len(runtime.ledger("events")) == 2, "max_retries=1: two runs, both crashed"
    assert ok.result(timeout=10) == 7
    log = stop(supervisor)
    assert supervisor.returncode == 0, log[-3000:]
    assert log.count("died (signal 11)") == 2


def test_workers_are_replaced_after_max_jobs_and_every_job_still_runs_once(
    runtime: Runtime,
) -> None:
    app = runtime.app()
    jobs = app.tasks["whoami"].enqueue_many([(n,) for n in range(35)])
    proc = runtime.worker(
        "--queues", "runtime", "--max-jobs-per-process", "10", "--burst", "--concurrency", "2"
    )
    _, log = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    pids = [job.result(timeout=0) for job in jobs]
    assert len(runtime.ledger("pids")) == 35
    assert len(set(pids)) == 4, "10 + 10 + 10 + 5 jobs"
    assert log.count("retired; starting a successor") == 3


@pytest.mark.timeout(120)
def test_workers_reconnect_after_redis_cuts_every_connection(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=False)
    try:
        server.start()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    runtime = Runtime(server.url)
    try:
        app = runtime.app()
        jobs = app.tasks["work"].enqueue_many([(n,) for n in range(400)])
        supervisor = runtime.worker(
            "--processes", "2", "--queues", "runtime", "--lease", "3", "--concurrency", "2"
        )
        admin = redis.Redis.from_url(server.url)
        for _ in range(3):
            time.sleep(0.3)  # let work be under way, then cut everything
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
        assert [job.result(timeout=60) for job in jobs] == list(range(400))
        log = stop(supervisor)
        assert supervisor.returncode == 0, log[-3000:]
        assert app.tasks["work"].enqueue(1).status() is JobStatus.QUEUED
    finally:
        runtime.cleanup()
        server.kill()


def hold_the_gil(seconds: float) -> None:
    """Run C code that never releases the GIL for at least about ``seconds`` (sum over a range).

    Calibrated on the fastest of three short sums, so a machine busy while it calibrates makes
    the hold longer, never shorter.
    """
    chunk = 1_000_000
    per_item = float("inf")
    for _ in range(3):
        begin = time.perf_counter()
        sum(range(chunk))
        per_item = min(per_item, (time.perf_counter() - begin) / chunk)
    sum(range(int(seconds / per_item)))  # one call: no bytecode boundary to switch threads at


@pytest.mark.parametrize("isolated", [True, False], ids=["lease-keeper-process", "thread"])
def test_a_task_holding_the_gil_keeps_its_lease_only_with_the_lease_keeper_process(
    runtime: Runtime, isolated: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from worq_core import Worker, WorkerSettings, current_job
    from worq_core.testing.support import running
    from worq_redis import RedisBroker, RedisStorage

    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(RedisBroker(runtime.url), storage=RedisStorage(runtime.url))
    runs: list[int] = []

    @app.task(name="hog", queue="gil")
    def hog() -> str:
        runs.append(current_job().attempt)
        if current_job().attempt == 1:
            hold_the_gil(2.5)  # three leases long, no heartbeat thread can run meanwhile
        return "done"

    settings = WorkerSettings(
        queues=("gil",),
        concurrency=1,
        lease=0.8,
        heartbeat=0.2,
        idle_wait=0.1,
        handle_signals=False,
        isolated_heartbeat=isolated,
        broker_factory=functools.partial(RedisBroker, runtime.url),  # built again in the keeper
    )

    @app.task(name="warm", queue="gil")
    def warm() -> None:
        return None

    worker = Worker(app, settings)
    with running(worker):
        # The keeper starts with the worker's first jobs: the hog comes once it renews (a job
        # taken before that is renewed by it too, if it is ready within the lease; this one is
        # short).
        assert warm.enqueue().result(timeout=30) is None
        deadline = time.monotonic() + 30
        while isolated and not any("separate process" in m for m in caplog.messages):
            assert time.monotonic() < deadline, "the lease keeper never became ready"
            time.sleep(0.02)
        job = hog.enqueue()
        assert job.result(timeout=10) == "done"
        deadline = time.monotonic() + 10
        while not isolated and len(runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the stale first run ends after the second one stored its result
    if isolated:
        assert runs == [1], "the lease keeper process renewed the lease: one run"
        assert worker.counters.refused == 0
    else:
        assert runs == [1, 2], "the starved thread let the lease expire: the job ran again"
