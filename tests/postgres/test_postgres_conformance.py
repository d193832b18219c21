"""worq-postgres runs worq-core's conformance suite on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from pg_support import drop_schema, new_schema, with_schema

from worq_core.testing import BrokerContract, StorageContract, WorkerContract
from worq_postgres import PostgresBroker, PostgresStorage, migrate


class PostgresBackend:
    @pytest.fixture
    def broker(self, pg_url: str) -> Iterator[PostgresBroker]:
        broker = PostgresBroker(pg_url)
        yield broker
        broker.close()

    @pytest.fixture
    def retaining_broker(self, pg_url: str) -> Iterator[Callable[[int, float], PostgresBroker]]:
        made: list[PostgresBroker] = []

        def make(max_count: int, max_age: float) -> PostgresBroker:
            made.append(PostgresBroker(pg_url, dead_max_count=max_count, dead_max_age=max_age))
            return made[-1]

        yield make
        for broker in made:
            broker.close()

    @pytest.fixture
    def storage(self, pg_url: str) -> Iterator[PostgresStorage]:
        storage = PostgresStorage(pg_url)
        yield storage
        storage.close()


class TestPostgresBroker(PostgresBackend, BrokerContract):
    pass


class TestPostgresStorage(PostgresBackend, StorageContract):
    pass


class TestPostgresWorker(PostgresBackend, WorkerContract):
    """Broker and storage share database and schema: records are written by the settlement."""

    def test_the_broker_writes_results_itself(
        self, broker: PostgresBroker, storage: PostgresStorage
    ) -> None:
        assert broker.stores_results_in(storage)


@pytest.fixture(scope="class")
def other_schema_url(pg_base_url: str) -> Iterator[str]:
    schema = new_schema()
    url = with_schema(pg_base_url, schema)
    migrate(url)
    yield url
    drop_schema(pg_base_url, schema)


class TestPostgresWorkerWithSeparateStorage(PostgresBackend, WorkerContract):
    """Records in another schema: the worker saves them itself, then settles."""

    @pytest.fixture
    def storage(self, other_schema_url: str) -> Iterator[PostgresStorage]:
        storage = PostgresStorage(other_schema_url)
        yield storage
        storage.close()

    def test_the_worker_saves_results_itself(
        self, broker: PostgresBroker, storage: PostgresStorage
    ) -> None:
        assert not broker.stores_results_in(storage)
