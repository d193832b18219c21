"""Schedules, unique jobs and rate limits across real `worq worker` processes on real Redis.

Every process is the test's own child, stopped (or SIGKILLed) by its pid; the ledgers live in
Redis lists under the test's key prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis_support import Runtime, stop

HERE = Path(__file__).parent


RUNTIME_APP = "scheduling_app"
"""The app module the ``runtime`` fixture runs."""


@pytest.mark.timeout(120)
def test_three_workers_fire_each_tick_once_and_go_on_after_one_is_killed(
    runtime: Runtime,
) -> None:
    workers = [runtime.worker("--queues", "sched", "--concurrency", "2") for _ in range(3)]
    deadline = time.monotonic() + 60
    while not runtime.ledger("ticks"):  # every worker has started its scheduler
        assert time.monotonic() < deadline, [w.poll() for w in workers]
        time.sleep(0.1)
    started_at = time.time()
    time.sleep(10.0)  # three schedulers race for every tick
    os.kill(workers[0].pid, signal.SIGKILL)  # mid-run: between ticks, or in the middle of one
    workers[0].communicate(timeout=10)
    killed_at = time.time()
    time.sleep(5.0)
    for worker in workers[1:]:
        log = stop(worker)
        assert worker.returncode == 0, log[-3000:]
    entries = [entry.decode().split() for entry in runtime.ledger("ticks")]
    ticks = [float(tick) for tick, _ in entries]
    assert len(ticks) == len(set(ticks)), f"a tick fired twice: {sorted(ticks)}"
    ticks.sort()
    first, last = ticks[0], ticks[-1]
    assert ticks == [first + n for n in range(len(ticks))], "every second fired, none missed"
    with_three = [t for t in ticks if started_at <= t < started_at + 10]
    assert len(with_three) >= 9, "a 1-second schedule ticked through the 10 s with three workers"
    assert last >= killed_at + 3, "the schedule went on after a worker was SIGKILLed"
    runners = {pid for _, pid in entries}
    print(
        f"\nschedule: {len(ticks)} ticks over {last - first:.0f}s, each fired once, "
        f"run by {len(runners)} worker processes"
    )


PRODUCER = """
import json, os, random, sys
sys.path.insert(0, {here!r})
import scheduling_app
keys = list(range(50)) * 4
random.Random(int(sys.argv[1])).shuffle(keys)
ids = {{}}
for key in keys:
    ids.setdefault(key, set()).add(scheduling_app.unique_job.enqueue(key).id)
print(json.dumps({{str(k): sorted(v) for k, v in ids.items()}}))
"""


@pytest.mark.timeout(120)
def test_four_producers_racing_on_unique_keys_add_one_job_per_key(runtime: Runtime) -> None:
    env = dict(os.environ, WORQ_RUNTIME_URL=runtime.url, WORQ_RUNTIME_LOG=runtime.log)
    code = PRODUCER.format(here=str(HERE))
    producers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(seed)], env=env, stdout=subprocess.PIPE, text=True
        )
        for seed in range(4)
    ]
    seen: dict[str, set[str]] = {}
    for producer in producers:
        out, _ = producer.communicate(timeout=60)
        assert producer.returncode == 0
        for key, ids in json.loads(out).items():
            seen.setdefault(key, set()).update(ids)
    assert len(seen) == 50
    assert all(len(ids) == 1 for ids in seen.values()), "every enqueue got the one job's handle"
    app = runtime.app()
    [stats] = app.broker.stats(["unique"])
    assert stats.ready == 50


@pytest.mark.timeout(120)
def test_a_rate_limit_holds_across_three_workers_and_spares_the_unlimited_task(
    runtime: Runtime,
) -> None:
    rate, burst, seconds = 20, 20, 10.0
    app = runtime.app()
    # Limited and unlimited jobs interleaved in one queue, more of each than 10 s can take.
    for _ in range(5):
        app.tasks["limited"].enqueue_many([(n,) for n in range(100)])
        app.tasks["unlimited"].enqueue_many([(n,) for n in range(400)])
    workers = [runtime.worker("--queues", "mixed", "--concurrency", "4") for _ in range(3)]
    deadline = time.monotonic() + 60
    while not runtime.ledger("limited"):
        assert time.monotonic() < deadline, [w.poll() for w in workers]
        time.sleep(0.05)
    time.sleep(seconds)
    for worker in workers:
        stop(worker)
    starts = sorted(float(t) for t in runtime.ledger("limited"))
    first = starts[0]
    window = [t for t in starts if t < first + seconds]
    allowed = rate * seconds * 1.05 + burst
    print(
        f"\nrate 20/s, burst {burst}, 3 workers: {len(window)} limited starts in {seconds:.0f}s "
        f"(at most {allowed:.0f} allowed); unlimited done: "
        f"{int(runtime.client.get(f'{runtime.log}:unlimited') or 0)}"
    )
    assert len(window) <= allowed
    assert len(window) >= rate * seconds * 0.95, "the limiter lets the full rate through"
    assert int(runtime.client.get(f"{runtime.log}:unlimited") or 0) == 2000, (
        "the unlimited jobs behind the limited ones all ran"
    )
