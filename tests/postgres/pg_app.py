"""A small app for tests that start real `worq worker` processes on PostgreSQL.

Its broker URL comes from ``WORQ_PG_APP_URL`` (or ``--broker``).
"""

from __future__ import annotations

import os
import time

from worq_core import Worq

app = Worq(os.environ.get("WORQ_PG_APP_URL", "postgresql://127.0.0.1/worq_pg_test"))


@app.task(queue="pg-app")
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="pg-app", max_retries=5)
def slow(seconds: float) -> float:
    time.sleep(seconds)  # the test SIGKILLs the worker while a job runs
    return seconds
