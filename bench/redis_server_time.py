"""Where the Redis server's time per job goes in worq-redis' scripts, from INFO commandstats.

    python bench/redis_server_time.py              # 16,000 jobs, batches of 1, 16 and 64
    python bench/redis_server_time.py --jobs 32000 --batches 8,16,32

A drain's speed at concurrency 1 is the worker's time plus the scripts' time, one after the
other; this script measures the second part alone, as server CPU per job rather than jobs per
second, so it changes little when the machine is noisy. It drives the broker directly (no worker
process): ``enqueue_many`` in calls of 1,000, fetches of B jobs under a worker record (as a
worker whose lease keeper renews by worker fetches), acknowledgements of B jobs with their result
records, and a worker's steady state (B acknowledgements and a fetch of B in one call). For each
it reports the scripts' microseconds per job, the part spent in the Redis commands they call, and
the rest: Lua and the script call itself. Two fixed costs come first, per call rather than per
job: an ``EVALSHA`` of ``return 1``, and ``settle_fetch`` with nothing to settle or fetch.

The figures are differences of ``INFO commandstats`` before and after each step (no
``CONFIG RESETSTAT``), so they are only clean on a Redis nobody else uses meanwhile. Keys live
under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable, Sequence

import redis

from worq_core import Task, Worq
from worq_core.job import encode_success
from worq_core.models import Delivery, Outcome, Settlement
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisStorage, lua

QUEUE = "timed"
BY = {"worker": "server-time:1"}
"""Fetches record their leases under a worker, as a worker whose lease keeper renews by worker."""
Stats = dict[str, tuple[int, int]]  # command -> (calls, microseconds)
SCRIPTS = ("evalsha", "eval")
NOT_FROM_SCRIPTS = ("multi", "exec", "script|load", "select", "hello", "client|setinfo", "ping")
"""Commands the client itself sends around the scripts (connections, loading, transactions)."""


def command_stats(client: redis.Redis) -> Stats:
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for name, v in info.items()}


def measured(client: redis.Redis, step: Callable[[], object]) -> Stats:
    """What ``step`` cost the server, command by command (the scripts' own calls included)."""
    before = command_stats(client)
    step()
    after = command_stats(client)
    spent: Stats = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0 and name != "info":
            spent[name] = (calls - calls0, usec - usec0)
    return spent


def row(label: str, spent: Stats, jobs: int) -> str:
    scripts = sum(usec for name, (_, usec) in spent.items() if name in SCRIPTS)
    calls = sum(n for name, (n, _) in spent.items() if name in SCRIPTS)
    nested = {
        name: usec
        for name, (_, usec) in spent.items()
        if name not in SCRIPTS and name not in NOT_FROM_SCRIPTS
    }
    inner = sum(nested.values())
    top = ", ".join(
        f"{name} {usec / jobs:.2f}"
        for name, usec in sorted(nested.items(), key=lambda x: -x[1])[:6]
    )
    return (
        f"| {label} | {calls:,} | {scripts / jobs:.2f} | {inner / jobs:.2f} | "
        f"{(scripts - inner) / jobs:.2f} | {top} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="default redis://127.0.0.1:6379/DB")
    parser.add_argument("--db", type=int, default=int(os.environ.get("WORQ_BENCH_REDIS_DB", "10")))
    parser.add_argument(
        "--jobs", type=int, default=16_000, help="jobs per step, in thousands (default 16,000)"
    )
    parser.add_argument("--batches", default="1,16,64", help="jobs per fetch and settle call")
    args = parser.parse_args(argv)
    if args.jobs < 1000 or args.jobs % 1000:
        parser.error("--jobs takes a multiple of 1,000 (jobs are queued 1,000 per call)")
    url = args.url or f"redis://127.0.0.1:6379/{args.db}"
    prefix = f"server-time-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    broker = RedisBroker(url, prefix=prefix)
    storage = RedisStorage(url, prefix=prefix)
    app = Worq(broker, storage=storage, serializer=MsgpackSerializer(), registry=Registry())

    @app.task(name="noop", queue=QUEUE)
    def noop() -> None:
        """A job that is never run: only the broker's scripts are measured."""

    record = encode_success(app.serializer, None)
    lines = lua.source("settle_fetch").count("\n")
    print(f"Redis {client.info('server')['redis_version']} at {url}; {args.jobs:,} jobs a step")
    print(f"(settle_fetch is {lines:,} lines of Lua with its helpers; the first two rows are per")
    print("call, the others per job)\n")
    print(
        "| step | script calls | script µs/job | commands µs/job | Lua and call µs/job | "
        "top commands µs/job |"
    )
    print("|---|---:|---:|---:|---:|---|")
    try:
        fixed(client, broker)
        enqueues(client, broker, noop, args.jobs)
        for batch in (int(b) for b in args.batches.split(",")):
            batches(client, broker, noop, record, args.jobs, batch)
    finally:
        broker.close()
        storage.close()
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    return 0


def enqueues(client: redis.Redis, broker: RedisBroker, task: Task[None], jobs: int) -> None:
    """``enqueue_many`` in calls of 1,000, then an eighth as many jobs one by one; then the
    queue is emptied, so that every batch size starts from the same depth."""
    spent = measured(client, lambda: [task.enqueue_many([()] * 1000) for _ in range(0, jobs, 1000)])
    print(row("enqueue_many, 1,000 per call", spent, jobs))
    ones = jobs // 8
    spent = measured(client, lambda: [task.enqueue() for _ in range(ones)])
    print(row("enqueue one by one", spent, ones))
    drain(broker, 1000)  # unmeasured


def drain(broker: RedisBroker, batch: int, record: bytes | None = None) -> None:
    """Empty the queue as a worker does: each call acknowledges the jobs of the last one (with
    ``record`` as their result) and fetches ``batch`` more."""
    ttl = 3600.0 if record is not None else 0.0
    held: list[Delivery] = []
    while True:
        acks = [Settlement(d, Outcome.ACK, record=record, ttl=ttl) for d in held]
        _, held = broker.settle_and_fetch(acks, [QUEUE], batch, lease=60.0, wait=0.0, **BY)
        if not held:
            return


def batches(
    client: redis.Redis, broker: RedisBroker, task: Task[None], record: bytes, jobs: int, batch: int
) -> None:
    """Queue ``jobs``, fetch every queued job ``batch`` at a time and acknowledge them as many at
    a time; then queue ``jobs`` more and drain them as a worker does (acknowledgements and fetch
    in one call)."""
    taken: list[Delivery] = []
    for _ in range(0, jobs, 1000):
        task.enqueue_many([()] * 1000)

    def fetch_all() -> None:
        while True:
            _, got = broker.settle_and_fetch([], [QUEUE], batch, lease=60.0, wait=0.0, **BY)
            if not got:
                return
            taken.extend(got)

    spent = measured(client, fetch_all)
    print(row(f"fetch, {batch} per call", spent, len(taken)))

    def ack_all() -> None:
        acks = [Settlement(d, Outcome.ACK, record=record, ttl=3600.0) for d in taken]
        for start in range(0, len(acks), batch):
            broker.settle(acks[start : start + batch])

    print(row(f"ack with result, {batch} per call", measured(client, ack_all), len(taken)))
    for _ in range(0, jobs, 1000):
        task.enqueue_many([()] * 1000)

    spent = measured(client, lambda: drain(broker, batch, record))
    print(row(f"settle and fetch, {batch} per call", spent, jobs))


def fixed(client: redis.Redis, broker: RedisBroker) -> None:
    """The cost of a script call itself, and of a steady-state call that finds nothing to do."""
    calls = 2000
    sha = client.script_load("return 1")
    spent = measured(client, lambda: [client.evalsha(sha, 0) for _ in range(calls)])
    print(row("`return 1`, per call", spent, calls))
    spent = measured(
        client,
        lambda: [
            broker.settle_and_fetch([], [QUEUE], 16, lease=60.0, wait=0.0, **BY)
            for _ in range(calls)
        ],
    )
    print(row("settle and fetch, nothing to do, per call", spent, calls))


if __name__ == "__main__":
    sys.exit(main())
