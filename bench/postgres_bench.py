"""Benchmark worq-postgres against procrastinate and pgqueuer, in one run, on one PostgreSQL.

    python bench/postgres_bench.py            # full run
    python bench/postgres_bench.py --quick    # smaller counts, under ~1 minute
    python bench/postgres_bench.py --json out.json

Figures: enqueue one job at a time and in bulk (jobs/s), drain no-op jobs at concurrency 1 and
8 (jobs/s), and pickup latency (enqueue to task start, one job at a time on an idle worker; p50
and p99 in ms). Each is also measured for a raw psycopg floor in the same run (a plain INSERT,
a multi-row INSERT, ``DELETE ... FOR UPDATE SKIP LOCKED`` in a loop, and a bare NOTIFY to a
LISTEN connection) and every library's figure is reported as a ratio to it, and worq's to each
rival. Everything lives in a database created for the run (``worq_pg_bench_<random>``) and
dropped at the end. ``WORQ_BENCH_POSTGRES_URL`` points at the server (default
``postgresql://postgres@127.0.0.1:5432/postgres``, used only to create and drop that database).

How each library runs: worq's worker runs in threads (its ``concurrency``), procrastinate's and
pgqueuer's on an asyncio loop (procrastinate's ``concurrency``; pgqueuer's ``batch_size``, its
unit of concurrent work). Tasks do nothing; worq keeps each job's result (its default),
procrastinate keeps each job's row (its default), pgqueuer logs each job (its default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

BASE = os.environ.get("WORQ_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass
class Figure:
    name: str  # what was measured
    system: str  # floor, worq, procrastinate, pgqueuer
    value: float  # jobs/s, or ms for latency
    unit: str


def db_url(name: str) -> str:
    return BASE.rsplit("/", 1)[0] + "/" + name


def timed(fn: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 * 1000, p99 * 1000


# -- the raw floor ---------------------------------------------------------------------------


def floor(url: str, one: int, bulk: int, drain: int, pickups: int) -> list[Figure]:
    figures = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE floor (id bigserial PRIMARY KEY, payload bytea NOT NULL)")
        spent = timed(
            lambda: [
                conn.execute("INSERT INTO floor (payload) VALUES (%s)", (b"x",)) for _ in range(one)
            ]
        )
        figures.append(Figure("enqueue one by one", "floor", one / spent, "jobs/s"))
        conn.execute("TRUNCATE floor")
        payloads = [b"x"] * bulk
        spent = timed(
            lambda: conn.execute(
                "INSERT INTO floor (payload) SELECT unnest(%s::bytea[])", (payloads,)
            )
        )
        figures.append(Figure("enqueue in bulk", "floor", bulk / spent, "jobs/s"))
    for concurrency in (1, 8):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE floor")
            conn.execute(
                "INSERT INTO floor (payload) SELECT unnest(%s::bytea[])", ([b"x"] * drain,)
            )

        def take() -> None:
            with psycopg.connect(url, autocommit=True) as own:
                while own.execute(
                    "DELETE FROM floor WHERE id = (SELECT id FROM floor ORDER BY id "
                    "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING payload"
                ).fetchone():
                    pass

        threads = [threading.Thread(target=take) for _ in range(concurrency)]
        begin = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        spent = time.perf_counter() - begin
        figures.append(
            Figure(f"drain, concurrency {concurrency}", "floor", drain / spent, "jobs/s")
        )
    # Pickup latency floor: a NOTIFY to a LISTEN connection, one at a time.
    samples = []
    with (
        psycopg.connect(url, autocommit=True) as listener,
        psycopg.connect(url, autocommit=True) as sender,
    ):
        listener.execute("LISTEN bench_floor")
        for _ in range(pickups):
            sent = time.perf_counter()
            sender.execute("NOTIFY bench_floor")
            for _note in listener.notifies(timeout=5, stop_after=1):
                samples.append(time.perf_counter() - sent)
    p50, p99 = percentiles(samples)
    figures += [
        Figure("pickup latency p50", "floor", p50, "ms"),
        Figure("pickup latency p99", "floor", p99, "ms"),
    ]
    return figures


# -- worq --------------------------------------------------------------------------------------


def bench_worq(url: str, one: int, bulk: int, drain: int, pickups: int) -> list[Figure]:
    from worq_core import Worq
    from worq_core.testing.support import running
    from worq_core.worker import WorkerSettings
    from worq_postgres import migrate

    broker_url = f"{url}?schema=worq"
    migrate(broker_url)
    app = Worq(broker_url)
    figures = []
    started: dict[int, float] = {}
    arrived = threading.Condition()

    @app.task(queue="bench")
    def noop(n: int) -> None:
        return None

    @app.task(queue="pickup")
    def pickup(n: int) -> None:
        with arrived:
            started[n] = time.perf_counter()
            arrived.notify_all()

    try:
        spent = timed(lambda: [noop.enqueue(n) for n in range(one)])
        figures.append(Figure("enqueue one by one", "worq", one / spent, "jobs/s"))
        spent = timed(lambda: noop.enqueue_many([(n,) for n in range(bulk)]))
        figures.append(Figure("enqueue in bulk", "worq", bulk / spent, "jobs/s"))
        app.worker(queues=["bench"], concurrency=8).run(burst=True)  # start each drain empty
        for concurrency in (1, 8):
            noop.enqueue_many([(n,) for n in range(drain)])
            worker = app.worker(queues=["bench"], concurrency=concurrency)
            spent = timed(lambda worker=worker: worker.run(burst=True))
            figures.append(
                Figure(f"drain, concurrency {concurrency}", "worq", drain / spent, "jobs/s")
            )
        settings = WorkerSettings(queues=("pickup",), concurrency=1, handle_signals=False)
        samples = []
        with running(app.worker(settings=settings)):
            time.sleep(0.5)  # let the worker go idle on its LISTEN before the first sample
            for n in range(pickups):
                sent = time.perf_counter()
                pickup.enqueue(n)
                with arrived:
                    arrived.wait_for(lambda n=n: n in started, timeout=10)
                samples.append(started[n] - sent)
        p50, p99 = percentiles(samples)
        figures += [
            Figure("pickup latency p50", "worq", p50, "ms"),
            Figure("pickup latency p99", "worq", p99, "ms"),
        ]
    finally:
        app.close()
    return figures


# -- procrastinate -----------------------------------------------------------------------------


async def bench_procrastinate(
    url: str, one: int, bulk: int, drain: int, pickups: int
) -> list[Figure]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    figures = []
    started: dict[int, float] = {}

    @app.task(name="noop", queue="bench")
    async def noop(n: int) -> None:
        return None

    @app.task(name="pickup", queue="pickup")
    async def pickup(n: int) -> None:
        started[n] = time.perf_counter()

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        begin = time.perf_counter()
        for n in range(one):
            await noop.defer_async(n=n)
        figures.append(
            Figure(
                "enqueue one by one", "procrastinate", one / (time.perf_counter() - begin), "jobs/s"
            )
        )
        begin = time.perf_counter()
        await noop.batch_defer_async(*({"n": n} for n in range(bulk)))
        figures.append(
            Figure(
                "enqueue in bulk", "procrastinate", bulk / (time.perf_counter() - begin), "jobs/s"
            )
        )
        await app.run_worker_async(
            queues=["bench"], concurrency=8, wait=False, install_signal_handlers=False
        )
        for concurrency in (1, 8):
            await noop.batch_defer_async(*({"n": n} for n in range(drain)))
            begin = time.perf_counter()
            await app.run_worker_async(
                queues=["bench"], concurrency=concurrency, wait=False, install_signal_handlers=False
            )
            figures.append(
                Figure(
                    f"drain, concurrency {concurrency}",
                    "procrastinate",
                    drain / (time.perf_counter() - begin),
                    "jobs/s",
                )
            )
        worker = asyncio.create_task(
            app.run_worker_async(queues=["pickup"], concurrency=1, install_signal_handlers=False)
        )
        await asyncio.sleep(0.5)  # let the worker go idle on its LISTEN
        samples = []
        for n in range(pickups):
            sent = time.perf_counter()
            await pickup.defer_async(n=n)
            await wait_for(lambda n=n: n in started)
            samples.append(started[n] - sent)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    p50, p99 = percentiles(samples)
    figures += [
        Figure("pickup latency p50", "procrastinate", p50, "ms"),
        Figure("pickup latency p99", "procrastinate", p99, "ms"),
    ]
    return figures


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until ``condition()`` (the task runs on this same loop)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the job did not start")
        await asyncio.sleep(0)


# -- pgqueuer ----------------------------------------------------------------------------------


async def bench_pgqueuer(url: str, one: int, bulk: int, drain: int, pickups: int) -> list[Figure]:
    from pgqueuer import Queries, QueueManager
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.domain.types import QueueExecutionMode

    figures = []
    started: dict[int, float] = {}
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    driver = PsycopgDriver(conn)
    queries = Queries(driver)
    await queries.install()

    def manager() -> Any:
        qm = QueueManager(queries)

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            return None

        @qm.entrypoint("pickup")
        async def pickup(job: Any) -> None:
            started[int(job.payload)] = time.perf_counter()

        return qm

    begin = time.perf_counter()
    for n in range(one):
        await queries.enqueue("noop", str(n).encode())
    figures.append(
        Figure("enqueue one by one", "pgqueuer", one / (time.perf_counter() - begin), "jobs/s")
    )
    begin = time.perf_counter()
    await queries.enqueue(["noop"] * bulk, [str(n).encode() for n in range(bulk)], [0] * bulk)
    figures.append(
        Figure("enqueue in bulk", "pgqueuer", bulk / (time.perf_counter() - begin), "jobs/s")
    )
    await manager().run(mode=QueueExecutionMode.drain, batch_size=8)
    for concurrency in (1, 8):
        await queries.enqueue(
            ["noop"] * drain, [str(n).encode() for n in range(drain)], [0] * drain
        )
        begin = time.perf_counter()
        await manager().run(mode=QueueExecutionMode.drain, batch_size=concurrency)
        figures.append(
            Figure(
                f"drain, concurrency {concurrency}",
                "pgqueuer",
                drain / (time.perf_counter() - begin),
                "jobs/s",
            )
        )
    producer = await psycopg.AsyncConnection.connect(url, autocommit=True)
    sending = Queries(PsycopgDriver(producer))
    qm = manager()
    worker = asyncio.create_task(qm.run(batch_size=1))
    await asyncio.sleep(0.5)
    samples = []
    for n in range(pickups):
        sent = time.perf_counter()
        await sending.enqueue("pickup", str(n).encode())
        await wait_for(lambda n=n: n in started)
        samples.append(started[n] - sent)
    qm.shutdown.set()
    await worker
    await producer.close()
    await conn.close()
    p50, p99 = percentiles(samples)
    figures += [
        Figure("pickup latency p50", "pgqueuer", p50, "ms"),
        Figure("pickup latency p99", "pgqueuer", p99, "ms"),
    ]
    return figures


# -- the run -----------------------------------------------------------------------------------


def in_database(run: Callable[[str], list[Figure]]) -> list[Figure]:
    """Run ``run`` against a database of its own, created and dropped here."""
    name = f"worq_pg_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(BASE, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        return run(db_url(name))
    finally:
        with psycopg.connect(BASE, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def on_loop(
    coro: Callable[..., Awaitable[list[Figure]]], *args: int
) -> Callable[[str], list[Figure]]:
    return lambda url: asyncio.run(coro(url, *args))


def report(figures: list[Figure]) -> list[dict[str, Any]]:
    """A table: each system's figure, its ratio to the floor, and worq's ratio to each rival."""
    by = {(f.name, f.system): f for f in figures}
    names = list(dict.fromkeys(f.name for f in figures))
    rows = []
    print(
        f"{'figure':<28}{'floor':>10}{'worq':>10}{'procr.':>10}{'pgqueuer':>10}"
        f"{'worq/floor':>12}{'vs procr.':>11}{'vs pgq.':>9}"
    )
    for name in names:
        values = {
            s: by[name, s].value
            for s in ("floor", "worq", "procrastinate", "pgqueuer")
            if (name, s) in by
        }
        unit = by[name, "floor"].unit
        latency = unit == "ms"

        def better(worq: float, other: float, latency: bool = latency) -> float:
            # > 1 means worq is better: faster throughput, or lower latency
            return other / worq if latency else worq / other

        row = {
            "figure": name,
            "unit": unit,
            **values,
            "worq_to_floor": values["worq"] / values["floor"],
            "worq_vs_procrastinate": better(values["worq"], values["procrastinate"]),
            "worq_vs_pgqueuer": better(values["worq"], values["pgqueuer"]),
        }
        rows.append(row)
        print(
            f"{name:<28}{values['floor']:>10.1f}{values['worq']:>10.1f}"
            f"{values['procrastinate']:>10.1f}{values['pgqueuer']:>10.1f}"
            f"{row['worq_to_floor']:>12.2f}{row['worq_vs_procrastinate']:>11.2f}"
            f"{row['worq_vs_pgqueuer']:>9.2f}"
        )
    print("jobs/s for throughput, ms for latency; 'vs' > 1 means worq is better (faster / lower)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    one, bulk, drain, pickups = (500, 5000, 2000, 100) if args.quick else (2000, 20000, 10000, 300)
    figures: list[Figure] = []
    for label, run in (
        ("floor", lambda url: floor(url, one, bulk, drain, pickups)),
        ("worq", lambda url: bench_worq(url, one, bulk, drain, pickups)),
        ("procrastinate", on_loop(bench_procrastinate, one, bulk, drain, pickups)),
        ("pgqueuer", on_loop(bench_pgqueuer, one, bulk, drain, pickups)),
    ):
        print(f"measuring {label}...", file=sys.stderr, flush=True)
        figures += in_database(run)
    rows = report(figures)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"figures": [asdict(f) for f in figures], "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
