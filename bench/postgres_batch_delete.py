"""Why worq-postgres deletes each acknowledged job at once instead of in batches.

    python bench/postgres_batch_delete.py                    # 1,000,000 jobs per variant
    python bench/postgres_batch_delete.py --jobs 200000

The same churn as ``postgres_soak.py`` (batches of 5,000 jobs of 100 bytes, drained by 8
threads fetching 16 at a time through ``worq_fetch``, the table vacuumed by the settlers past
50,000 dead rows) runs twice, each in a database of its own migrated with worq's schema:

- ``delete``: acknowledging is worq's ``worq_settle`` (one ``DELETE`` per job, in the settling
  transaction: one dead row per job);
- ``mark``: acknowledging ``UPDATE``s the row to a ``done`` state (a partial index finds them)
  and every hundredth settle call deletes the done rows in batches of 1,000 (two dead rows per
  job: the old version and, later, the done one).

Printed per variant: jobs per second, WAL bytes per job, and the table's and its indexes'
size at each quarter. ``WORQ_BENCH_POSTGRES_URL`` points at the server (default
``postgresql://postgres@127.0.0.1:5432/postgres``, used only to create and drop databases).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from typing import Any

import psycopg

from worq_postgres import migrate

BASE = os.environ.get("WORQ_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BATCH = 5000

MARK = """
CREATE FUNCTION worq_settle_mark(p_ids text[], p_tokens bigint[]) RETURNS boolean[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_applied boolean[] := '{}';
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        UPDATE worq_jobs SET state = 'done', token = NULL, lease_until = NULL
        WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
          AND lease_until > v_now;
        v_applied := v_applied || FOUND;
    END LOOP;
    RETURN v_applied;
END
$$;
"""
REMOVE_DONE = (
    "DELETE FROM worq_jobs WHERE id IN "
    "(SELECT id FROM worq_jobs WHERE state = 'done' ORDER BY seq LIMIT 1000)"
)


def drain(url: str, variant: str, settles: list[int], lock: threading.Lock) -> None:
    with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
        conn.execute("SET search_path TO worq")
        while rows := conn.execute(
            "SELECT r_id, r_token FROM worq_fetch(%s, 16, 60)", (["soak"],)
        ).fetchall():
            ids, tokens = [r[0] for r in rows], [r[1] for r in rows]
            n = len(ids)
            if variant == "delete":
                conn.execute(
                    "SELECT worq_settle('c', %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        ids,
                        tokens,
                        ["ack"] * n,
                        [0.0] * n,
                        [""] * n,
                        [None] * n,
                        [0.0] * n,
                        [None] * n,
                    ),
                )
            else:
                conn.execute("SELECT worq_settle_mark(%s, %s)", (ids, tokens))
            with lock:
                settles[0] += 1
                due = settles[0] % 100 == 0
            if due:
                while variant == "mark" and conn.execute(REMOVE_DONE).rowcount == 1000:
                    pass
                [(dead,)] = conn.execute(
                    "SELECT n_dead_tup FROM pg_stat_user_tables "
                    "WHERE schemaname = 'worq' AND relname = 'worq_jobs'"
                ).fetchall()
                if dead > 50_000:
                    conn.execute("VACUUM (SKIP_LOCKED) worq_jobs")


def run(variant: str, jobs: int) -> None:
    name = f"worq_pg_batchdel_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(BASE, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = BASE.rsplit("/", 1)[0] + "/" + name
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET search_path TO worq")
            if variant == "mark":
                conn.execute("ALTER TABLE worq_jobs DROP CONSTRAINT worq_jobs_state_check")
                conn.execute("CREATE INDEX worq_jobs_done ON worq_jobs (seq) WHERE state = 'done'")
                conn.execute(MARK)
            [(start,)] = conn.execute("SELECT pg_current_wal_lsn()").fetchall()
            settles, lock = [0], threading.Lock()
            sizes: list[tuple[Any, ...]] = []
            done = 0
            begin = time.perf_counter()
            while done < jobs:
                ids = [uuid.uuid4().hex for _ in range(BATCH)]
                conn.execute(
                    "SELECT worq_enqueue('c', %s, %s, %s, %s, %s, %s)",
                    (
                        ids,
                        ["soak"] * BATCH,
                        [b"x" * 100] * BATCH,
                        [0] * BATCH,
                        [None] * BATCH,
                        [False] * BATCH,
                    ),
                )
                threads = [
                    threading.Thread(target=drain, args=(url, variant, settles, lock))
                    for _ in range(8)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                done += BATCH
                if done % max(BATCH, jobs // 4) == 0:
                    sizes.append(
                        conn.execute(
                            "SELECT pg_relation_size('worq_jobs'), pg_indexes_size('worq_jobs')"
                        ).fetchall()[0]
                    )
            spent = time.perf_counter() - begin
            while variant == "mark" and conn.execute(REMOVE_DONE).rowcount:
                pass
            [(wal,)] = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start,)
            ).fetchall()
        shown = "  ".join(f"{t / 2**20:.1f}+{i / 2**20:.1f} MB" for t, i in sizes)
        print(
            f"{variant:<7}{jobs / spent:>8.0f} jobs/s{wal / jobs:>8.0f} WAL bytes/job  "
            f"table+indexes by quarter: {shown}",
            flush=True,
        )
    finally:
        with psycopg.connect(BASE, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    args = parser.parse_args()
    for variant in ("delete", "mark"):
        run(variant, args.jobs)


if __name__ == "__main__":
    main()
