"""Does worq-postgres bloat? A churn soak, and fetch beside millions of old rows.

    python bench/postgres_soak.py                 # 1,000,000 jobs through the table
    python bench/postgres_soak.py --jobs 100000   # a shorter soak
    python bench/postgres_soak.py --old 2000000   # old rows for the fetch figure

1. Churn: ``--jobs`` jobs go through one queue in rounds (enqueue a batch, 8 threads fetch and
   acknowledge it with results), with autovacuum as the server has it. After each tenth the
   table's size, its indexes' size and its dead tuples are printed; the figure is the final
   size as a ratio to the size half-way (bounded: about 1, not 2).
2. Old rows: the time to fetch and acknowledge jobs one at a time on an empty table (the
   floor), then again after ``--old`` rows were added elsewhere in the table (dead jobs of
   other queues, and jobs delayed for a day in the same queue); the figure is their ratio.

Every tenth of the churn also prints ``worq_results``' size (the records, written with a
5-second ttl and swept by the settles) and the jobs per second of that tenth.

Everything lives in a database created for the run (``worq_pg_soak_<random>``) and dropped at
the end; ``WORQ_BENCH_POSTGRES_URL`` points at the server (default
``postgresql://postgres@127.0.0.1:5432/postgres``, used only to create and drop it).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from typing import Any

import psycopg

from worq_core.models import Message, Outcome, Settlement
from worq_postgres import PostgresBroker, migrate

BASE = os.environ.get("WORQ_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BATCH = 5000


def sizes(conn: psycopg.Connection[Any]) -> tuple[int, int, int, int]:
    """worq_jobs' size, its indexes' size, its dead tuples, and worq_results' total size."""
    [(table, indexes, dead, results)] = conn.execute(
        "SELECT pg_relation_size('worq.worq_jobs'), pg_indexes_size('worq.worq_jobs'), "
        "coalesce((SELECT n_dead_tup FROM pg_stat_user_tables "
        "WHERE schemaname = 'worq' AND relname = 'worq_jobs'), 0), "
        "pg_total_relation_size('worq.worq_results')"
    ).fetchall()
    return int(table), int(indexes), int(dead), int(results)


def churn(broker: PostgresBroker, conn: psycopg.Connection[Any], jobs: int) -> float:
    queue = "soak"
    done = 0
    marks: list[tuple[int, int, int, int]] = []
    body = b"x" * 100
    step = max(BATCH, jobs // 10)
    next_mark = step
    print(
        f"{'jobs':>10}{'table MB':>10}{'indexes MB':>12}{'dead tuples':>13}"
        f"{'results MB':>12}{'jobs/s':>9}"
    )
    begin = last_mark = time.perf_counter()
    while done < jobs:
        broker.enqueue([Message(uuid.uuid4().hex, queue, body) for _ in range(BATCH)])

        def drain() -> None:
            while got := broker.fetch([queue], 16, lease=60, wait=0):
                settle = [Settlement(d, Outcome.ACK, record=b"r", ttl=5.0) for d in got]
                broker.settle(settle)

        threads = [threading.Thread(target=drain) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done += BATCH
        if done >= next_mark:
            next_mark += step
            now = time.perf_counter()
            table, indexes, dead, results = sizes(conn)
            marks.append((table, indexes, dead, results))
            print(
                f"{done:>10}{table / 2**20:>10.1f}{indexes / 2**20:>12.1f}{dead:>13}"
                f"{results / 2**20:>12.1f}{step / (now - last_mark):>9.0f}",
                flush=True,
            )
            last_mark = now
    print(f"churn: {jobs / (time.perf_counter() - begin):.0f} jobs/s overall")
    half, last = marks[len(marks) // 2 - 1], marks[-1]
    print(f"worq_results after {jobs:,} jobs / half-way: {last[3] / max(1, half[3]):.2f}")
    return (last[0] + last[1]) / max(1, half[0] + half[1])


def fetch_time(broker: PostgresBroker, queue: str, count: int) -> float:
    """Seconds per fetch-and-ack of one job, one at a time."""
    broker.enqueue([Message(uuid.uuid4().hex, queue, b"x") for _ in range(count)])
    begin = time.perf_counter()
    for _ in range(count):
        [delivery] = broker.fetch([queue], 1, lease=60, wait=0)
        broker.settle([Settlement(delivery, Outcome.ACK)])
    return (time.perf_counter() - begin) / count


def old_rows(broker: PostgresBroker, conn: psycopg.Connection[Any], old: int) -> float:
    floor = fetch_time(broker, "fresh", 2000)
    conn.execute(
        "INSERT INTO worq.worq_jobs (id, queue, body, priority, seq, state, died_at, reason) "
        # Dead jobs within the default retention (10,000 per queue, 7 days): recent, and
        # spread over enough queues that no sweep drops them while fetch is timed.
        "SELECT 'dead-' || n, 'old-' || (n %% 250), 'x', 0, nextval('worq.worq_seq'), "
        "'dead', extract(epoch FROM now()), 'r' "
        "FROM generate_series(1, %s) n",
        (old // 2,),
    )
    conn.execute(
        "INSERT INTO worq.worq_jobs (id, queue, body, priority, seq, state, due) "
        "SELECT 'later-' || n, 'fresh', 'x', 0, nextval('worq.worq_seq'), 'scheduled', "
        "extract(epoch FROM now()) + 86400 FROM generate_series(1, %s) n",
        (old - old // 2,),
    )
    conn.execute("VACUUM ANALYZE worq.worq_jobs")
    beside = fetch_time(broker, "fresh", 2000)
    print(
        f"fetch+ack one at a time: {floor * 1e3:.3f} ms on an empty table, "
        f"{beside * 1e3:.3f} ms beside {old:,} old rows"
    )
    return beside / floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--old", type=int, default=2_000_000)
    args = parser.parse_args()
    name = f"worq_pg_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(BASE, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = BASE.rsplit("/", 1)[0] + "/" + name
    try:
        migrate(url)
        broker = PostgresBroker(url)
        with psycopg.connect(url, autocommit=True) as conn:
            growth = churn(broker, conn, args.jobs)
            slower = old_rows(broker, conn, args.old)
        broker.close()
        print(f"table+indexes after {args.jobs:,} jobs / half-way: {growth:.2f}")
        print(f"fetch beside {args.old:,} old rows / on an empty table: {slower:.2f}")
    finally:
        with psycopg.connect(BASE, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
