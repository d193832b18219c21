"""The app the cluster benchmark's worker processes run (``cluster_bench.py``).

``WORQ_BENCH_URL`` is the ``redis+cluster://`` URL with its ``?prefix=``.
"""

from __future__ import annotations

import os

from worq_core import Worq

app = Worq(os.environ["WORQ_BENCH_URL"])


@app.task(name="noop", queue="q0")
def noop() -> None:
    """A no-op job: the figure is the queues' cost, not the task's."""
