"""One slow job enqueued at import time; it announces its start on stdout.

Used to send SIGTERM to a `worq worker` subprocess while the job runs.
"""

from __future__ import annotations

import time

from worq_core import Worq

app = Worq()


@app.task(name="slow")
def slow() -> str:
    print("job started", flush=True)
    time.sleep(0.5)  # the job's own work, still running when the test sends SIGTERM
    print("job finished", flush=True)
    return "done"


slow.enqueue()
