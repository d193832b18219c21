"""What ``wait_replicas`` costs per job, through Sentinel, against a raw redis-py floor.

    python bench/sentinel_bench.py            # 5,000 jobs per figure
    python bench/sentinel_bench.py --jobs 1000 --json out.json

Starts its own master, replica and three sentinels on loopback ports 17040-17044 (the servers
of tests/redis/ha_support.py) in a temporary directory, stops them by pid at the end. Every
figure is a rate (jobs per second, one job per call, as a producer or a one-job-at-a-time
worker sends them) and its ratio to the floor measured in the same run: a plain ``LPUSH`` per
item to the master, one round trip each; the replicated floor adds a ``WAIT 1`` to each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "redis"))
from ha_support import HOST, SentinelSet

from worq_core.models import Message, Outcome, Settlement
from worq_redis import RedisBroker

BASE = 17040


def rate(jobs: int, run: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    run()
    return jobs / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    jobs: int = options.jobs
    with tempfile.TemporaryDirectory() as folder:
        servers = SentinelSet(Path(folder), BASE)
        try:
            rows = measure(servers, jobs)
        finally:
            servers.stop()
    floor = rows["floor: LPUSH"]
    print(f"{'figure':40} {'jobs/s':>10} {'ratio':>7} {'us/job':>8}")
    for name, value in rows.items():
        print(f"{name:40} {value:10.0f} {value / floor:7.3f} {1e6 / value:8.1f}")
    added = 1e6 / rows["enqueue, wait_replicas=1"] - 1e6 / rows["enqueue"]
    added_settle = 1e6 / rows["settle+fetch, wait_replicas=1"] - 1e6 / rows["settle+fetch"]
    print(f"wait_replicas=1 adds {added:.1f} us per enqueue, {added_settle:.1f} us per settle")
    if options.json:
        options.json.write_text(json.dumps({"jobs": jobs, "rates": rows}, indent=2))


def measure(servers: SentinelSet, jobs: int) -> dict[str, float]:
    raw = redis.Redis(HOST, servers.master_port)
    rows: dict[str, float] = {}

    def lpush() -> None:
        for n in range(jobs):
            raw.lpush("bench:floor", n)

    def lpush_wait() -> None:
        for n in range(jobs):
            pipe = raw.pipeline(transaction=False)
            pipe.lpush("bench:floor", n)
            pipe.wait(1, 1000)
            pipe.execute()

    rows["floor: LPUSH"] = rate(jobs, lpush)
    rows["floor: LPUSH + WAIT 1"] = rate(jobs, lpush_wait)
    raw.delete("bench:floor")
    for wait in (0, 1):
        suffix = f", wait_replicas={wait}" if wait else ""
        broker = RedisBroker(servers.url(query=f"prefix=bench{wait}"), wait_replicas=wait)
        messages = [Message(id=f"j{n}", queue="b", body=b"x") for n in range(jobs)]

        def enqueue(broker: RedisBroker = broker, messages: list[Message] = messages) -> None:
            for message in messages:
                broker.enqueue([message])

        rows[f"enqueue{suffix}"] = rate(jobs, enqueue)

        def work(broker: RedisBroker = broker) -> None:
            settle: list[Settlement] = []
            for _ in range(jobs):
                _, got = broker.settle_and_fetch(settle, ["b"], 1, lease=30, wait=0)
                settle = [Settlement(d, Outcome.ACK) for d in got]
            broker.settle(settle)

        rows[f"settle+fetch{suffix}"] = rate(jobs, work)
        for key in broker.client.scan_iter(match=f"bench{wait}:*"):
            broker.client.delete(key)
        broker.close()
    raw.close()
    return rows


if __name__ == "__main__":
    main()
