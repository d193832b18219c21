"""What a worker imports: asyncio and multiprocessing only when it needs them.

asyncio costs a fresh interpreter tens of milliseconds, and so does multiprocessing; a worker
whose tasks are all sync, on a broker the lease keeper cannot share, needs neither (issue 13,
"fast start"). Each case runs in a fresh interpreter (this test process has imported both),
and counts only what was loaded after the interpreter's own start-up, so a site hook that
imports either does not count. It covers an app built by hand on the memory broker; the
``worq worker`` command also reads entry points, which load every installed plugin (worq-redis
brings redis-py, which imports asyncio itself).
"""

from __future__ import annotations

import json
import subprocess
import sys

APP = """
import json, sys
before = set(sys.modules)
from worq_core import Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_memory import MemoryBroker, MemoryStorage

# Built by hand, as an embedded app may be: entry points would load every installed plugin.
app = Worq(MemoryBroker(), storage=MemoryStorage(), serializer=MsgpackSerializer(),
           registry=Registry())

@app.task
def add(x: int, y: int) -> int:
    return x + y

{extra}
jobs = [add.enqueue(1, 2)] + [{more}]
app.worker().run(burst=True)
results = [job.result(timeout=10) for job in jobs]
loaded = sorted(m for m in ("asyncio", "multiprocessing") if m in set(sys.modules) - before)
print(json.dumps({{"results": results, "loaded": loaded}}))
"""


def run_app(extra: str = "", more: str = "") -> dict[str, list[object]]:
    code = APP.format(extra=extra, more=more)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, list[object]] = json.loads(done.stdout)
    return answer


def test_a_worker_of_sync_tasks_on_the_memory_broker_imports_neither() -> None:
    answer = run_app()
    assert answer["results"] == [3]
    assert answer["loaded"] == []


def test_an_async_task_brings_asyncio_in_and_runs() -> None:
    extra = "@app.task\nasync def twice(x: int) -> int:\n    return 2 * x\n"
    answer = run_app(extra, "twice.enqueue(21)")
    assert answer["results"] == [3, 42]
    assert answer["loaded"] == ["asyncio"]
