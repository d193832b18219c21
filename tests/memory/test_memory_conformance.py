"""worq-memory is the reference backend: it must pass the whole contract with no skips."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from worq_core.testing import BrokerContract, StorageContract, WorkerContract
from worq_memory import MemoryBroker, MemoryStorage


class MemoryBackend:
    @pytest.fixture
    def broker(self) -> Iterator[MemoryBroker]:
        broker = MemoryBroker()
        yield broker
        broker.close()

    @pytest.fixture
    def storage(self) -> Iterator[MemoryStorage]:
        storage = MemoryStorage()
        yield storage
        storage.close()


class TestMemoryBroker(MemoryBackend, BrokerContract):
    pass


class TestMemoryStorage(MemoryBackend, StorageContract):
    pass


class TestMemoryWorker(MemoryBackend, WorkerContract):
    pass
