"""Tracing across processes: the test enqueues, a `worq worker` process runs, one trace results.

Both sides export their spans as JSON lines (``otel_app``); the worker is a real subprocess on
the real Redis, so the trace context crosses a process boundary only inside the job's headers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from redis_support import Runtime, stop

RUNTIME_APP = "otel_app"


def read_spans(directory: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        found.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return found


def wait_for_spans(directory: Path, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every span once ``count`` consumer spans have been exported (with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        found = read_spans(directory)
        if sum(span["kind"] == "CONSUMER" for span in found) >= count:
            return found
        assert time.monotonic() < deadline, f"only these spans arrived: {found}"
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_producer_and_worker_processes_export_spans_of_one_trace(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORQ_OTEL_SPANS", str(tmp_path))
    app = runtime.app()
    greeting = app.tasks["greet"].enqueue("world")
    flaky = app.tasks["flaky"].enqueue()
    fan_out = app.tasks["fan_out"].enqueue(2)
    worker = runtime.worker("--queues", "otel", "--concurrency", "2")
    assert greeting.result(timeout=30) == "hello world"
    assert flaky.result(timeout=30) == 2
    children = fan_out.result(timeout=30)
    # greet, two attempts of flaky, fan_out and its two children
    found = wait_for_spans(tmp_path, 6)
    log = stop(worker)
    assert worker.returncode == 0, log[-3000:]

    assert {s["pid"] for s in found if s["kind"] == "CONSUMER"} == {worker.pid}
    assert {s["pid"] for s in found if s["kind"] == "PRODUCER"} == {os.getpid(), worker.pid}

    def of(kind: str, job_id: str) -> list[dict[str, Any]]:
        return [
            s
            for s in found
            if s["kind"] == kind and s["attributes"]["messaging.message.id"] == job_id
        ]

    for job in (greeting, flaky, fan_out):
        [send] = of("PRODUCER", job.id)
        assert send["name"] == "send otel"
        assert send["pid"] != worker.pid, "sent by the test process"
        runs = of("CONSUMER", job.id)
        assert runs, f"no process span for {job.id}"
        for run in runs:
            assert run["name"] == "process otel"
            assert run["trace_id"] == send["trace_id"]
            assert run["parent_id"] == send["span_id"]

    attempts = sorted(of("CONSUMER", flaky.id), key=lambda s: s["attributes"]["worq.job.attempt"])
    assert [a["attributes"]["worq.job.outcome"] for a in attempts] == ["retrying", "succeeded"]
    assert "worq.job.retry" in attempts[0]["events"]

    # Jobs a task sends are sent from the worker, inside the run that sent them.
    [fan_out_run] = of("CONSUMER", fan_out.id)
    for child in children:
        [send] = of("PRODUCER", child)
        assert send["pid"] == worker.pid
        assert send["parent_id"] == fan_out_run["span_id"]
        [run] = of("CONSUMER", child)
        assert run["parent_id"] == send["span_id"]
        assert run["trace_id"] == fan_out_run["trace_id"]
