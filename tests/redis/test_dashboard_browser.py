"""The dashboard in a real browser (Debian's chromium driven by Playwright) on real Redis.

The dashboard runs as ``worq dashboard --broker URL`` with no app code; a ``worq worker``
process runs the jobs. The test reads the overview's counts against ``worq stats``, opens a dead
job whose arguments and error carry ``<script>``, requeues it with the button, and watches its
page turn to succeeded without a reload. With ``WORQ_DASHBOARD_SCREENSHOTS=DIR`` it saves the
dead job's page there (how the screenshots in ``docs/img`` are made).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_support import Runtime, free_port, stop

RUNTIME_APP = "dashboard_app"
HERE = Path(__file__).parent


def need(what: str, found: object) -> None:
    if found:
        return
    message = f"the browser test needs {what}"
    if os.environ.get("CI"):
        pytest.fail(message + " (under CI a missing browser is an error; .ci/run installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    need("Debian's chromium (apt-get install chromium)", chromium)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright (pip install playwright)", None)
        raise
    with sync_playwright() as playwright:
        # Root in a container has no user namespaces for chromium's sandbox.
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def worq(url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "worq_core", "--broker", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def stats_rows(output: str) -> dict[str, dict[str, str]]:
    """The queue rows of ``worq stats``' table: queue -> ready, scheduled, running, dead."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 5 and all(c.isdigit() for c in cells[1:]):
            rows[cells[0]] = dict(
                zip(("ready", "scheduled", "running", "dead"), cells[1:], strict=True)
            )
    return rows


@pytest.fixture
def dashboard(runtime: Runtime) -> Iterator[str]:
    port = free_port()
    command = ["-m", "worq_core", "--broker", runtime.url, "dashboard", "--refresh", "0.5"]
    proc = subprocess.Popen(
        [sys.executable, *command, "--port", str(port)],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "/api/overview", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.05)
    try:
        yield base
    finally:
        stop(proc)


def shoot(page: Any, name: str) -> None:
    folder = os.environ.get("WORQ_DASHBOARD_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"), full_page=True)


def test_an_operator_requeues_a_dead_job_from_the_browser_and_sees_it_succeed(
    runtime: Runtime, dashboard: str, browser: Any
) -> None:
    app = runtime.app()
    fragile = app.get_task("fragile").enqueue("<script>document.title='pwned-arg'</script>")
    app.get_task("add").enqueue_many([(i, i) for i in range(3)])
    worker = runtime.worker("--burst")
    assert worker.wait(60) == 0, worker.communicate()[1]
    assert fragile.status().value == "dead"
    app.get_task("add").enqueue_many([(i, 1) for i in range(5)])
    app.get_task("add").options(delay=3600).enqueue(1, 2)
    app.get_task("report").enqueue("weekly")

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))

    # The overview's counts are what `worq stats` says, queue by queue.
    page.goto(dashboard + "/")
    shown = {
        row.get_attribute("data-queue"): {
            cell.get_attribute("data-count"): cell.inner_text()
            for cell in row.query_selector_all("[data-count]")
        }
        for row in page.query_selector_all("tr[data-queue]")
    }
    assert shown == stats_rows(worq(runtime.url, "stats"))
    assert shown["default"] == {"ready": "5", "scheduled": "1", "running": "0", "dead": "1"}
    assert shown["reports"] == {"ready": "1", "scheduled": "0", "running": "0", "dead": "0"}

    # Dead letters -> the queue's dead jobs -> the job's page.
    page.click("nav >> text=Dead letters")
    page.click("tr[data-queue=default] >> text=list")
    page.click(f"a[href='/job/{fragile.id}']")
    assert page.inner_text("#job-status").startswith("dead")
    error = page.inner_text("#job-error")
    assert "<script>document.title='pwned'</script>" in error  # shown as text, never run
    assert "<script>document.title='pwned-arg'</script>" in page.inner_text("#job-args")
    assert "pwned" not in page.title()
    shoot(page, "job")

    # Fix the cause, requeue from the page, and watch it succeed in place.
    runtime.client.set(f"{runtime.log}:fixed", 1)
    page.click("button[data-action=requeue]")
    page.wait_for_selector(".notice >> text=requeued 1 job")
    page.evaluate("window.__sameDocument = true")
    worker = runtime.worker()  # not --burst: the delayed job would keep it waiting
    page.wait_for_selector("#job-status .status-succeeded", timeout=30_000)
    assert page.evaluate("window.__sameDocument") is True  # updated without a reload
    stop(worker)
    assert "fixed:" in page.inner_text("#job-result")
    assert fragile.result(timeout=5).startswith("fixed:")
    assert dialogs == []  # no script of a job's ever ran an alert
    assert "pwned" not in page.title()
    page.close()
