"""``worq demo``: thousands of real jobs through an in-memory broker and worker, in one process.

:func:`run_demo` registers four tasks on a fresh ``Worq("memory://")`` app:

* ``demo.add``: a fast sync task;
* ``demo.square``: an ``async def`` task;
* ``demo.flaky``: fails on its first attempt about one time in five, then succeeds on retry;
* ``demo.doomed``: always fails; its one job is retried twice and then dead-lettered.

It enqueues the jobs with ``enqueue_many``, runs a worker in a background thread in burst mode
while the calling thread draws a progress bar from the worker's counters, checks a sample of
results with :meth:`Job.result`, and returns a :class:`DemoSummary`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from worq_core.app import Worq
from worq_core.errors import JobFailed, UnknownPluginError, WorqError
from worq_core.job import Job
from worq_core.retry import RetryPolicy
from worq_core.worker import Worker, WorkerSettings

FLAKY_FAILURE_RATE = 0.2
SAMPLE_PER_TASK = 50
RESULT_TIMEOUT = 10.0
FAST_RETRY = RetryPolicy(base=0.01, factor=2.0, max_delay=0.05, jitter=True)


class DemoError(WorqError):
    """The demo could not run (worq-memory missing) or its worker stopped early."""


class FlakyError(Exception):
    """The transient failure ``demo.flaky`` raises on some first attempts."""


class DoomedError(Exception):
    """The failure ``demo.doomed`` raises on every attempt."""


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What a demo run did."""

    jobs: int
    """Jobs enqueued."""
    succeeded: int
    """Jobs that finished with a result."""
    retried: int
    """Failed attempts that were scheduled for a retry."""
    dead: int
    """Jobs dead-lettered (one, on purpose)."""
    enqueue_seconds: float
    """Time to enqueue every job."""
    elapsed: float
    """Time from the worker's start until it had processed every job and stopped."""
    verified: int
    """Sampled jobs whose result (or error) was checked and right."""
    mismatches: int
    """Sampled jobs whose result (or error) was wrong; 0 in a healthy run."""

    @property
    def jobs_per_second(self) -> float:
        """Jobs processed per second of :attr:`elapsed`."""
        return self.jobs / self.elapsed if self.elapsed > 0 else float("inf")


@dataclass(slots=True)
class _Check:
    """A sampled job and how to tell whether its outcome is right."""

    job: Job[Any]
    expected: Any
    fails: bool = False


def _demo_app(seed: int | None) -> tuple[Worq, Callable[[int], list[_Check]]]:
    """A fresh in-memory app with the demo tasks, and a function that enqueues ``n`` jobs."""
    app = Worq("memory://")
    try:
        app.broker  # noqa: B018 - resolve the memory:// plugin now, to fail with a clear message
    except UnknownPluginError as exc:
        raise DemoError("worq demo needs the in-memory broker: pip install worq-memory") from exc

    rng = random.Random(seed)
    lock = threading.Lock()
    attempted: set[int] = set()

    @app.task(name="demo.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="demo.square")
    async def square(n: int) -> int:
        await asyncio.sleep(0)
        return n * n

    @app.task(name="demo.flaky", max_retries=5, retry=FAST_RETRY)
    def flaky(n: int) -> int:
        # Only a first attempt may fail, so every flaky job succeeds on its first retry.
        with lock:
            first = n not in attempted
            attempted.add(n)
            fail = first and rng.random() < FLAKY_FAILURE_RATE
        if fail:
            raise FlakyError(f"transient failure of job {n}; the retry will succeed")
        return n

    @app.task(name="demo.doomed", max_retries=2, retry=FAST_RETRY)
    def doomed() -> None:
        raise DoomedError("this job always fails, to show the dead-letter queue")

    def enqueue(total: int) -> list[_Check]:
        rest = total - 1
        n_add = rest * 4 // 10
        n_square = rest * 3 // 10
        n_flaky = rest - n_add - n_square
        checks: list[_Check] = []
        add_jobs = add.enqueue_many([(i, i) for i in range(n_add)])
        checks += [_Check(add_jobs[i], 2 * i) for i in _sample(n_add)]
        square_jobs = square.enqueue_many([(i,) for i in range(n_square)])
        checks += [_Check(square_jobs[i], i * i) for i in _sample(n_square)]
        flaky_jobs = flaky.enqueue_many([(i,) for i in range(n_flaky)])
        checks += [_Check(flaky_jobs[i], i) for i in _sample(n_flaky)]
        checks.append(_Check(doomed.enqueue(), None, fails=True))
        return checks

    return app, enqueue


def _sample(count: int) -> Sequence[int]:
    """Up to :data:`SAMPLE_PER_TASK` indexes spread evenly over ``range(count)``."""
    step = max(1, count // SAMPLE_PER_TASK)
    return range(0, count, step)[:SAMPLE_PER_TASK]


@contextmanager
def _quiet_worker_logs() -> Iterator[None]:
    """Keep the worker's per-retry warnings off the terminal while the progress bar runs."""
    logger = logging.getLogger("worq")
    handler = logging.NullHandler()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


def _run_worker(worker: Worker, total: int, console: Console | None) -> None:
    """Run ``worker`` in burst mode on a background thread; draw progress on this one."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run(burst=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="worq-demo-worker", daemon=True)
    thread.start()
    try:
        if console is None:
            thread.join()
        else:
            columns = (
                TextColumn("[bold]processing"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as progress:
                bar = progress.add_task("jobs", total=total)
                while thread.is_alive():
                    thread.join(0.05)  # the refresh period of the bar, not a synchronisation
                    counters = worker.counters
                    progress.update(bar, completed=counters.succeeded + counters.dead)
                progress.update(bar, completed=total - _left(worker.app))
    except KeyboardInterrupt:
        worker.stop()
        worker.stop()  # the second stop hands unfinished jobs back at once
        thread.join()
        raise
    if errors:
        raise errors[0]


def _left(app: Worq) -> int:
    """Jobs not finished yet: ready, delayed or running in the demo's queue."""
    (stats,) = app.broker.stats(["default"])
    return stats.ready + stats.delayed + stats.running


def _verify(checks: Sequence[_Check]) -> tuple[int, int]:
    """Check each sampled job's outcome; returns ``(verified, mismatches)``."""
    verified = mismatches = 0
    for check in checks:
        try:
            value = check.job.result(timeout=RESULT_TIMEOUT)
        except JobFailed as failed:
            ok = check.fails and failed.error_type.endswith("DoomedError")
        else:
            ok = not check.fails and value == check.expected
        verified += ok
        mismatches += not ok
    return verified, mismatches


def run_demo(
    jobs: int = 5000,
    concurrency: int = 8,
    console: Console | None = None,
    *,
    seed: int | None = None,
) -> DemoSummary:
    """Enqueue ``jobs`` jobs on a fresh in-memory app, process them, and summarise the run.

    With a ``console``, shows a live progress bar and ends with a summary table; without one it
    prints nothing. ``seed`` makes the flaky task's failures (and so ``retried``) repeatable.
    Runs the worker on a background thread (it installs no signal handlers); Ctrl-C stops it.

    Raises :class:`DemoError` if worq-memory is not installed or the worker stopped before every
    job was processed.
    """
    if jobs < 1 or concurrency < 1:
        raise ValueError("jobs and concurrency must be at least 1")
    app, enqueue = _demo_app(seed)
    try:
        if console is not None:
            console.print(
                f"[bold]worq demo[/bold]: {jobs:,} jobs across {len(app.tasks)} tasks on "
                f"memory://, concurrency {concurrency}"
            )
        started = time.perf_counter()
        checks = enqueue(jobs)
        enqueued = time.perf_counter()
        settings = WorkerSettings(
            queues=("default",),
            concurrency=concurrency,
            handle_signals=False,
            idle_wait=0.05,  # burst mode notices an empty queue within this
        )
        worker = app.worker(settings=settings)
        with _quiet_worker_logs():
            _run_worker(worker, jobs, console)
        finished = time.perf_counter()
        # Completion comes from the broker, not the worker's counters: they are progress only.
        left = _left(app)
        if left:
            raise DemoError(f"the worker stopped with {left} of {jobs} jobs unfinished")
        dead = app.broker.stats(["default"])[0].dead
        verified, mismatches = _verify(checks)
        summary = DemoSummary(
            jobs=jobs,
            succeeded=jobs - dead,
            retried=worker.counters.retried,
            dead=dead,
            enqueue_seconds=enqueued - started,
            elapsed=finished - enqueued,
            verified=verified,
            mismatches=mismatches,
        )
    finally:
        app.close()
    if console is not None:
        console.print(summary_table(summary))
    return summary


def summary_table(summary: DemoSummary) -> Table:
    """The demo's closing table."""
    table = Table(title="worq demo summary", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note", style="dim")
    table.add_row("jobs", f"{summary.jobs:,}", f"enqueued in {summary.enqueue_seconds:.2f}s")
    table.add_row("done", f"{summary.succeeded:,}", "finished with a result")
    table.add_row("retried", f"{summary.retried:,}", "failed attempts that were retried")
    table.add_row("dead", f"[red]{summary.dead:,}[/red]", "dead-lettered (demo.doomed, on purpose)")
    table.add_row("elapsed", f"{summary.elapsed:.2f}s", "worker start to finish")
    table.add_row("jobs/s", f"{summary.jobs_per_second:,.0f}", "")
    checked = f"{summary.verified} results checked"
    if summary.mismatches:
        table.add_row("wrong", f"[red]{summary.mismatches}[/red]", checked)
    else:
        table.add_row("verified", f"{summary.verified}", f"{checked}, all right")
    return table


__all__ = ["DemoError", "DemoSummary", "run_demo", "summary_table"]
