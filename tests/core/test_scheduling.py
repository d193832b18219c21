"""Periodic schedules, unique jobs and limits as users declare them, on the in-memory broker.

The scheduler service is driven by a hand-moved clock, so "a tick fires once" is checked tick by
tick without waiting for real seconds. The broker's side (atomic compare-and-set, unique keys,
limits) has its own contract in ``worq_core.testing``; these tests are about what worq-core
builds on it: which tick fires, what a missed hour does, which handle a unique enqueue returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from worq_core import EventKind, JobStatus, TaskError, UnsupportedError, Worq
from worq_core.cli import main
from worq_core.limits import argument_hash, parse_rate
from worq_core.middleware import EnqueueRequest, Middleware
from worq_core.models import Capability, Message, UniqueUntil
from worq_core.scheduling import SCHEDULE_HEADER, TICK_HEADER, Missed
from worq_core.triggers import ScheduleError
from worq_core.worker import WorkerSettings
from worq_core.worker.scheduler import Scheduler
from worq_memory import MemoryBroker, MemoryStorage

START = 1_800_000_000.0  # a round Unix time: every-ticks of 1, 10 and 60 seconds fall on it


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def app() -> Iterator[Worq]:
    storage = MemoryStorage()
    app = Worq(broker=MemoryBroker(storage=storage), storage=storage)
    yield app
    app.close()


def queued(app: Worq, queue: str = "default") -> list[dict[str, str]]:
    """The headers of every job waiting in ``queue``, oldest first (they are leased to look)."""
    from worq_core.job import Envelope

    deliveries = app.broker.fetch([queue], 10_000, lease=60, wait=0)
    app.broker.release(deliveries)
    return [dict(Envelope.decode(d.body, app.serializer).headers) for d in deliveries]


def drain(app: Worq) -> None:
    """Run every queued job in this thread, then return."""
    app.worker(concurrency=1, settings=WorkerSettings(handle_signals=False)).run(burst=True)


def ticks(app: Worq) -> list[float]:
    return [float(h[TICK_HEADER]) for h in queued(app)]


# -- the scheduler service ---------------------------------------------------------------------


def test_a_new_schedule_fires_from_its_next_tick_then_once_per_tick(app: Worq) -> None:
    @app.periodic(every=timedelta(seconds=10))
    def report() -> None: ...

    clock = Clock(START + 5)
    scheduler = Scheduler(app.broker, list(app.schedules.values()), clock)
    scheduler.tick(0.0)
    assert ticks(app) == []  # START itself passed before the schedule was first seen
    for step in (4.0, 1.0, 0.5, 9.5, 10.0):
        clock.now += step
        scheduler.tick(0.0)
        scheduler.tick(0.0)  # a second look at the same moment fires nothing more
    assert ticks(app) == [START + 10, START + 20, START + 30]
    assert {h[SCHEDULE_HEADER] for h in queued(app)} == {report.name}


def test_the_service_sleeps_until_the_next_tick(app: Worq) -> None:
    @app.periodic(every=timedelta(seconds=10))
    def report() -> None: ...

    clock = Clock(START + 3)
    scheduler = Scheduler(app.broker, list(app.schedules.values()), clock)
    assert scheduler.tick(100.0) == pytest.approx(107.0)


def look(scheduler: Scheduler, barrier: threading.Barrier) -> None:
    """One scheduler's look at the clock, all of them at the same moment."""
    barrier.wait()
    scheduler.tick(0.0)


def test_many_schedulers_fire_each_tick_exactly_once(app: Worq) -> None:
    @app.periodic(every=1.0)
    def beat() -> None: ...

    clock = Clock(START + 0.5)
    schedulers = [Scheduler(app.broker, list(app.schedules.values()), clock) for _ in range(6)]
    for scheduler in schedulers:
        scheduler.tick(0.0)
    for _ in range(20):
        clock.now += 1.0
        barrier = threading.Barrier(len(schedulers))
        threads = [threading.Thread(target=look, args=(s, barrier)) for s in schedulers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert ticks(app) == [START + n for n in range(1, 21)]
    assert sum(s.fired for s in schedulers) == 20


def test_middleware_hears_how_each_scheduler_s_tick_ended() -> None:
    told: list[tuple[str, str]] = []

    class Listener(Middleware):
        def after_enqueue(
            self, requests: Sequence[EnqueueRequest], error: BaseException | None
        ) -> None:
            told.extend((r.headers[TICK_HEADER], type(error).__name__) for r in requests)

    storage = MemoryStorage()
    app = Worq(
        broker=MemoryBroker(storage=storage), storage=storage, middleware=[Listener()], events=True
    )

    @app.periodic(every=1.0)
    def beat() -> None: ...

    clock = Clock(START + 0.5)
    schedulers = [Scheduler(app.broker, list(app.schedules.values()), clock) for _ in range(3)]
    schedulers[0].tick(0.0)
    [schedule] = app.schedules.values()
    seen = app.broker.schedule_fires([schedule.key])[schedule.key]
    clock.now += 1.0
    for scheduler in schedulers:  # all three read the record before any of them fired
        scheduler.fire_due(schedule, seen, clock.now)
    # One scheduler sent the tick's job; the two others prepared theirs and were told why not.
    assert sorted(told) == [
        (repr(START + 1), "NoneType"),
        (repr(START + 1), "ScheduleTaken"),
        (repr(START + 1), "ScheduleTaken"),
    ]
    [enqueued] = [e for e in app.broker.read_events(None, 100) if e.kind is EventKind.ENQUEUED]
    [headers] = queued(app)
    assert enqueued.task == beat.name
    assert float(headers[TICK_HEADER]) == START + 1
    app.close()


class QueueRecordingBroker(MemoryBroker):
    """A broker that notes the queue each schedule call names."""

    def __init__(self, storage: MemoryStorage) -> None:
        super().__init__(storage=storage)
        self.named: list[tuple[str, str | None]] = []

    def fire_schedule(
        self,
        schedule: str,
        tick: float,
        last: float | None,
        message: Message | None,
        queue: str | None = None,
    ) -> bool:
        self.named.append(("fire", queue))
        return super().fire_schedule(schedule, tick, last, message, queue)

    def schedule_fires(
        self, schedules: Sequence[str] | None = None, queues: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        self.named += [("read", None if queues is None else queues.get(s)) for s in schedules or ()]
        return super().schedule_fires(schedules, queues)


class BrokerOfBefore(MemoryBroker):
    """A third-party broker written before the schedule calls took a queue."""

    def fire_schedule(  # type: ignore[override]
        self, schedule: str, tick: float, last: float | None, message: Message | None
    ) -> bool:
        return super().fire_schedule(schedule, tick, last, message)

    def schedule_fires(  # type: ignore[override]
        self, schedules: Sequence[str] | None = None
    ) -> dict[str, float]:
        return super().schedule_fires(schedules)


def test_the_scheduler_names_the_queue_of_each_schedules_jobs_in_every_call() -> None:
    storage = MemoryStorage()
    broker = QueueRecordingBroker(storage)
    app = Worq(broker=broker, storage=storage)

    @app.periodic(every=10.0, name="own", queue="reports")  # the task's own queue
    def report() -> None: ...

    app.schedule(report, every=10.0, name="moved", queue="elsewhere")  # the schedule's

    clock = Clock(START + 5)
    scheduler = Scheduler(broker, list(app.schedules.values()), clock)
    scheduler.tick(0.0)  # first seen: fired without a job
    clock.now += 10.0
    scheduler.tick(0.0)  # a tick with its job
    assert {queue for _, queue in broker.named} == {"reports", "elsewhere"}
    assert {"fire", "read"} == {call for call, _ in broker.named}
    assert [h[SCHEDULE_HEADER] for h in queued(app, "reports")] == ["own"]
    assert [h[SCHEDULE_HEADER] for h in queued(app, "elsewhere")] == ["moved"]


def test_a_broker_of_before_the_queue_argument_still_fires_schedules() -> None:
    storage = MemoryStorage()
    app = Worq(broker=BrokerOfBefore(storage=storage), storage=storage)

    @app.periodic(every=10.0)
    def report() -> None: ...

    clock = Clock(START + 5)
    scheduler = Scheduler(app.broker, list(app.schedules.values()), clock)
    scheduler.tick(0.0)
    clock.now += 10.0
    scheduler.tick(0.0)
    assert ticks(app) == [START + 10]
    assert scheduler.fired == 1


def test_missed_ticks_fire_once_by_default(app: Worq) -> None:
    @app.periodic(every=timedelta(minutes=1))
    def sync() -> None: ...

    clock = Clock(START + 1)
    Scheduler(app.broker, list(app.schedules.values()), clock).tick(0.0)
    clock.now += 3600  # every worker was down for an hour: 60 ticks passed
    Scheduler(app.broker, list(app.schedules.values()), clock).tick(0.0)
    assert ticks(app) == [START + 3600]  # one job, for the latest tick missed


def test_missed_ticks_are_dropped_with_skip_and_the_next_one_fires(app: Worq) -> None:
    @app.periodic(every=timedelta(minutes=1), missed="skip", grace=5)
    def sync() -> None: ...

    clock = Clock(START + 1)
    scheduler = Scheduler(app.broker, list(app.schedules.values()), clock)
    scheduler.tick(0.0)
    clock.now += 3600 + 30  # the latest tick is 30 s old: past the 5 s grace
    scheduler.tick(0.0)
    assert ticks(app) == []
    clock.now += 30  # the next tick, on time
    scheduler.tick(0.0)
    assert ticks(app) == [START + 3660]


def test_a_changed_trigger_starts_from_its_own_next_tick(app: Worq) -> None:
    @app.periodic(every=timedelta(minutes=1), name="sync")
    def sync() -> None: ...

    clock = Clock(START + 1)
    Scheduler(app.broker, list(app.schedules.values()), clock).tick(0.0)
    changed = Worq(broker=app.broker, storage=app.storage)
    changed.schedule(changed.task(name=sync.name)(lambda: None), every=30.0, name="sync")
    clock.now += 3600
    Scheduler(changed.broker, list(changed.schedules.values()), clock).tick(0.0)
    assert ticks(app) == []  # the new trigger is new: no replay of the old one's missed ticks
    clock.now += 29
    Scheduler(changed.broker, list(changed.schedules.values()), clock).tick(0.0)
    assert ticks(app) == [START + 3630]


def test_a_tick_whose_job_cannot_be_built_is_not_lost(
    app: Worq, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.periodic(every=10.0, args=(1,))
    def job(x: int) -> None: ...

    schedule = next(iter(app.schedules.values()))
    real = type(schedule).prepare
    calls = []

    def prepare(self: Any, tick: float) -> Any:
        calls.append(tick)
        if len(calls) == 1:
            raise RuntimeError("the process died here")
        return real(self, tick)

    clock = Clock(START + 1)
    scheduler = Scheduler(app.broker, [schedule], clock)
    scheduler.tick(0.0)
    clock.now += 10
    monkeypatch.setattr(type(schedule), "prepare", prepare)
    scheduler.tick(0.0)  # fails before the compare-and-set: nothing recorded, nothing sent
    assert ticks(app) == []
    scheduler.tick(0.0)
    assert ticks(app) == [START + 10]


def test_scheduled_jobs_run_with_their_fixed_arguments(app: Worq) -> None:
    seen: list[tuple[int, str]] = []

    @app.task
    def record(n: int, label: str = "") -> None:
        seen.append((n, label))

    app.schedule(record, every=10.0, args=(1,), kwargs={"label": "a"})
    app.schedule(record, every=10.0, args=(2,), kwargs={"label": "b"})
    assert len(app.schedules) == 2  # several schedules share one task
    clock = Clock(START + 1)
    scheduler = Scheduler(app.broker, list(app.schedules.values()), clock)
    scheduler.tick(0.0)
    clock.now += 9
    scheduler.tick(0.0)
    drain(app)
    assert sorted(seen) == [(1, "a"), (2, "b")]


def test_a_worker_runs_the_scheduler_unless_told_not_to(app: Worq) -> None:
    from worq_core.worker import WorkerSettings

    @app.periodic(every=10.0)
    def tick() -> None: ...

    on = app.worker(settings=WorkerSettings(handle_signals=False))
    off = app.worker(settings=WorkerSettings(handle_signals=False, scheduler=False))
    assert [type(s) for s in on._scheduler()] == [Scheduler]
    assert off._scheduler() == []


def test_declaring_a_bad_schedule_fails_at_import_time(app: Worq) -> None:
    def f(x: int) -> None: ...

    with pytest.raises(ScheduleError):
        app.periodic(cron="61 * * * *")(f)
    with pytest.raises(ScheduleError):
        app.periodic(cron="* * * * *", every=5.0, name="both")(f)
    with pytest.raises(ScheduleError):
        app.periodic(every=5.0, name="noargs")(f)  # x is missing
    with pytest.raises(ScheduleError):
        app.periodic(every=5.0, missed="burst", args=(1,), name="policy")(f)
    with pytest.raises(ScheduleError):
        app.periodic(cron="* * * * *", tz="Mars/Olympus", name="zone")(f)


def test_schedule_lists_last_and_next_tick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sched_app.py").write_text(
        "from worq_core import Worq\n"
        "app = Worq()\n"
        "@app.periodic(cron='*/5 * * * *', tz='Europe/Berlin', name='report')\n"
        "def report():\n"
        "    pass\n"
        "@app.periodic(every=30.0, missed='skip', name='beat')\n"
        "def beat():\n"
        "    pass\n"
        "@app.periodic(every=60.0, name='seen')\n"
        "def seen():\n"
        "    pass\n"
        "# what schedulers would have recorded: a tick of beat, and when one first saw 'seen'\n"
        "app.broker.fire_schedule(app.schedules['beat'].key, 1800000000.0, None, None)\n"
        "app.broker.fire_schedule(app.schedules['seen'].key, 1800000001.5, None, None)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, ["schedule", "sched_app:app"], terminal_width=250)
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if "sched_app" in line}
    assert "cron */5 * * * * (Europe/Berlin)" in rows["report"]
    assert "never seen" in rows["report"]
    assert "every 30s" in rows["beat"]
    assert "skip" in rows["beat"]
    assert "2027-01-15T08:00:00.000+00:00" in rows["beat"]  # its last tick
    assert "2027-01-15T08:00:30.000+00:00" in rows["beat"]  # and the one after it
    assert "none yet (seen 2027-01-15T08:00:01.500+00:00)" in rows["seen"]


# -- unique jobs -------------------------------------------------------------------------------


def test_an_equal_unique_job_returns_the_handle_of_the_one_queued(app: Worq) -> None:
    @app.task(unique=True)
    def sync(account: int) -> int:
        return account

    first = sync.enqueue(7)
    again = sync.enqueue(7)
    other = sync.enqueue(8)
    assert again.id == first.id
    assert other.id != first.id
    assert app.broker.stats(["default"])[0].ready == 2
    drain(app)
    assert first.result(timeout=1) == 7
    after = sync.enqueue(7)  # the first one is done: the key is free
    assert after.id != first.id


def test_until_started_frees_the_key_when_the_job_starts(app: Worq) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task(unique="until_started")
    def slow() -> None:
        started.set()
        release.wait(5)

    first = slow.enqueue()
    assert slow.enqueue().id == first.id
    from worq_core.testing.support import running

    with running(app.worker(concurrency=1, settings=None)):
        assert started.wait(5)
        second = slow.enqueue()  # the first is running: an equal job may queue behind it
        assert second.id != first.id
        assert slow.enqueue().id == second.id
        release.set()


def test_options_give_a_key_and_a_window_after(app: Worq) -> None:
    @app.task
    def send(user: int, text: str) -> None: ...

    a = send.options(unique_key="digest:1", unique_for=60).enqueue(1, "hi")
    b = send.options(unique_key="digest:1").enqueue(1, "other text, same key")
    assert b.id == a.id
    drain(app)
    c = send.options(unique_key="digest:1", unique_for=60).enqueue(1, "hi")
    assert c.id == a.id  # done, but inside its 60 s window
    assert c.status() is JobStatus.SUCCEEDED


def test_unique_in_enqueue_many_counts_each_key_once(app: Worq) -> None:
    @app.task(unique=True)
    def index(doc: int) -> None: ...

    jobs = index.enqueue_many([(1,), (2,), (1,)])
    assert jobs[2].id == jobs[0].id
    assert app.broker.stats(["default"])[0].ready == 2


def test_a_unique_key_function_picks_what_counts(app: Worq) -> None:
    @app.task(unique=True, unique_key=lambda user, **_: user)
    def notify(user: int, message: str) -> None: ...

    assert notify.enqueue(1, "a").id == notify.enqueue(1, "b").id
    assert notify.enqueue(2, "a").id != notify.enqueue(1, "a").id


def test_the_default_key_reads_the_arguments_by_name(app: Worq) -> None:
    @app.task(unique=True)
    def rebuild(index: str, full: bool = False) -> None: ...

    first = rebuild.enqueue("users")
    assert rebuild.enqueue(index="users").id == first.id
    assert rebuild.enqueue("users", False).id == first.id
    assert rebuild.enqueue("users", full=True).id != first.id
    assert app.broker.stats(["default"])[0].ready == 2


def test_options_unique_false_sends_one_job_without_the_tasks_key(app: Worq) -> None:
    @app.task(unique=True)
    def sync(account: int) -> None: ...

    first = sync.enqueue(1)
    assert sync.options(unique=False).enqueue(1).id != first.id
    assert sync.enqueue(1).id == first.id  # the key is still the first job's
    with pytest.raises(TaskError):
        sync.options(unique=False, unique_key="x")


def test_the_default_key_is_a_stable_hash_of_the_arguments() -> None:
    assert argument_hash([1, {"a": 1, "b": 2}], {"x": [1]}) == argument_hash(
        [1, {"b": 2, "a": 1}], {"x": [1]}
    )
    assert argument_hash([1], {}) != argument_hash([2], {})
    assert argument_hash([1], {}) != argument_hash([], {"x": 1})
    with pytest.raises(TaskError):
        argument_hash([object()], {})


def test_unique_and_limits_need_a_broker_that_has_them(app: Worq) -> None:
    class Plain(MemoryBroker):
        capabilities = MemoryBroker.capabilities - {Capability.UNIQUE, Capability.LIMITS}

    plain = Worq(broker=Plain())

    @plain.task(unique=True)
    def once() -> None: ...

    @plain.task(rate_limit="1/s")
    def slow() -> None: ...

    with pytest.raises(UnsupportedError):
        once.enqueue()
    with pytest.raises(UnsupportedError):
        slow.enqueue()


# -- limits as declared ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100/m", (100, 60.0)), ("20/s", (20, 1.0)), ("5/10s", (5, 10.0)), ("1/d", (1, 86400.0))],
)
def test_rates_are_written_count_per_period(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["100", "0/s", "5/0s", "1/week", "-1/s", ""])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(TaskError):
        parse_rate(text)


def test_a_rate_limit_becomes_a_gcra_interval_and_burst(app: Worq) -> None:
    @app.task(rate_limit="100/m", rate_key=lambda tenant, **_: tenant)
    def call(tenant: str) -> None: ...

    message, _, _ = call.options()._prepare(["acme"], {}, None)
    assert message.rate is not None
    assert message.rate.key == f"{call.name}:acme"
    assert message.rate.interval == pytest.approx(0.6)
    assert message.rate.burst == 100
    assert message.concurrency is None
    assert message.unique is None


def test_limits_on_the_declaration_are_checked(app: Worq) -> None:
    def f() -> None: ...

    for options in (
        {"concurrency": 0},
        {"rate_limit": "1/s", "rate_burst": 0},
        {"rate_key": str},
        {"unique_for": 5.0},
        {"unique": "sometimes"},
    ):
        with pytest.raises(TaskError):
            app.task(name=f"bad-{len(options)}-{next(iter(options))}", **options)(f)


def test_unique_until_values() -> None:
    from worq_core.limits import unique_until

    assert unique_until(True) is UniqueUntil.DONE
    assert unique_until("until_started") is UniqueUntil.STARTED
    assert unique_until(False) is None
    assert Missed("once") is Missed.ONCE
