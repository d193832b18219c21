"""Workflows as users write them: chains, groups and chords on the memory broker.

What the broker does in one step (counting, the callback, the next step with the ack) is the
contract's (worq_core.testing.workflow_contract); these cases check what users see: results
passed along, order, failures stopping a chain, a chord's callback once with every result,
and the state released when a workflow ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from worq_core import (
    JobCancelled,
    JobFailed,
    JobStatus,
    Reject,
    TaskArgumentsError,
    TaskError,
    UnsupportedError,
    Worq,
    chain,
    chord,
    group,
)
from worq_core.models import Capability
from worq_core.worker import WorkerSettings
from worq_memory import MemoryBroker, MemoryStorage


@pytest.fixture
def app() -> Iterator[Worq]:
    storage = MemoryStorage()
    app = Worq(broker=MemoryBroker(storage=storage), storage=storage)
    yield app
    app.close()


def drain(app: Worq, queues: list[str] | None = None) -> None:
    """Run every job (and every job the run sends) in this process, then return."""
    settings = WorkerSettings(
        queues=tuple(queues or ["default"]), concurrency=4, handle_signals=False, scheduler=False
    )
    app.worker(settings=settings).run(burst=True)


@pytest.fixture
def tasks(app: Worq) -> dict[str, Any]:
    calls: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def record(name: str, value: Any) -> None:
        with lock:
            calls.append((name, value))

    @app.task
    def add(x: int, y: int) -> int:
        record("add", (x, y))
        return x + y

    @app.task
    def double(x: int) -> int:
        record("double", x)
        return 2 * x

    @app.task
    def total(values: list[int], offset: int = 0) -> int:
        record("total", values)
        return sum(values) + offset

    @app.task
    def explode(x: int) -> int:
        record("explode", x)
        raise Reject(f"no {x}")

    @app.task
    def listing(values: list[Any]) -> list[str]:
        record("listing", values)
        return [type(v).__name__ for v in values]

    return {
        "add": add,
        "double": double,
        "total": total,
        "explode": explode,
        "listing": listing,
        "calls": calls,
    }


def test_a_chain_passes_each_result_to_the_next_step(app: Worq, tasks: dict[str, Any]) -> None:
    add, double = tasks["add"], tasks["double"]
    flow = chain(add.s(1, 2), double.s(), double.s()).enqueue()
    assert flow.status().step == 0
    drain(app)
    assert flow.result(timeout=5) == 12
    assert tasks["calls"] == [("add", (1, 2)), ("double", 3), ("double", 6)]
    assert flow.status().status is JobStatus.SUCCEEDED
    assert flow.status().step == 2


def test_a_chain_is_sent_one_step_at_a_time(app: Worq, tasks: dict[str, Any]) -> None:
    add, double = tasks["add"], tasks["double"]
    flow = (add.s(1, 1) | double.s()).enqueue()
    first, second = flow.job_ids
    assert app.broker.job_state(first) is not None
    assert app.broker.job_state(second) is None, "the second step is sent by the first's ack"


def test_a_dead_step_stops_the_chain_and_fails_the_workflow(
    app: Worq, tasks: dict[str, Any]
) -> None:
    add, explode, double = tasks["add"], tasks["explode"], tasks["double"]
    flow = chain(add.s(1, 2), explode.s(), double.s()).enqueue()
    drain(app)
    assert [name for name, _ in tasks["calls"]] == ["add", "explode"]
    assert app.broker.job_state(flow.job_ids[2]) is None, "the later step was never sent"
    state = flow.status()
    assert (state.status, state.step, state.task) == (JobStatus.DEAD, 1, tasks["explode"].name)
    with pytest.raises(JobFailed, match="no 3"):
        flow.result(timeout=5)


def test_a_group_gives_its_members_results_in_order(app: Worq, tasks: dict[str, Any]) -> None:
    double = tasks["double"]
    flow = group(double.s(i) for i in range(10)).enqueue()
    drain(app)
    assert flow.result(timeout=5) == [2 * i for i in range(10)]
    assert flow.results(timeout=5) == [2 * i for i in range(10)]


def test_a_group_says_which_members_failed(app: Worq, tasks: dict[str, Any]) -> None:
    double, explode = tasks["double"], tasks["explode"]
    flow = group(double.s(1), explode.s(2), double.s(3)).enqueue()
    drain(app)
    results = flow.results(timeout=5)
    assert results[0] == 2
    assert isinstance(results[1], JobFailed)
    assert results[2] == 6


def test_a_chord_runs_its_callback_once_with_every_result(app: Worq, tasks: dict[str, Any]) -> None:
    double, total = tasks["double"], tasks["total"]
    flow = chord((double.s(i) for i in range(20)), total.s(offset=1)).enqueue()
    drain(app)
    assert flow.result(timeout=5) == sum(2 * i for i in range(20)) + 1
    assert [c for c in tasks["calls"] if c[0] == "total"] == [("total", [2 * i for i in range(20)])]
    gid = flow.id
    assert app.broker.group_state(gid) is None, "the callback's ack released the group"


def test_a_chord_with_a_dead_member_does_not_run_its_callback(
    app: Worq, tasks: dict[str, Any]
) -> None:
    double, explode, total = tasks["double"], tasks["explode"], tasks["total"]
    flow = chord([double.s(1), explode.s(2)], total.s()).enqueue()
    drain(app)
    assert "total" not in [name for name, _ in tasks["calls"]]
    with pytest.raises(JobFailed, match="no 2"):
        flow.result(timeout=5)
    assert flow.status().status is JobStatus.DEAD


def test_a_chord_can_run_its_callback_with_the_failures_marked(
    app: Worq, tasks: dict[str, Any]
) -> None:
    double, explode, listing = tasks["double"], tasks["explode"], tasks["listing"]
    flow = chord([double.s(1), explode.s(2)], listing.s(), run_on_failure=True).enqueue()
    drain(app)
    assert flow.result(timeout=5) == ["int", "JobFailed"]


def test_workflows_nest(app: Worq, tasks: dict[str, Any]) -> None:
    add, double, total = tasks["add"], tasks["double"], tasks["total"]
    # A chain whose middle is a group, whose members are chains; the group feeds a callback.
    flow = chain(
        add.s(1, 1),  # 2
        group(chain(double.s(), double.s()), double.s()),  # [8, 4]
        total.s(),  # 12
        double.s(),  # 24
    ).enqueue()
    drain(app)
    assert flow.result(timeout=5) == 24


def test_a_chord_can_be_a_member_of_a_group(app: Worq, tasks: dict[str, Any]) -> None:
    double, total = tasks["double"], tasks["total"]
    flow = group(chord([double.s(1), double.s(2)], total.s()), double.s(10)).enqueue()
    drain(app)
    assert flow.result(timeout=5) == [6, 20]


def test_results_needed_by_a_chord_outlive_the_result_ttl(tasks: dict[str, Any]) -> None:
    storage = MemoryStorage()
    app = Worq(broker=MemoryBroker(storage=storage), storage=storage, result_ttl=0.5)
    try:

        @app.task(queue="members")
        def one(x: int) -> int:
            return x

        @app.task(queue="callbacks")
        def summed(values: list[int]) -> int:
            return sum(values)

        flow = chord([one.s(1), one.s(2)], summed.s()).enqueue()
        drain(app, ["members"])
        threading.Event().wait(0.7)  # the members' records expired
        assert app.storage.load(flow.job_ids[0]) is None
        drain(app, ["callbacks"])
        assert flow.result(timeout=5) == 3
    finally:
        app.close()


def test_cancelling_a_workflow_cancels_what_has_not_run(app: Worq, tasks: dict[str, Any]) -> None:
    add, double = tasks["add"], tasks["double"]
    flow = chain(add.s(1, 2), double.s()).enqueue()
    assert flow.cancel() >= 1
    drain(app)
    assert tasks["calls"] == []
    with pytest.raises(JobCancelled):
        flow.result(timeout=5)


def test_bad_arguments_fail_when_the_workflow_is_enqueued(app: Worq, tasks: dict[str, Any]) -> None:
    add, double = tasks["add"], tasks["double"]
    with pytest.raises(TaskArgumentsError):
        chain(add.s(1), double.s()).enqueue()  # add needs two arguments
    with pytest.raises(TaskArgumentsError):
        chain(add.s(1, 2), double.s(5)).enqueue()  # double gets the result and 5
    assert app.broker.stats(["default"])[0].ready == 0, "nothing was sent"


def test_shapes_the_broker_cannot_run_are_refused(app: Worq, tasks: dict[str, Any]) -> None:
    double = tasks["double"]
    with pytest.raises(TaskError):
        group(group(double.s(1)), double.s(2)).enqueue()
    with pytest.raises(TaskError):
        chain(group(double.s(1)), group(double.s(2), double.s(3))).enqueue()
    with pytest.raises(TaskError):
        chain()


def test_a_broker_without_workflows_refuses_them(tasks: dict[str, Any]) -> None:
    class Plain(MemoryBroker):
        capabilities = MemoryBroker.capabilities - {Capability.WORKFLOWS}

    app = Worq(broker=Plain())

    @app.task
    def step(x: int) -> int:
        return x

    with pytest.raises(UnsupportedError):
        chain(step.s(1), step.s()).enqueue()
    app.close()


def test_a_failure_inside_a_member_chain_fails_the_group(app: Worq, tasks: dict[str, Any]) -> None:
    add, explode, double = tasks["add"], tasks["explode"], tasks["double"]
    flow = group(chain(explode.s(1), double.s()), chain(add.s(1, 1), double.s())).enqueue()
    drain(app)
    with pytest.raises(JobFailed, match="no 1"):
        flow.result(timeout=5)
    assert flow.status().status is JobStatus.DEAD


def test_a_strict_chord_with_a_failed_member_chain_fails_and_lets_go(
    app: Worq, tasks: dict[str, Any]
) -> None:
    add, explode, double, total = tasks["add"], tasks["explode"], tasks["double"], tasks["total"]
    flow = chord([chain(explode.s(1), double.s()), add.s(1, 2)], total.s()).enqueue()
    drain(app)
    assert "total" not in [name for name, _ in tasks["calls"]]
    with pytest.raises(JobFailed):
        flow.result(timeout=5)
    assert app.broker.group_state(flow.id) is None, "the dead callback released the group"


def test_a_lenient_chord_sees_a_failed_member_chain_in_its_place(
    app: Worq, tasks: dict[str, Any]
) -> None:
    explode, double, listing = tasks["explode"], tasks["double"], tasks["listing"]
    flow = chord(
        [chain(explode.s(1), double.s()), double.s(3)], listing.s(), run_on_failure=True
    ).enqueue()
    drain(app)
    assert flow.result(timeout=5) == ["JobFailed", "int"]


def test_a_step_that_dies_later_ends_the_wait_for_a_group_after_it(
    app: Worq, tasks: dict[str, Any]
) -> None:
    explode, double = tasks["explode"], tasks["double"]
    flow = chain(explode.s(1), group(double.s(), double.s())).enqueue()
    waiter = threading.Thread(target=drain, args=(app,))
    waiter.start()
    with pytest.raises(JobFailed, match="no 1"):
        flow.result(timeout=10)
    waiter.join(10)


def test_cancelling_while_a_step_runs_stops_the_steps_after_it(app: Worq) -> None:
    from worq_core.testing.support import running

    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    @app.task
    def slow(x: int) -> int:
        started.set()
        release.wait(5)
        return x

    @app.task
    def after(x: int) -> int:
        ran.append(x)
        return x

    settings = WorkerSettings(concurrency=2, handle_signals=False, scheduler=False)
    with running(app.worker(settings=settings)):
        flow = chain(slow.s(1), after.s(), after.s()).enqueue()
        assert started.wait(5)
        flow.cancel()
        release.set()  # it finishes before it hears of the cancel, and sends the next step
        with pytest.raises(JobCancelled):
            flow.result(timeout=10)
    assert ran == [], "the step it sent ended cancelled, and sent nothing"


def test_an_empty_group_cannot_follow_a_step(app: Worq, tasks: dict[str, Any]) -> None:
    double, total = tasks["double"], tasks["total"]
    with pytest.raises(TaskError):
        chain(double.s(1), group(), total.s()).enqueue()


def test_a_chain_with_a_fixed_job_id_runs_afresh(app: Worq, tasks: dict[str, Any]) -> None:
    add, double = tasks["add"], tasks["double"]
    first = chain(add.s(1, 1), double.options(job_id="report").s()).enqueue()
    drain(app)
    assert first.result(timeout=5) == 4
    again = chain(add.s(2, 2), double.options(job_id="report").s()).enqueue()
    drain(app)
    assert again.result(timeout=5) == 8


def test_a_chord_callback_that_cannot_reach_the_broker_runs_later(
    app: Worq, tasks: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worq_core import BrokerConnectionError

    double, total = tasks["double"], tasks["total"]
    flow = chord([double.s(1), double.s(2)], total.s()).enqueue()
    real = app.broker.group_state
    failures = [1]

    def flaky(group_id: str) -> Any:
        if failures:
            failures.pop()
            raise BrokerConnectionError("memory", "down for a moment")
        return real(group_id)

    monkeypatch.setattr(app.broker, "group_state", flaky)
    settings = WorkerSettings(concurrency=2, lease=0.5, handle_signals=False, scheduler=False)
    app.worker(settings=settings).run(burst=True)
    assert flow.result(timeout=5) == 6


def test_cancelling_while_members_run_stops_the_chords_callback(app: Worq) -> None:
    from worq_core.testing.support import eventually, running

    started, release = threading.Event(), threading.Event()
    ran: list[Any] = []

    @app.task
    def slow(x: int) -> int:
        started.set()
        release.wait(5)
        return x

    @app.task
    def summed(values: list[int]) -> int:
        ran.append(values)
        return sum(values)

    settings = WorkerSettings(concurrency=2, handle_signals=False, scheduler=False)
    with running(app.worker(settings=settings)):
        flow = chord([slow.s(1)], summed.s()).enqueue()
        assert started.wait(5)
        flow.cancel()
        release.set()  # the member finishes anyway, and its group sends the callback
        with pytest.raises(JobCancelled):
            flow.result(timeout=10)
        # The callback is sent when the member settles, ends cancelled, and lets go of it all.
        eventually(lambda: app.broker.group_state(flow.id) is None, what="the group released")
    assert ran == [], "the callback ended cancelled without running"
