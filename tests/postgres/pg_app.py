"""The app that `worq worker` processes run in the PostgreSQL crash tests.

Its broker URL comes from ``WORQ_PG_APP_URL``. ``record`` writes one row per run into the
``runs`` table of the URL's schema (tag, pid) before it sleeps, so a test can tell which
process ran which job, and how often.
"""

from __future__ import annotations

import os
import time

import psycopg

from worq_core import RetryPolicy, Worq

URL = os.environ.get("WORQ_PG_APP_URL", "postgresql://postgres@127.0.0.1:5432/worq_pg_test")
SCHEMA = URL.rpartition("schema=")[2] or "worq"

app = Worq(URL)


@app.task(queue="pg-app", max_retries=5, retry=RetryPolicy(base=0.05, jitter=False))
def record(tag: str, seconds: float) -> str:
    with psycopg.connect(URL.split("?")[0], autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{SCHEMA}".runs VALUES (%s, %s)', (tag, os.getpid()))
    time.sleep(seconds)  # work in progress: the test SIGKILLs the worker meanwhile
    return tag
