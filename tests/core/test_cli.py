"""The `worq` command line, on the in-memory broker.

The memory broker lives in the process that created it, so in-process tests load the test app
module once per test (a fresh import) and every `worq` invocation of that test reuses the same
module object, hence the same broker. The `worker` command is also run as a real subprocess on
apps that enqueue their jobs at import time.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from worq_core import JobStatus, Registry, WorkerSettings, Worq
from worq_core.cli import load_app, looks_like_app, main
from worq_core.demo import DemoError, run_demo
from worq_core.models import Message
from worq_core.testing.support import eventually, running

HERE = Path(__file__).resolve().parent
APP = "cli_app:app"


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A fresh import of cli_app (a fresh app and memory broker) for this test."""
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("cli_app", None)
    module = importlib.import_module("cli_app")
    yield module
    module.app.close()
    sys.modules.pop("cli_app", None)


@pytest.fixture
def app(app_module: ModuleType) -> Worq:
    result: Worq = app_module.app
    return result


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env)


def ok(*args: str, input: str | None = None) -> Result:
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """A user mistake: non-zero exit, a single `Error: ...` line on stderr, no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def drain(app: Worq, *queues: str) -> None:
    """Run a worker in this thread until its queues are empty."""
    settings = WorkerSettings(
        queues=queues or tuple(app.default_queues()), idle_wait=0.05, handle_signals=False
    )
    app.worker(settings=settings).run(burst=True)


def row(output: str, first_cell: str) -> list[str]:
    """The cells of the rich table row that starts with ``first_cell``."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.replace("|", "│").split("│")[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


# -- worker ------------------------------------------------------------------------------------


def test_worker_burst_runs_every_job_then_exits_zero(app_module: ModuleType) -> None:
    added = app_module.add.enqueue(1, 2)
    failed = app_module.boom.enqueue()

    result = ok("worker", APP, "--burst", "--concurrency", "2", "--lease", "5", "--grace", "1")

    assert added.result(timeout=0) == 3
    assert failed.status() is JobStatus.DEAD
    assert "stopped (drained): succeeded=1 retried=0 dead=1" in result.stderr


def test_worker_json_logs_are_one_object_per_line(app_module: ModuleType) -> None:
    app_module.add.enqueue(1, 2)

    result = ok("worker", APP, "--burst", "--log-format", "json", "--log-level", "debug")

    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries
    assert all(set(entry) >= {"time", "level", "logger", "message"} for entry in entries)
    assert any("stopped (drained)" in entry["message"] for entry in entries)


def test_worker_fetches_only_the_queues_given(app_module: ModuleType) -> None:
    pinged = app_module.ping.enqueue()
    added = app_module.add.enqueue(1, 1)

    ok("worker", APP, "--burst", "--queues", "other")

    assert pinged.result(timeout=0) == "pong"
    assert added.status() is JobStatus.QUEUED


def test_worker_rejects_a_bad_concurrency_in_one_line(app: Worq) -> None:
    assert_one_line_error(run("worker", APP, "--concurrency", "0"), "--concurrency")


# -- enqueue -----------------------------------------------------------------------------------


def test_enqueue_prints_the_job_id_and_the_job_runs_with_json_args(app: Worq) -> None:
    result = ok("enqueue", APP, "add", "2", "40")

    job_id = result.stdout.strip()
    drain(app)
    assert app.job(job_id).result(timeout=0) == 42


def test_enqueue_passes_kwargs_and_honours_job_id(app: Worq) -> None:
    result = ok(
        "enqueue", APP, "greet", '"ada"', "--kwargs", '{"punctuation": "?"}', "--job-id", "k-1"
    )

    assert result.stdout.strip() == "k-1"
    drain(app)
    assert app.job("k-1").result(timeout=0) == "hello ada?"


def test_enqueue_with_delay_schedules_the_job(app: Worq) -> None:
    job_id = ok("enqueue", APP, "add", "1", "2", "--delay", "3600").stdout.strip()

    assert app.job(job_id).status() is JobStatus.SCHEDULED


def test_enqueue_to_another_queue_with_a_priority(app: Worq) -> None:
    job_id = ok("enqueue", APP, "add", "1", "2", "--queue", "q2", "--priority", "5").stdout.strip()

    state = app.broker.job_state(job_id)
    assert state is not None
    assert (state.queue, state.status) == ("q2", JobStatus.QUEUED)


def test_enqueue_of_an_unknown_task_names_the_registered_ones(app: Worq) -> None:
    assert_one_line_error(run("enqueue", APP, "nosuch", "1"), "'nosuch'", "add", "greet")


def test_enqueue_with_bad_json_enqueues_nothing(app: Worq) -> None:
    assert_one_line_error(run("enqueue", APP, "add", "1", "x"), "argument 2", "not valid JSON")
    assert app.broker.stats(["default"])[0].ready == 0


def test_enqueue_kwargs_must_be_a_json_object(app: Worq) -> None:
    assert_one_line_error(run("enqueue", APP, "greet", "--kwargs", "[1]"), "JSON object")


def test_enqueue_with_arguments_that_do_not_fit_the_task(app: Worq) -> None:
    assert_one_line_error(run("enqueue", APP, "add", "1"), "bad arguments for task 'add'")


# -- stats -------------------------------------------------------------------------------------


def test_stats_counts_jobs_per_queue(app_module: ModuleType, app: Worq) -> None:
    app_module.add.enqueue_many([(1, 2), (3, 4)])
    app_module.add.options(delay=3600).enqueue(5, 6)
    app_module.ping.enqueue()
    app_module.boom.enqueue()

    output = ok("stats", APP).stdout

    assert row(output, "default") == ["default", "3", "1", "0", "0"]
    assert row(output, "other") == ["other", "1", "0", "0", "0"]


def test_stats_shows_dead_jobs_and_can_be_restricted_to_queues(
    app_module: ModuleType, app: Worq
) -> None:
    app_module.boom.enqueue()
    drain(app, "default")

    output = ok("stats", APP, "--queues", "default").stdout

    assert row(output, "default") == ["default", "0", "0", "0", "1"]
    assert "other" not in output


def test_stats_lists_the_apps_queues_even_before_any_job(app: Worq) -> None:
    output = ok("stats", APP).stdout

    assert row(output, "default")[1:] == ["0", "0", "0", "0"]
    assert row(output, "other")[1:] == ["0", "0", "0", "0"]


def test_stats_lists_live_workers_with_host_pid_and_counts(app: Worq) -> None:
    assert "no live workers" in ok("stats", APP).stdout
    worker = app.worker(
        settings=WorkerSettings(
            queues=("default",), concurrency=3, idle_wait=0.05, handle_signals=False
        )
    )
    with running(worker):
        eventually(lambda: bool(app.broker.workers()), what="the worker to register")
        output = ok("stats", APP).stdout
    [line] = [line for line in output.splitlines() if worker.id in line]
    assert str(os.getpid()) in line
    assert "default" in line
    assert "0/3" in line


# -- job ---------------------------------------------------------------------------------------


def test_job_shows_status_and_result(app_module: ModuleType, app: Worq) -> None:
    job = app_module.add.enqueue(1, 2)
    assert "status: queued" in ok("job", APP, job.id).stdout

    drain(app)

    output = ok("job", APP, job.id).stdout
    assert "status: succeeded" in output
    assert "result: 3" in output


def test_job_shows_the_error_of_a_dead_job(app_module: ModuleType, app: Worq) -> None:
    job = app_module.boom.enqueue()
    drain(app)

    output = ok("job", APP, job.id).stdout

    assert "status: dead" in output
    assert "error:  RuntimeError: kaboom" in output
    assert "Traceback" in output  # the remote traceback, as stored


def test_job_on_another_queue(app_module: ModuleType) -> None:
    job = app_module.ping.enqueue()

    output = ok("job", APP, job.id).stdout
    assert "status: queued" in output
    assert "queue:  other" in output


def test_an_unknown_job_is_an_error(app: Worq) -> None:
    assert_one_line_error(run("job", APP, "no-such-id"), "no-such-id", "unknown")


def test_job_on_a_workflow_member_shows_the_tree_and_where_it_stands(
    app_module: ModuleType, app: Worq
) -> None:
    from worq_core import chain, chord

    flow = chain(
        app_module.add.s(1, 2),
        chord([app_module.add.s(10), app_module.boom_after.s()], app_module.total.s()),
    ).enqueue()
    first, member, failing, callback = flow.job_ids

    before = ok("job", APP, member).stdout
    assert "workflow:" in before
    assert "queued at step 1 (add)" in before
    assert f"add {member} not sent  <- this" in before
    assert f"total {callback} not sent" in before

    drain(app)

    output = ok("job", APP, member).stdout
    assert "status: succeeded" in output
    assert "result: 13" in output
    assert "dead at step 2" in output
    assert f"add {first} succeeded" in output
    assert "group of 2 (1 succeeded, 1 dead) dead" in output
    assert f"boom_after {failing} dead" in output
    assert f"total {callback} dead" in output, "a strict chord's callback ends dead"

    # The workflow's own id (its first job's) and a group's id, which is no job, show it too.
    assert "dead at step 2" in ok("job", APP, flow.id).stdout
    group_id = flow.tree().children[1].id
    assert group_id not in flow.job_ids
    by_group = ok("job", APP, group_id).stdout
    assert "status:" not in by_group
    assert "(1 succeeded, 1 dead) dead  <- this" in by_group


def test_job_on_a_big_group_shows_only_the_members_that_did_not_succeed(
    app_module: ModuleType, app: Worq
) -> None:
    from worq_core import group

    flow = group([app_module.add.s(i, 1) for i in range(30)] + [app_module.boom.s()]).enqueue()
    drain(app)

    output = ok("job", APP, flow.id).stdout
    assert "group of 31 (30 succeeded, 1 dead) dead  <- this" in output
    assert f"boom {flow.job_ids[-1]} dead" in output
    assert "... 30 more" in output
    assert f"add {flow.job_ids[0]} " not in output


def test_a_workflow_is_found_from_another_handle_by_any_of_its_ids(
    app_module: ModuleType, app: Worq
) -> None:
    from worq_core import chain

    fixed = app_module.add.options(job_id="my-own-id")
    flow = chain(app_module.add.s(1, 2), fixed.s(3)).enqueue()
    drain(app)

    for some_id in [flow.id, *flow.job_ids]:
        found = app.workflow(some_id)
        assert found is not None, some_id
        assert found.id == flow.id
        assert found.job_ids == flow.job_ids == [flow.id, "my-own-id"]
        assert found.result(timeout=5) == 6
    assert app.workflow(app_module.add.enqueue(1, 1).id) is None, "a plain job"
    assert app.workflow("no-such-id") is None
    assert app.workflow(flow.id + "0") is None, "the workflow's prefix, but none of its ids"


def test_job_cancel_removes_a_queued_job_and_then_finds_nothing(
    app_module: ModuleType, app: Worq
) -> None:
    job = app_module.add.enqueue(1, 2)

    assert "cancellation requested (cancelled)" in ok("job", APP, job.id, "--cancel").stdout
    assert job.status() is JobStatus.CANCELLED
    assert "status: cancelled" in ok("job", APP, job.id).stdout
    assert_one_line_error(run("job", APP, job.id, "--cancel"), job.id, "nothing to cancel")


def test_job_shows_the_progress_of_a_running_job(app_module: ModuleType, app: Worq) -> None:
    reported, finish = threading.Event(), threading.Event()

    @app.task(name="copy")
    def copy() -> None:
        from worq_core import current_job

        current_job().progress(3, "copying files", total=4)
        reported.set()
        finish.wait(10)

    job = copy.enqueue()
    worker = app.worker(
        settings=WorkerSettings(concurrency=1, heartbeat=0.05, handle_signals=False)
    )
    with running(worker):
        assert reported.wait(10)
        eventually(lambda: job.progress() is not None, what="progress to be published")
        output = ok("job", APP, job.id).stdout
        finish.set()
    assert "status: running" in output
    assert "progress: 75% (3/4) copying files" in output


def test_worker_takes_a_prefetch_bound_and_refuses_a_negative_one(app_module: ModuleType) -> None:
    jobs = app_module.add.enqueue_many([(n, 1) for n in range(5)])
    ok("worker", APP, "--burst", "--concurrency", "1", "--prefetch", "0")
    assert [job.result(timeout=0) for job in jobs] == [1, 2, 3, 4, 5]
    refused = run("worker", APP, "--burst", "--prefetch", "-1")
    assert refused.exit_code == 2, refused.output
    assert "--prefetch" in refused.output


@pytest.mark.parametrize("queues", ["", " , ", "a\x01b", "x" * 201])
def test_worker_refuses_queue_names_it_could_never_use(queues: str) -> None:
    result = run("worker", APP, "--queues", queues, "--burst")
    assert result.exit_code == 2, result.output
    assert "--queues" in result.output


# -- dlq ---------------------------------------------------------------------------------------


def dead_letter(app_module: ModuleType, count: int = 1) -> list[str]:
    jobs = [app_module.boom.enqueue() for _ in range(count)]
    drain(app_module.app)
    return [job.id for job in jobs]


def test_dlq_list_shows_task_attempts_and_reason(app_module: ModuleType) -> None:
    (job_id,) = dead_letter(app_module)

    cells = row(ok("dlq", "list", APP).stdout, job_id)

    assert cells[1] == "boom"
    assert cells[2] == "1"
    assert "RuntimeError: kaboom" in cells[4]


def test_dlq_list_on_a_narrow_terminal_keeps_ids_whole(app_module: ModuleType) -> None:
    (job_id,) = dead_letter(app_module)

    result = run("dlq", "list", APP, env={"TTY_COMPATIBLE": "1", "COLUMNS": "60"})

    assert result.exit_code == 0, result.output
    lines = click.unstyle(result.stdout).splitlines()
    assert lines[0].startswith(f"{job_id}  boom  attempts 1  died ")
    assert "RuntimeError: kaboom" in lines[1]


def test_dlq_list_marks_an_undecodable_body(app: Worq) -> None:
    app.broker.enqueue([Message("garbage-1", "default", b"\xc1 not msgpack")])
    drain(app)

    cells = row(ok("dlq", "list", APP).stdout, "garbage-1")

    assert cells[1] == "<undecodable>"


def test_dlq_list_of_an_empty_queue(app: Worq) -> None:
    assert "no dead jobs in queue 'default'" in ok("dlq", "list", APP).stdout


def test_dlq_requeue_all(app_module: ModuleType, app: Worq) -> None:
    dead_letter(app_module, 2)

    assert "requeued 2 jobs" in ok("dlq", "requeue", APP).stdout

    (stats,) = app.broker.stats(["default"])
    assert (stats.ready, stats.dead) == (2, 0)


def test_dlq_requeue_given_ids(app_module: ModuleType, app: Worq) -> None:
    first, second = dead_letter(app_module, 2)

    assert "requeued 1 job " in ok("dlq", "requeue", APP, first, "--queue", "default").stdout

    assert app.job(first).status() is JobStatus.QUEUED
    assert app.job(second).status() is JobStatus.DEAD
    # The storage still holds the first run's failure; `worq job` shows the live state anyway.
    assert "status: queued" in ok("job", APP, first).stdout


def test_dlq_requeue_of_an_id_that_is_not_dead_is_an_error(app_module: ModuleType) -> None:
    (job_id,) = dead_letter(app_module)

    result = run("dlq", "requeue", APP, job_id, "not-dead")

    assert_one_line_error(result, "1 of the 2 ids")
    assert "requeued 1 job" in result.stdout


def test_dlq_purge_asks_first_and_keeps_jobs_when_declined(
    app_module: ModuleType, app: Worq
) -> None:
    dead_letter(app_module)

    result = run("dlq", "purge", APP, input="n\n")

    assert result.exit_code != 0
    assert app.broker.stats(["default"])[0].dead == 1


def test_dlq_purge_deletes_after_confirmation(app_module: ModuleType, app: Worq) -> None:
    dead_letter(app_module, 2)

    assert "purged 2 dead jobs" in ok("dlq", "purge", APP, input="y\n").stdout
    assert app.broker.stats(["default"])[0].dead == 0


def test_dlq_purge_with_yes_does_not_ask(app_module: ModuleType, app: Worq) -> None:
    dead_letter(app_module)

    result = ok("dlq", "purge", APP, "--yes")

    assert "purged 1 dead job " in result.stdout
    assert "[y/N]" not in result.output
    assert app.broker.stats(["default"])[0].dead == 0


# -- plugins -----------------------------------------------------------------------------------


def test_plugins_lists_memory_msgpack_and_json() -> None:
    output = ok("plugins").stdout

    assert "worq-core" in output
    assert "worq-memory" in output
    assert "broker memory (memory://)" in output
    assert "storage memory (memory://)" in output
    assert "serializer msgpack" in output
    assert "serializer json" in output


# -- loading the app and --broker --------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("cli_app", "expected MODULE:ATTR"),
        ("cli_app:", "expected MODULE:ATTR"),
        ("cli_app:nope", "has no attribute 'nope'"),
        ("cli_app:not_an_app", "not a worq_core.Worq app"),
        ("no_such_module_for_worq_tests:app", "no such module"),
        ("cli_broken_app:app", "broken on purpose"),
    ],
)
def test_a_bad_app_spec_is_one_line(app: Worq, spec: str, fragment: str) -> None:
    assert_one_line_error(run("stats", spec), fragment)


def test_an_import_error_names_the_file_and_line(app: Worq) -> None:
    assert_one_line_error(run("stats", "cli_broken_app:app"), "cli_broken_app.py:5")


def test_an_unknown_broker_scheme_is_one_line(app: Worq) -> None:
    assert_one_line_error(run("--broker", "nosuch://x", "stats", APP), "nosuch://", "memory://")


def test_the_broker_can_come_from_the_environment(app: Worq) -> None:
    result = run("stats", APP, env={"WORQ_BROKER": "nosuch://"})

    assert_one_line_error(result, "nosuch://")


def test_broker_override_points_the_app_at_a_fresh_broker(app_module: ModuleType) -> None:
    output = ok("--broker", "memory://other", "stats", APP).stdout

    assert "memory://other" in output
    assert app_module.app.broker.url == "memory://other"


def test_broker_option_after_the_command_wins_over_the_global_one(
    app_module: ModuleType,
) -> None:
    result = run("--broker", "nosuch://", "stats", APP, "--broker", "memory://cmd")

    assert result.exit_code == 0, result.output
    assert app_module.app.broker.url == "memory://cmd"


def test_broker_override_after_the_app_used_its_broker_is_explained(
    app_module: ModuleType,
) -> None:
    app_module.add.enqueue(1, 2)

    assert_one_line_error(run("--broker", "memory://", "stats", APP), "cannot apply --broker")


def test_a_usage_error_is_one_line(app: Worq) -> None:
    result = run("worker")

    assert_one_line_error(result, "Missing argument", "worq worker --help")
    assert result.exit_code == 2


def test_load_app_returns_the_app_and_applies_the_broker(app_module: ModuleType) -> None:
    assert load_app(APP) is app_module.app
    assert load_app(APP, "memory://x").broker.url == "memory://x"


# -- demo --------------------------------------------------------------------------------------


def test_demo_runs_and_reports_one_dead_job() -> None:
    result = ok("demo", "--jobs", "300", "--concurrency", "4", "--seed", "7")

    assert row(result.stdout, "dead")[1] == "1"
    assert row(result.stdout, "done")[1] == "299"
    assert "all right" in result.stdout


def test_run_demo_retries_the_flaky_jobs_and_verifies_results() -> None:
    summary = run_demo(400, 4, seed=1)

    assert summary.succeeded == 399
    assert summary.dead == 1
    assert summary.retried > 2  # the doomed job's two retries, and some flaky first attempts
    assert summary.mismatches == 0
    assert summary.verified > 0
    assert summary.jobs_per_second > 0


def test_demo_without_worq_memory_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def bare_app(broker: str) -> Worq:
        return Worq(broker, registry=Registry())  # no plugins at all

    monkeypatch.setattr("worq_core.demo.Worq", bare_app)

    with pytest.raises(DemoError, match="pip install worq-memory"):
        run_demo(10)
    assert_one_line_error(run("demo", "--jobs", "10"), "pip install worq-memory")


# -- worker subprocesses -----------------------------------------------------------------------


def worq_process(*args: str, merge_output: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORQ_BROKER", None)
    return subprocess.Popen(
        [sys.executable, "-m", "worq_core.cli", *args],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
    )


def lines_of(stream: Any) -> queue.Queue[str | None]:
    """A queue fed with the stream's lines by a thread; ``None`` marks the end."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def read_until(lines: queue.Queue[str | None], text: str | None, timeout: float) -> str:
    """The lines up to one containing ``text`` (``None``: up to the end), within ``timeout``."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            if text is None:
                return "".join(seen)
            raise AssertionError(f"output ended before {text!r}:\n{''.join(seen)}")
        seen.append(line)
        if text is not None and text in line:
            return "".join(seen)


def test_worker_subprocess_burst_exits_zero() -> None:
    process = worq_process("worker", "cli_burst_app:app", "--burst", "--concurrency", "4")
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr
    assert "stopped (drained): succeeded=25 retried=0 dead=1" in stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_worker_subprocess_finishes_its_job_on_sigterm_and_exits_zero() -> None:
    process = worq_process("worker", "cli_signal_app:app", "--grace", "10", merge_output=True)
    try:
        output = lines_of(process.stdout)
        seen = read_until(output, "job started", timeout=20)
        process.send_signal(signal.SIGTERM)
        seen += read_until(output, None, timeout=20)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, seen
    assert "received SIGTERM" in seen
    assert "job finished" in seen
    assert "stopped (stopped): succeeded=1 retried=0 dead=0" in seen


# -- commands added by plugins -----------------------------------------------------------------


@pytest.fixture
def plugin_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A registry whose plugin adds `worq hello NAME` and tries to shadow `worq stats`."""
    import types

    from worq_core import Registry, hookimpl
    from worq_core import cli as cli_module

    said: list[str] = []

    @click.command("hello")
    @click.argument("name")
    def hello(name: str) -> None:
        """Say hello."""
        said.append(name)
        click.echo(f"hello {name}")

    @click.command("stats")
    def fake_stats() -> None:
        said.append("shadowed")

    namespace = types.SimpleNamespace(worq_register_commands=hookimpl(lambda: [hello, fake_stats]))
    registry = Registry()
    registry.register(namespace, name="greeter", distribution="throwaway-greeter")
    monkeypatch.setattr(cli_module, "default_registry", lambda: registry)
    return said


def test_a_plugin_command_runs_and_is_listed(plugin_commands: list[str]) -> None:
    assert ok("hello", "world").stdout == "hello world\n"
    assert plugin_commands == ["world"]
    assert "hello" in ok("--help").stdout
    assert "command worq hello" in ok("plugins").stdout


def test_a_plugin_command_never_shadows_worqs_own(plugin_commands: list[str]) -> None:
    result = run("stats", "--help")
    assert result.exit_code == 0
    assert "MODULE:ATTR" in result.stdout
    assert plugin_commands == []
    assert "command worq stats (shadowed by worq's own: left out)" in ok("plugins").stdout


# -- the operator's commands on a broker URL alone ---------------------------------------------

SHARED = "memory://operator"
"""A memory URL that the `shared` fixture maps onto the test app's own broker and storage."""


@pytest.fixture
def shared(app: Worq, monkeypatch: pytest.MonkeyPatch) -> str:
    """``SHARED``: a bare ``Worq`` on it (any user or password) reads the test app's broker.

    The memory broker lives in one process and a URL makes a fresh one, so this stands in for
    a URL two processes share (tests/redis has the real cross-process check).
    """
    from worq_memory import MemoryBroker, MemoryStorage

    broker, storage = app.broker, app.storage
    make_broker, make_storage = MemoryBroker.from_url.__func__, MemoryStorage.from_url.__func__  # type: ignore[attr-defined]

    def same_broker(cls: type[MemoryBroker], url: str) -> MemoryBroker:
        return broker if urlsplit(url).hostname == "operator" else make_broker(cls, url)  # type: ignore[return-value]

    def same_storage(cls: type[MemoryStorage], url: str) -> MemoryStorage:
        return storage if urlsplit(url).hostname == "operator" else make_storage(cls, url)  # type: ignore[return-value]

    monkeypatch.setattr(MemoryBroker, "from_url", classmethod(same_broker))
    monkeypatch.setattr(MemoryStorage, "from_url", classmethod(same_storage))
    return SHARED


def next_page(output: str) -> list[str] | None:
    """The arguments of the `next page: worq ...` hint, or ``None`` on the last page."""
    hints = [line for line in output.splitlines() if line.startswith("next page: ")]
    if not hints:
        return None
    (hint,) = hints
    words = shlex.split(hint.removeprefix("next page: "))
    assert words[0] == "worq"
    return words[1:]


@pytest.mark.parametrize(
    "args",
    [
        ("--broker", SHARED, "stats"),
        ("stats", "--broker", SHARED),
    ],
)
def test_stats_on_a_broker_url_alone(app_module: ModuleType, shared: str, args: list[str]) -> None:
    app_module.add.enqueue_many([(1, 2), (3, 4)])
    app_module.ping.enqueue()

    output = ok(*args).stdout

    assert row(output, "default") == ["default", "2", "0", "0", "0"]
    assert row(output, "other") == ["other", "1", "0", "0", "0"]


def test_stats_takes_the_broker_from_worq_broker(app_module: ModuleType, shared: str) -> None:
    app_module.add.enqueue(1, 2)

    result = run("stats", env={"WORQ_BROKER": shared})

    assert result.exit_code == 0, result.output
    assert row(result.stdout, "default")[1] == "1"


def test_jobs_lists_tasks_and_arguments_as_stored(app_module: ModuleType, shared: str) -> None:
    added = app_module.add.enqueue(2, 40)
    greeted = app_module.greet.enqueue("ada", punctuation="?")
    later = app_module.add.options(delay=3600).enqueue(5, 6)

    queued = ok("jobs", "--broker", shared, "--state", "queued").stdout
    cells = row(queued, added.id)
    assert cells[1:4] == ["default", "add", "0"]
    assert cells[4].startswith(time.strftime("%Y-%m-%d")[:4]), "the time it was enqueued"
    assert cells[5] == "(2, 40)"
    assert row(queued, greeted.id)[2] == "greet"
    assert row(queued, greeted.id)[5] == '("ada", punctuation="?")'
    assert later.id not in queued
    assert next_page(queued) is None

    scheduled = ok("jobs", "--broker", shared, "--state", "scheduled").stdout
    assert "due" in scheduled
    assert row(scheduled, later.id)[5] == "(5, 6)"
    assert added.id not in scheduled


def test_jobs_truncates_long_arguments_and_json_gives_them_whole(
    app_module: ModuleType, shared: str
) -> None:
    name = "x" * 500
    job = app_module.greet.enqueue(name)

    cells = row(ok("jobs", "--broker", shared, "-s", "queued").stdout, job.id)
    assert cells[5].endswith("\u2026")
    assert len(cells[5]) == 60

    (line,) = ok("jobs", "--broker", shared, "-s", "queued", "--json").stdout.splitlines()
    entry = json.loads(line)
    assert (entry["id"], entry["task"], entry["args"]) == (job.id, "greet", [name])
    assert entry["status"] == "queued"


def test_jobs_dead_of_one_task_show_the_reason(app_module: ModuleType, shared: str) -> None:
    (boomed,) = dead_letter(app_module)
    failed = app_module.boom_after.enqueue(7)
    drain(app_module.app)

    output = ok("jobs", "--broker", shared, "--state", "dead", "--task", "boom_after").stdout

    cells = row(output, failed.id)
    assert cells[2:4] == ["boom_after", "1"]
    assert cells[5] == "(7)"
    assert "RuntimeError: kaboom after 7" in cells[6]
    assert boomed not in output


def test_jobs_of_given_queues(app_module: ModuleType, app: Worq) -> None:
    pinged = app_module.ping.enqueue()
    added = app_module.add.enqueue(1, 1)
    elsewhere = app_module.add.options(queue="third").enqueue(2, 2)

    only_other = ok("jobs", APP, "-s", "queued", "--queue", "other").stdout
    assert pinged.id in only_other
    assert added.id not in only_other

    both = ok("jobs", APP, "-s", "queued", "-q", "other", "-q", "third").stdout
    assert {pinged.id, elsewhere.id} <= set(both.split())
    assert added.id not in both
    assert ok("jobs", APP, "-s", "queued", "-q", "other,third").stdout.count("│ add") == 1


def test_jobs_pages_through_250_jobs_showing_each_once(app_module: ModuleType, shared: str) -> None:
    # Two tasks interleaved: the --task filter must page correctly too.
    wanted = []
    for i in range(250):
        wanted.append(app_module.add.enqueue(i, i).id)
        if i % 2:
            app_module.greet.enqueue(str(i))

    def all_pages(*first: str) -> tuple[list[str], int]:
        seen: list[str] = []
        args: list[str] | None = list(first)
        pages = 0
        while args is not None:
            result = ok(*args)
            seen += [json.loads(line)["id"] for line in result.stdout.splitlines()]
            args = next_page(result.stderr)
            pages += 1
            assert pages < 10, "the cursor does not advance"
        return seen, pages

    seen, pages = all_pages(
        "--broker", shared, "jobs", "-s", "queued", "--task", "add", "--limit", "100", "--json"
    )
    assert seen == wanted
    assert pages == 3

    table = ok("jobs", "--broker", shared, "-s", "queued", "--limit", "100").stdout
    follow = next_page(table)
    assert follow is not None
    assert follow[follow.index("--cursor") - 2 : follow.index("--cursor")] == ["--limit", "100"]
    assert follow[follow.index("--broker") + 1] == shared


def test_the_next_page_hint_hides_a_password(app_module: ModuleType, shared: str) -> None:
    app_module.add.enqueue_many([(1, 1), (2, 2)])
    secret = shared.replace("memory://", "memory://ops:s3cret@")

    output = ok("jobs", "--broker", secret, "-s", "queued", "--limit", "1").stdout

    assert "s3cret" not in output
    assert "ops:***@" in output


def test_jobs_with_a_bad_cursor_is_one_line(app: Worq) -> None:
    assert_one_line_error(run("jobs", APP, "-s", "queued", "--cursor", "junk"), "cursor")


def test_jobs_on_a_broker_that_cannot_list_is_one_line(
    app: Worq, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worq_core import Capability

    monkeypatch.setattr(
        type(app.broker), "capabilities", type(app.broker).capabilities - {Capability.LISTING}
    )

    assert_one_line_error(run("jobs", APP, "-s", "dead"), "listing", "memory broker")


def test_job_by_id_on_a_broker_url_alone_shows_task_and_arguments(
    app_module: ModuleType, shared: str
) -> None:
    job = app_module.greet.enqueue("ada", punctuation="?")

    output = ok("job", "--broker", shared, job.id).stdout

    assert "status: queued" in output
    assert "task:   greet" in output
    assert 'args:   ("ada", punctuation="?")' in output

    drain(app_module.app)
    assert 'result: "hello ada?"' in ok("--broker", shared, "job", job.id).stdout


def test_job_with_the_app_first_still_works(app_module: ModuleType) -> None:
    job = app_module.add.enqueue(1, 2)

    assert "task:   add" in ok("job", APP, job.id).stdout


def test_job_with_only_an_app_asks_for_the_job_id(app: Worq) -> None:
    assert_one_line_error(run("job", APP), "Missing argument 'JOB_ID'")


def test_job_with_three_values_is_one_line(app: Worq) -> None:
    assert_one_line_error(run("job", APP, "a", "b"), "expected [MODULE:ATTR] JOB_ID")


def test_an_app_shaped_id_on_a_broker_alone_is_explained(shared: str) -> None:
    assert_one_line_error(run("job", "--broker", shared, APP), "unknown", "give it before the id")


def test_dlq_on_a_broker_url_alone(app_module: ModuleType, app: Worq, shared: str) -> None:
    first, second, third = dead_letter(app_module, 3)

    assert row(ok("--broker", shared, "dlq", "list").stdout, first)[1] == "boom"

    requeued = ok("--broker", shared, "dlq", "requeue", first, second).stdout
    assert "requeued 2 jobs" in requeued
    assert app.job(first).status() is JobStatus.QUEUED
    assert app.job(third).status() is JobStatus.DEAD

    assert "purged 1 dead job " in ok("dlq", "purge", "--broker", shared, "--yes").stdout
    assert app.broker.stats(["default"])[0].dead == 0


def test_dlq_requeue_takes_an_app_shaped_first_value_as_the_app(app_module: ModuleType) -> None:
    first, second = dead_letter(app_module, 2)

    assert "requeued 1 job " in ok("dlq", "requeue", APP, second).stdout
    assert app_module.app.job(first).status() is JobStatus.DEAD


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["jobs", "--state", "dead"],
        ["job", "some-id"],
        ["dlq", "list"],
        ["dlq", "requeue", "some-id"],
        ["dlq", "purge", "--yes"],
    ],
)
def test_without_app_or_broker_one_line_says_what_to_give(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORQ_BROKER", raising=False)
    assert_one_line_error(run(*args), "MODULE:ATTR", "--broker URL", "WORQ_BROKER")


@pytest.mark.parametrize("command", [["worker"], ["enqueue"], ["schedule"]])
def test_commands_that_need_task_code_still_need_the_app(command: list[str]) -> None:
    assert_one_line_error(run("--broker", SHARED, *command), "Missing argument 'MODULE:ATTR'")


@given(
    st.from_regex(r"[A-Za-z_]\w{0,8}(\.[A-Za-z_]\w{0,8}){0,2}", fullmatch=True),
    st.from_regex(r"[A-Za-z_]\w{0,8}(\.[A-Za-z_]\w{0,8}){0,2}", fullmatch=True),
)
def test_a_dotted_name_colon_dotted_name_is_an_app(module: str, attr: str) -> None:
    assert looks_like_app(f"{module}:{attr}")


@given(st.text(max_size=40))
def test_generated_job_ids_and_colon_free_text_are_never_an_app(text: str) -> None:
    assert not looks_like_app(text.replace(":", ""))
    assert not looks_like_app(uuid.uuid4().hex)
    assert not looks_like_app(f"{text}:1{text}")


def test_the_next_page_hint_leaves_worq_broker_in_the_environment(
    app_module: ModuleType, shared: str
) -> None:
    first, second = (app_module.add.enqueue(i, i).id for i in range(2))
    env = {"WORQ_BROKER": shared}

    page = run("jobs", "-s", "queued", "--limit", "1", env=env)
    follow = next_page(page.stdout)
    assert follow is not None
    assert "--broker" not in follow
    rest = run(*follow, env=env)

    assert [page.exit_code, rest.exit_code] == [0, 0], page.output + rest.output
    assert first in page.stdout
    assert second not in page.stdout
    assert second in rest.stdout
    # A full page cannot know that nothing follows: the next one is empty and the last.
    follow = next_page(rest.stdout)
    assert follow is not None
    end = run(*follow, env=env)
    assert "no queued jobs" in end.stdout
    assert next_page(end.stdout) is None
