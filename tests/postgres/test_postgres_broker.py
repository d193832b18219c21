"""PostgreSQL-specific behaviour beyond the conformance suite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from worq_core.models import Message, Outcome, Settlement
from worq_core.testing.support import eventually
from worq_postgres import PostgresBroker
from worq_postgres import broker as broker_module


@pytest.fixture
def broker(pg_url: str) -> Iterator[PostgresBroker]:
    broker = PostgresBroker(pg_url)
    yield broker
    broker.close()


def test_settlements_sweep_expired_records_out_of_the_table(
    broker: PostgresBroker, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "_SWEEP_EVERY", 1)
    q = broker.target.q
    tag = uuid.uuid4().hex
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {q('worq_results')} (id, data, expires) "
            "SELECT %s || n, 'x', 0 FROM generate_series(1, 50) n",
            (tag,),
        )
        queue = f"sweep-{tag[:8]}"
        broker.enqueue([Message(f"{tag}-job", queue, b"")])
        [delivery] = broker.fetch([queue], 1, lease=30, wait=0)
        assert broker.settle([Settlement(delivery, Outcome.ACK, record=b"kept", ttl=60)]) == [True]
        [(left,)] = conn.execute(
            f"SELECT count(*) FROM {q('worq_results')} WHERE id LIKE %s", (f"{tag}%",)
        ).fetchall()
    assert left == 1, "the expired records are gone, the fresh one is kept"


def test_fetch_reads_ready_jobs_through_the_partial_index(broker: PostgresBroker) -> None:
    """Dead and delayed rows never enter the plan of the pick (what keeps fetch fast)."""
    q = broker.target.q
    with broker.pool().connection() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                f"EXPLAIN SELECT id FROM {q('worq_jobs')} WHERE queue = 'q' AND state = 'queued' "
                "ORDER BY priority DESC, seq LIMIT 10 FOR UPDATE SKIP LOCKED"
            ).fetchall()
        )
        conn.execute("RESET enable_seqscan")
    assert "worq_jobs_ready" in plan


def test_a_settling_broker_vacuums_the_jobs_table_once_dead_rows_pile_up(
    broker: PostgresBroker, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "_SWEEP_EVERY", 1)
    broker.vacuum_after = 0
    schema = broker.target.schema
    queue = f"vacuum-{uuid.uuid4().hex[:8]}"

    def vacuums() -> int:
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:
            [(count,)] = conn.execute(
                "SELECT vacuum_count FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = 'worq_jobs'",
                (schema,),
            ).fetchall()
        return int(count)

    before = vacuums()

    def acked_and_vacuumed() -> bool:
        broker.enqueue([Message(uuid.uuid4().hex, queue, b"")])
        [delivery] = broker.fetch([queue], 1, lease=30, wait=0)
        assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [True]
        return vacuums() > before  # stats arrive a moment late: ack again until they show

    eventually(acked_and_vacuumed, timeout=15, what="the broker to vacuum worq_jobs")
