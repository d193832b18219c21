"""The app the Sentinel failover test runs with ``worq worker ha_app:app``.

WORQ_HA_URL is the broker URL (``redis+sentinel://...?prefix=...``, maybe ``&wait_replicas=``);
each run of a job is recorded on the shared test server, outside the servers that fail over:
an RPUSH of its number to the list WORQ_HA_LEDGER at WORQ_HA_LEDGER_URL.
"""

from __future__ import annotations

import os

import redis

from worq_core import RetryPolicy, Worq

URL = os.environ["WORQ_HA_URL"]
LEDGER = os.environ["WORQ_HA_LEDGER"]

app = Worq(URL)
_ledger = redis.Redis.from_url(os.environ["WORQ_HA_LEDGER_URL"])


@app.task(name="ha", queue="ha", max_retries=100, retry=RetryPolicy(base=0.05))
def ha(n: int) -> None:
    _ledger.rpush(LEDGER, n)
