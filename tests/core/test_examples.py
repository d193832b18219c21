"""The examples keep working: each runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str) -> list[str]:
    """Run ``examples/<name>/app.py`` as a user would; its output lines."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name / "app.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_basic_example_runs_every_kind_of_job() -> None:
    assert run_example("basic") == [
        "add: 5",
        "enqueue_many: [0, 2, 4, 6, 8]",
        "async: HELLO",
        "delayed: 30",
        "retried, succeeded on attempt 3",
        "dead-lettered: ValueError this one always fails (dead)",
    ]


def test_the_scheduling_example_keeps_its_promises() -> None:
    assert run_example("scheduling") == [
        "unique: same job",
        "rebuilt users",
        "crawl: at most 2 at once",
        "call_api: 5 calls over 0.4 s or more",
        "beat: each tick fired once",
        "schedules: __main__.beat, __main__.morning_report",
    ]


def test_the_workflows_example_passes_results_along() -> None:
    assert run_example("workflows") == [
        "chain: stored 24 bytes",
        "group: [0, 1, 4, 9, 16]",
        "chord: sum of squares: 285",
        "chord status: succeeded",
    ]


def test_the_dashboard_example_serves_a_busy_app() -> None:
    assert run_example("dashboard", "--seconds", "3", "--port", "0") == [
        "dashboard: running",
        "workers: 1",
        "jobs finished: yes",
        "queues: default, reports",
    ]
