"""worq-redis runs worq-core's conformance suite, on real Redis and on fakeredis.

No case skips but the recipe's: these brokers are built around a client, which gives none
(test_redis_broker.py checks the recipe of brokers built from URLs; the Sentinel and Cluster
suites run the case).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from redis_support import Backend, new_prefix

from worq_core.testing import BrokerContract, StorageContract, WorkerContract
from worq_redis import RedisBroker, RedisSettings, RedisStorage


class RedisBackend:
    @pytest.fixture
    def broker(self, backend: Backend) -> Iterator[RedisBroker]:
        broker = backend.broker()
        yield broker
        broker.close()

    @pytest.fixture
    def retaining_broker(self, backend: Backend) -> Iterator[Callable[[int, float], RedisBroker]]:
        made: list[RedisBroker] = []

        def make(max_count: int, max_age: float) -> RedisBroker:
            made.append(
                backend.broker(RedisSettings(dead_max_count=max_count, dead_max_age=max_age))
            )
            return made[-1]

        yield make
        for broker in made:
            broker.close()

    @pytest.fixture
    def storage(self, backend: Backend) -> Iterator[RedisStorage]:
        storage = backend.storage()
        yield storage
        storage.close()


class TestRedisBroker(RedisBackend, BrokerContract):
    pass


class TestRedisStorage(RedisBackend, StorageContract):
    pass


class TestRedisWorker(RedisBackend, WorkerContract):
    """Broker and storage share server and prefix: results are written by the ack script."""

    def test_the_broker_writes_results_itself(
        self, broker: RedisBroker, storage: RedisStorage
    ) -> None:
        assert broker.stores_results_in(storage)


class TestRedisWorkerWithSeparateStorage(RedisBackend, WorkerContract):
    """A storage under another prefix: the worker saves records itself, then settles."""

    @pytest.fixture
    def storage(self, backend: Backend) -> Iterator[RedisStorage]:
        storage = backend.storage(prefix=new_prefix())
        yield storage
        storage.close()

    def test_the_worker_saves_results_itself(
        self, broker: RedisBroker, storage: RedisStorage
    ) -> None:
        assert not broker.stores_results_in(storage)
