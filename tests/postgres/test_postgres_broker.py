"""PostgreSQL-specific behaviour beyond the conformance suite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from worq_core import Worq
from worq_core.models import Message, Outcome, Settlement
from worq_core.testing.support import eventually
from worq_postgres import PostgresBroker, PostgresError
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

        def left() -> int:
            [(count,)] = conn.execute(
                f"SELECT count(*) FROM {q('worq_results')} WHERE id LIKE %s", (f"{tag}%",)
            ).fetchall()
            return int(count)

        # The sweep runs on a thread of its own, off the settlement.
        eventually(lambda: left() == 1, what="the expired records to go, the fresh one kept")


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


def test_dead_letter_retention_comes_from_the_url_or_the_keywords(pg_url: str) -> None:
    url = f"{pg_url}&dead_max_count=3&dead_max_age=60"
    app = Worq(url)
    try:
        broker = app.broker
        assert isinstance(broker, PostgresBroker)
        assert (broker.dead_max_count, broker.dead_max_age) == (3, 60.0)
        # worq's parameters never reach libpq, which would refuse them: both connect
        assert broker.stats(["nothing-here"])[0].dead == 0
        assert app.storage.load("no-such-job") is None
    finally:
        app.close()
    explicit = PostgresBroker(url, dead_max_count=5)
    assert (explicit.dead_max_count, explicit.dead_max_age) == (5, 60.0), "a keyword wins"
    explicit.close()
    default = PostgresBroker(pg_url)
    assert (default.dead_max_count, default.dead_max_age) == (10_000, 7 * 24 * 3600.0)
    default.close()
    with pytest.raises(PostgresError, match="dead_max_count='many'"):
        PostgresBroker(f"{pg_url}&dead_max_count=many")
    with pytest.raises(PostgresError, match="must be finite and >= 0"):
        PostgresBroker(pg_url, dead_max_age=-1.0)


def test_settlements_trim_dead_jobs_past_retention_without_anyone_reading_them(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only reads trim: the sweep every hundredth settle call does, off the settlement."""
    monkeypatch.setattr(broker_module, "_SWEEP_EVERY", 1)
    broker = PostgresBroker(pg_url, dead_max_count=2)
    queue = f"retain-{uuid.uuid4().hex[:8]}"
    sent = [Message(uuid.uuid4().hex, queue, b"") for _ in range(5)]
    try:
        broker.enqueue(sent)
        for _ in sent:
            [delivery] = broker.fetch([queue], 1, lease=30, wait=0)
            assert broker.settle([Settlement(delivery, Outcome.DEAD, reason="r")]) == [True]

        def held() -> set[str]:
            with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:
                rows = conn.execute(
                    f"SELECT id FROM {broker.target.q('worq_jobs')} WHERE queue = %s", (queue,)
                ).fetchall()
            return {r[0] for r in rows}

        def acked_and_trimmed() -> bool:
            other = Message(uuid.uuid4().hex, f"{queue}-other", b"")
            broker.enqueue([other])
            [delivery] = broker.fetch([other.queue], 1, lease=30, wait=0)
            broker.settle([Settlement(delivery, Outcome.ACK)])  # a sweep, on its own thread
            return held() == {sent[3].id, sent[4].id}

        eventually(acked_and_trimmed, what="a sweep to drop the oldest dead jobs")
    finally:
        broker.close()
