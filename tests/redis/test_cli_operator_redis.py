"""`worq stats`, `worq jobs` and `worq dlq` on real Redis with only the broker URL.

The producer (this test) enqueues through an app whose tasks the `worq` process cannot import:
it runs in an empty directory with no path to this module, so what it shows (task names and
arguments) comes from what Redis holds.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from redis_support import delete_prefix, new_prefix

from worq_core import WorkerSettings, Worq
from worq_core.cli import main


@pytest.fixture
def url(real_redis_url: str) -> Iterator[str]:
    """A broker URL with a key prefix of this test's own; its keys are deleted afterwards."""
    prefix = new_prefix()
    yield f"{real_redis_url}?prefix={prefix}"
    client = redis.Redis.from_url(real_redis_url)
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def app(url: str) -> Iterator[Worq]:
    app = Worq(url)

    @app.task(name="reports.build", max_retries=0)
    def build(day: str, *, pages: int = 1) -> None:
        raise ValueError(f"no data for {day}")

    @app.task(name="mail.send", queue="mail")
    def send(to: str) -> None:
        """Never run here: its jobs stay queued."""

    yield app
    app.close()


def worq(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`worq ARGS` in another process, in an empty directory: it cannot import the app."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORQ_BROKER")}
    return subprocess.run(
        [sys.executable, "-m", "worq_core", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cells(output: str, first: str) -> list[str]:
    for line in output.splitlines():
        parts = [part.strip() for part in line.split("│")[1:-1]]
        if parts and parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r} in:\n{output}")


def test_another_process_shows_what_the_app_enqueued_from_the_url_alone(
    app: Worq, url: str, tmp_path: Path
) -> None:
    dead = [app.enqueue("reports.build", [f"2026-01-0{i}"], {"pages": i}) for i in (1, 2)]
    app.worker(
        settings=WorkerSettings(queues=("default",), idle_wait=0.05, handle_signals=False)
    ).run(burst=True)
    mailed = app.enqueue("mail.send", ["ops@example.com"])

    stats = worq(tmp_path, "--broker", url, "stats")
    assert stats.returncode == 0, stats.stderr
    assert cells(stats.stdout, "default") == ["default", "0", "0", "0", "2"]
    assert cells(stats.stdout, "mail") == ["mail", "1", "0", "0", "0"]

    listed = worq(tmp_path, "jobs", "--broker", url, "--state", "dead", "--task", "reports.build")
    assert listed.returncode == 0, listed.stderr
    for number, job in enumerate(dead, 1):
        row = cells(listed.stdout, job.id)
        assert row[2:4] == ["reports.build", "1"]
        assert row[5] == f'("2026-01-0{number}", pages={number})'
        assert f"ValueError: no data for 2026-01-0{number}" in row[6]
    assert mailed.id not in listed.stdout

    shown = worq(tmp_path, "--broker", url, "job", mailed.id)
    assert shown.returncode == 0, shown.stderr
    assert "task:   mail.send" in shown.stdout
    assert 'args:   ("ops@example.com")' in shown.stdout

    requeued = worq(tmp_path, "--broker", url, "dlq", "requeue", dead[0].id)
    assert requeued.returncode == 0, requeued.stderr
    assert app.broker.stats(["default"])[0].dead == 1

    # The import the app would need really is out of reach of that process.
    missing = worq(tmp_path, "--broker", url, "stats", f"{__name__}:app")
    assert missing.returncode == 1
    assert "no such module" in missing.stderr


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_paging_through_250_jobs_100_at_a_time_shows_each_once(app: Worq, url: str) -> None:
    wanted = [app.enqueue("mail.send", [f"user{i}@example.com"]).id for i in range(250)]

    seen: list[str] = []
    args: list[str] | None = ["jobs", "--broker", url, "-s", "queued", "--limit", "100", "--json"]
    pages = []
    while args is not None:
        result = run(*args)
        page = [json.loads(line) for line in result.stdout.splitlines()]
        pages.append(len(page))
        seen += [entry["id"] for entry in page]
        hint = result.stderr.strip()
        args = shlex.split(hint.removeprefix("next page: "))[1:] if hint else None
        assert len(pages) < 10, "the cursor does not advance"

    assert pages == [100, 100, 50]
    assert seen == wanted
