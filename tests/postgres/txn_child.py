"""A producer that enqueues inside a transaction, says so, and waits to be SIGKILLed.

Usage: python txn_child.py URL JOB_ID. Prints its backend pid once the job is written.
"""

from __future__ import annotations

import sys
import threading

import psycopg

from worq_core import Worq

url, job_id = sys.argv[1], sys.argv[2]
app = Worq(url)


@app.task(queue="txn-crash")
def charge(order: int) -> int:
    return order


with psycopg.connect(url.split("?")[0]) as conn:
    charge.options(connection=conn, job_id=job_id).enqueue(7)
    print(conn.info.backend_pid, flush=True)
    threading.Event().wait()  # never commits: the test kills this process here
