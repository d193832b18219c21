"""worq-memory is the reference backend: it must pass the whole contract with no skips."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from worq_core.testing import BrokerContract, StorageContract, WorkerContract
from worq_memory import MemoryBroker, MemoryStorage


class MemoryBackend:
    """A broker that writes its records into the storage it shares with the app."""

    @pytest.fixture
    def storage(self) -> Iterator[MemoryStorage]:
        storage = MemoryStorage()
        yield storage
        storage.close()

    @pytest.fixture
    def broker(self, storage: MemoryStorage) -> Iterator[MemoryBroker]:
        broker = MemoryBroker(storage=storage)
        yield broker
        broker.close()

    @pytest.fixture
    def retaining_broker(
        self, storage: MemoryStorage
    ) -> Iterator[Callable[[int, float], MemoryBroker]]:
        made: list[MemoryBroker] = []

        def make(max_count: int, max_age: float) -> MemoryBroker:
            made.append(
                MemoryBroker(storage=storage, dead_max_count=max_count, dead_max_age=max_age)
            )
            return made[-1]

        yield make
        for broker in made:
            broker.close()


class TestMemoryBroker(MemoryBackend, BrokerContract):
    pass


class TestMemoryStorage(MemoryBackend, StorageContract):
    pass


class TestMemoryWorker(MemoryBackend, WorkerContract):
    """The broker writes results itself, atomically with each settlement."""

    def test_the_broker_writes_results_itself(
        self, broker: MemoryBroker, storage: MemoryStorage
    ) -> None:
        assert broker.stores_results_in(storage)


class TestMemoryWorkerWithSeparateStorage(MemoryBackend, WorkerContract):
    """What ``memory://`` builds: broker and storage apart, the worker saves records itself."""

    @pytest.fixture
    def broker(self) -> Iterator[MemoryBroker]:
        broker = MemoryBroker.from_url("memory://")
        yield broker
        broker.close()

    def test_the_worker_saves_results_itself(
        self, broker: MemoryBroker, storage: MemoryStorage
    ) -> None:
        assert not broker.stores_results_in(storage)
