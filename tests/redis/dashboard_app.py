"""The app of the dashboard's browser test (``worq worker dashboard_app:app``; env settings).

``fragile`` fails until the test sets its flag key, so a job can die, be requeued from the
dashboard and then succeed.
"""

from __future__ import annotations

import os

import redis

from worq_core import Worq

URL = os.environ["WORQ_RUNTIME_URL"]
LOG = os.environ["WORQ_RUNTIME_LOG"]

app = Worq(URL)
_flags = redis.Redis.from_url(URL.partition("?")[0])


@app.task(name="fragile", max_retries=0)
def fragile(note: str) -> str:
    if not _flags.exists(f"{LOG}:fixed"):
        raise RuntimeError(f"not fixed yet: <script>document.title='pwned'</script> {note}")
    return f"fixed: {note}"


@app.task(name="add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="report", queue="reports")
def report(name: str) -> str:
    return name
