"""Fetching several jobs per round trip: what prefetching promises and what it must not break.

A worker fetches beyond its free slots only while the queues are deep and its jobs short, never
holds more than ``concurrency + prefetch`` leases, hands back prefetched jobs that no slot takes
in time or that a stop finds unstarted, and keeps each worker's jobs in delivery order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worq_core import (
    Delivery,
    ExitReason,
    Settlement,
    WorkerSettings,
    Worq,
    current_job,
)
from worq_core.testing.support import eventually, running
from worq_core.worker import core, prefetch
from worq_core.worker.prefetch import Prefetch
from worq_memory import MemoryBroker, MemoryStorage

QUEUE = "default"


class CountingBroker(MemoryBroker):
    """Counts the worker's broker calls, and the most leases held right after one.

    (The memory broker's ``settle_and_fetch`` settles through ``settle``: one call, counted once.)
    """

    def __init__(self, storage: MemoryStorage | None = None) -> None:
        super().__init__(storage=storage)
        self.calls = 0
        self.most_held = 0
        self._within = threading.local()

    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
    ) -> tuple[list[bool], list[Delivery]]:
        self.calls += 1
        self._within.call = True
        try:
            answer = super().settle_and_fetch(settlements, queues, limit, lease=lease, wait=wait)
        finally:
            self._within.call = False
        [stats] = self.stats([QUEUE])
        self.most_held = max(self.most_held, stats.running)
        return answer

    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        if not getattr(self._within, "call", False):
            self.calls += 1
        return super().settle(settlements)


def settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(**({"idle_wait": 0.05, "handle_signals": False} | overrides))


@pytest.fixture
def run_times_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Size prefetching by depth alone, so that a slow moment of the machine changes nothing."""
    monkeypatch.setattr(prefetch, "WINDOW", 3600.0)


@pytest.fixture
def no_handback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefetched jobs are never handed back for waiting: only a stop can hand them back."""
    monkeypatch.setattr(core, "HANDBACK_AFTER", 3600.0)


# -- the allowance ---------------------------------------------------------------------------

events = st.one_of(
    st.tuples(st.just("fetched"), st.integers(0, 100), st.integers(0, 100)),
    st.tuples(st.just("ran"), st.one_of(st.floats(0, 1e-3), st.floats(0, 10)), st.just(0)),
    st.tuples(st.just("handed_back"), st.just(0), st.just(0)),
)


@given(
    limit=st.integers(0, 64),
    slots=st.integers(1, 32),
    history=st.lists(events, max_size=40),
)
def test_the_allowance_stays_within_its_limit_and_its_time_window(
    limit: int, slots: int, history: list[tuple[str, float, int]]
) -> None:
    sizer = Prefetch(limit, slots)
    for event, first, second in history:
        if event == "fetched":
            sizer.fetched(int(first), min(second, int(first)))
        elif event == "ran":
            sizer.ran(first)
        else:
            sizer.handed_back()
        allowance = sizer.allowance()
        assert 0 <= allowance <= limit
        if allowance:
            assert sizer.run_time is not None
            assert allowance * sizer.run_time <= prefetch.WINDOW * slots * (1 + 1e-9)
        if event == "handed_back" or (event == "fetched" and second < first):
            assert allowance == 0, "a short fetch or a hand-back stops prefetching"


def test_the_allowance_starts_at_nothing_and_doubles_with_each_full_fetch() -> None:
    sizer = Prefetch(16, 1)
    sizer.fetched(1, 1)
    assert sizer.allowance() == 0, "no run timed yet"
    sizer.ran(0.0001)
    grown = []
    for _ in range(6):
        grown.append(sizer.allowance())
        sizer.fetched(1 + grown[-1], 1 + grown[-1])
    assert grown == [1, 2, 4, 8, 16, 16]
    sizer.ran(1.0)  # one long run is felt at once
    assert sizer.allowance() == 0


# -- fewer round trips -----------------------------------------------------------------------


@pytest.mark.usefixtures("run_times_ignored")
@pytest.mark.parametrize(("concurrency", "depth"), [(1, 16), (3, 5), (4, 0)])
def test_a_worker_holds_at_most_concurrency_plus_prefetch_leases(
    concurrency: int, depth: int
) -> None:
    broker = CountingBroker()
    app = Worq(broker)
    done: list[int] = []

    @app.task
    def note(n: int) -> None:
        done.append(n)

    note.enqueue_many([(n,) for n in range(300)])
    worker = app.worker(settings=settings(concurrency=concurrency, prefetch=depth))
    assert worker.run(burst=True) is ExitReason.DRAINED
    assert sorted(done) == list(range(300))
    assert broker.most_held == concurrency + depth, "the bound is reached, never passed"


@pytest.mark.usefixtures("run_times_ignored")
def test_a_deep_queue_is_drained_with_one_broker_call_per_batch() -> None:
    calls = {}
    for depth in (0, 16):
        broker = CountingBroker()
        app = Worq(broker)

        @app.task
        def noop() -> None:
            pass

        noop.enqueue_many([() for _ in range(300)])
        app.worker(settings=settings(concurrency=1, prefetch=depth)).run(burst=True)
        calls[depth] = broker.calls
    assert calls[0] > 300, "without prefetching: a call per job"
    # 1, 2, 3, 5, 9 jobs while the allowance grows, then 17 per call; the settlements ride along.
    assert calls[16] <= 5 + 300 // 17 + 3


@pytest.mark.parametrize("depth", [0, 16])
def test_the_fetch_loop_sleeps_while_a_slot_fetches_its_own_jobs(
    depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    duties: list[object] = []
    await_duty = core.Worker._await_duty

    def counted(worker: core.Worker) -> object:
        duty = await_duty(worker)
        duties.append(duty)
        return duty

    monkeypatch.setattr(core.Worker, "_await_duty", counted)
    app = Worq(MemoryBroker())

    @app.task
    def noop() -> None:
        pass

    noop.enqueue_many([() for _ in range(300)])
    app.worker(settings=settings(concurrency=1, prefetch=depth)).run(burst=True)
    # The first fetch, then the last ones once the queue is empty: never once per job.
    assert len(duties) <= 6, duties


def test_long_jobs_are_not_prefetched() -> None:
    broker = CountingBroker()
    app = Worq(broker)

    @app.task
    def slow() -> None:
        time.sleep(0.02)  # four times the prefetch window: no job is fetched ahead

    slow.enqueue_many([() for _ in range(12)])
    app.worker(settings=settings(concurrency=2, prefetch=16)).run(burst=True)
    assert broker.most_held <= 2


@pytest.mark.usefixtures("run_times_ignored")
def test_max_jobs_is_honoured_with_prefetch() -> None:
    broker = CountingBroker()
    app = Worq(broker)
    done: list[int] = []

    @app.task
    def note(n: int) -> None:
        done.append(n)

    note.enqueue_many([(n,) for n in range(30)])
    worker = app.worker(settings=settings(concurrency=1, prefetch=16, max_jobs=10))
    assert worker.run() is ExitReason.MAX_JOBS
    assert done == list(range(10))
    [stats] = broker.stats([QUEUE])
    assert (stats.ready, stats.running) == (20, 0), "nothing beyond max_jobs was leased"


# -- finished jobs, and jobs stuck behind a long one ------------------------------------------


class Blocker:
    """The queue the next tests drain: ``before`` short jobs, one that blocks, ``after`` more."""

    def __init__(self, app: Worq, before: int = 40, after: int = 20) -> None:
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.runs: list[tuple[int, int]] = []  # (n, attempt) of every short run

        @app.task
        def short(n: int) -> int:
            self.runs.append((n, current_job().attempt))
            return n

        @app.task
        def block() -> None:
            self.started.set()
            assert self.proceed.wait(30)

        self.short_jobs = short.enqueue_many([(n,) for n in range(before)])
        self.block_job = block.enqueue()
        self.later_jobs = short.enqueue_many([(n,) for n in range(before, before + after)])


@pytest.fixture
def blocker_app() -> Iterator[tuple[Worq, Blocker]]:
    storage = MemoryStorage()  # written by the broker's settlements, as on Redis
    app = Worq(CountingBroker(storage), storage=storage)
    assert app.broker_stores_results
    blocker = Blocker(app)
    yield app, blocker
    blocker.proceed.set()


@pytest.mark.usefixtures("run_times_ignored")
def test_results_do_not_wait_for_the_rest_of_their_batch(
    blocker_app: tuple[Worq, Blocker],
) -> None:
    app, blocker = blocker_app
    worker = app.worker(settings=settings(concurrency=1, prefetch=16))
    with running(worker):
        assert blocker.started.wait(10)
        # The jobs fetched with the blocking one finished before it started: their results are
        # stored while it still runs, though no fetch has carried their settlements.
        assert [j.result(timeout=5) for j in blocker.short_jobs] == list(range(40))
        blocker.proceed.set()


@pytest.mark.usefixtures("run_times_ignored")
def test_prefetched_jobs_stuck_behind_a_long_one_go_to_another_worker(
    blocker_app: tuple[Worq, Blocker], caplog: pytest.LogCaptureFixture
) -> None:
    app, blocker = blocker_app
    first = app.worker(settings=settings(concurrency=1, prefetch=16))
    with caplog.at_level(logging.INFO, logger="worq.worker"), running(first):
        assert blocker.started.wait(10)
        with running(app.worker(settings=settings(concurrency=1, prefetch=16))):
            # The first worker's only slot is taken: what it fetched behind the blocking job
            # goes back to the queue, and the second worker runs it meanwhile.
            assert [j.result(timeout=5) for j in blocker.later_jobs] == list(range(40, 60))
        blocker.proceed.set()
    assert "prefetched jobs no slot took in time" in caplog.text
    later = [(n, attempt) for n, attempt in blocker.runs if n >= 40]
    assert sorted(later) == [(n, 1) for n in range(40, 60)], "handed back, their attempt uncounted"


@pytest.mark.usefixtures("run_times_ignored", "no_handback")
def test_a_stop_hands_back_prefetched_jobs_at_once(blocker_app: tuple[Worq, Blocker]) -> None:
    app, blocker = blocker_app
    worker = app.worker(settings=settings(concurrency=1, prefetch=16, lease=60.0))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    assert blocker.started.wait(10)
    [before] = app.broker.stats([QUEUE])
    assert before.running > 1, "jobs were prefetched behind the blocking one"
    worker.stop()

    def only_the_blocker_is_leased() -> bool:
        [stats] = app.broker.stats([QUEUE])
        return stats.running == 1 and stats.ready == 20

    eventually(only_the_blocker_is_leased, what="the prefetched jobs to be handed back")
    blocker.proceed.set()
    thread.join(10)
    assert worker.exit_reason is ExitReason.STOPPED
    app.worker(settings=settings(concurrency=1)).run(burst=True)
    assert sorted(blocker.runs) == [(n, 1) for n in range(60)], "each ran once, first attempt"


# -- order and fairness between workers -------------------------------------------------------


@pytest.mark.usefixtures("run_times_ignored")
def test_each_worker_starts_its_jobs_in_delivery_order_and_both_get_a_share() -> None:
    app = Worq(MemoryBroker())
    started: dict[int, list[int]] = {}

    @app.task
    def step(n: int) -> None:
        started.setdefault(threading.get_ident(), []).append(n)  # one slot thread per worker
        time.sleep(0.001)

    with (
        running(app.worker(settings=settings(concurrency=1, prefetch=16))),
        running(app.worker(settings=settings(concurrency=1, prefetch=16))),
    ):
        jobs = step.enqueue_many([(n,) for n in range(300)])
        for job in jobs:
            job.result(timeout=20)
    assert len(started) == 2, "both workers ran jobs of the deep queue"
    for order in started.values():
        assert order == sorted(order), "a worker starts its jobs in the order they were delivered"
    assert sorted(n for order in started.values() for n in order) == list(range(300))


def test_two_idle_workers_share_two_jobs() -> None:
    app = Worq(MemoryBroker())
    together = threading.Barrier(2, timeout=10)

    @app.task
    def warm(n: int) -> int:
        return n

    @app.task
    def meet() -> str:
        together.wait()  # passes only if the two jobs run at once, one in each worker
        return "met"

    with (
        running(app.worker(settings=settings(concurrency=1, prefetch=16))),
        running(app.worker(settings=settings(concurrency=1, prefetch=16))),
    ):
        for job in warm.enqueue_many([(n,) for n in range(200)]):  # short jobs, a deep queue
            job.result(timeout=10)
        pair = meet.enqueue_many([(), ()])
        assert [job.result(timeout=15) for job in pair] == ["met", "met"]
