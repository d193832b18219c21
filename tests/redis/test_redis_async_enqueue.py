"""``enqueue_async`` on Redis: sent from the event loop itself, with the blocking path's answers.

The contract cases (``BrokerContract``) run on every deployment; these check what is Redis's own:
no thread is involved, middleware hears the outcome, and a Redis that goes away, loses its
scripts or lacks the replicas asked for gives the same typed errors as a blocking enqueue.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis_support import Backend, RedisServer, new_prefix

from worq_core import BrokerConnectionError, BrokerError, Worq
from worq_core.job import Envelope
from worq_core.middleware import EnqueueRequest, Middleware
from worq_core.models import Message
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisSettings, RedisStorage, ReplicasBehind


def no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any use of ``asyncio.to_thread`` fail the test: the path must be native."""

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("enqueue_async went through a thread")

    monkeypatch.setattr(asyncio, "to_thread", refuse)


class Recorder(Middleware):
    """Sets a header on every enqueue and keeps what ``after_enqueue`` heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[list[str], BaseException | None]] = []

    def before_enqueue(self, request: EnqueueRequest) -> None:
        request.headers["tenant"] = "t-1"

    def after_enqueue(
        self, requests: Sequence[EnqueueRequest], error: BaseException | None
    ) -> None:
        self.heard.append(([r.job_id for r in requests], error))


def make_app(broker: RedisBroker, storage: RedisStorage, recorder: Recorder) -> Worq:
    app = Worq(
        broker,
        storage=storage,
        serializer=MsgpackSerializer(),
        registry=Registry(),
        middleware=[recorder],
    )

    @app.task(name="add", queue="web")
    def add(x: int, y: int) -> int:
        return x + y

    return app


def test_enqueue_async_runs_the_script_on_the_event_loop_with_middleware(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    app = make_app(real_backend.broker(), real_backend.storage(), recorder)
    add = app.tasks["add"]
    no_threads(monkeypatch)

    async def main() -> tuple[str, str, str]:
        first = await add.enqueue_async(1, 2)
        fixed = await add.options(job_id="order-7", priority=3).enqueue_async(3, 4)
        again = await add.options(job_id="order-7").enqueue_async(5, 6)
        return first.id, fixed.id, again.id

    first, fixed, again = asyncio.run(main())
    assert fixed == again == "order-7"
    deliveries = app.broker.fetch(["web"], 10, lease=30, wait=0)
    assert [d.id for d in deliveries] == [fixed, first], "priority first, the repeat not added"
    envelopes = [Envelope.decode(d.body, app.serializer) for d in deliveries]
    assert [(e.args, dict(e.headers)) for e in envelopes] == [
        ([3, 4], {"tenant": "t-1"}),
        ([1, 2], {"tenant": "t-1"}),
    ]
    assert recorder.heard == [([first], None), ([fixed], None), ([fixed], None)]
    app.close()


def test_a_batch_of_several_script_calls_is_sent_as_one_transaction(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = real_backend.broker(RedisSettings(prefix=real_backend.prefix, enqueue_chunk=2))
    no_threads(monkeypatch)
    sent = [Message(f"j{n}", "a" if n % 2 else "b", b"%d" % n) for n in range(7)]
    repeat = Message("j0", "a", b"again")

    async def main() -> list[bool]:
        return await broker.enqueue_async([*sent, repeat])

    assert asyncio.run(main()) == [True] * 7 + [False]
    got = broker.fetch(["a", "b"], 10, lease=30, wait=0)
    assert sorted(d.id for d in got) == sorted(m.id for m in sent)
    broker.close()


def test_enqueue_async_reloads_the_script_redis_lost(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = real_backend.broker()
    broker.enqueue([Message("warm", "s", b"")])  # the queue is known: the one-call path
    no_threads(monkeypatch)

    async def main() -> list[bool]:
        await broker.enqueue_async([Message("one", "s", b"")])
        real_backend.client.script_flush()
        return await broker.enqueue_async([Message("two", "s", b"")])

    assert asyncio.run(main()) == [True]
    assert {d.id for d in broker.fetch(["s"], 10, lease=30, wait=0)} == {"warm", "one", "two"}
    broker.close()


def test_a_script_error_on_the_event_loop_becomes_a_broker_error(real_backend: Backend) -> None:
    broker = real_backend.broker()
    real_backend.client.set(f"{real_backend.prefix}:{{q}}:ready", "not a zset")
    with pytest.raises(BrokerError) as info:
        asyncio.run(broker.enqueue_async([Message("x", "q", b"")]))
    assert not isinstance(info.value, BrokerConnectionError)
    broker.close()


def test_enqueue_async_waits_for_replicas_when_asked_and_says_when_they_lag(
    real_backend: Backend,
) -> None:
    settings = RedisSettings(prefix=real_backend.prefix, wait_replicas=1, wait_timeout=0.05)
    broker = real_backend.broker(settings)
    with pytest.raises(ReplicasBehind, match="only 0 of 1 replicas"):
        asyncio.run(broker.enqueue_async([Message("lagging", "w", b"")]))
    assert broker.job_state("lagging") is not None, "the job is on the master all the same"
    broker.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    instance = RedisServer(tmp_path, appendonly=False)
    try:
        instance.start()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    yield instance
    instance.kill()


def test_enqueue_async_on_a_redis_that_went_away_fails_fast_and_recovers(
    server: RedisServer,
) -> None:
    settings = RedisSettings(prefix=new_prefix(), socket_timeout=1.0, connect_timeout=0.5)
    recorder = Recorder()
    app = make_app(RedisBroker(server.url, settings), RedisStorage(server.url, settings), recorder)
    add = app.tasks["add"]

    async def main() -> tuple[float, str]:
        await add.enqueue_async(1, 1)  # the loop's connection is open
        server.kill()
        begin = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            await add.enqueue_async(2, 2)
        took = time.monotonic() - begin
        server.start()
        after = await add.enqueue_async(3, 3)
        return took, after.id

    took, after = asyncio.run(main())
    assert took < 5.0, "an enqueue must fail fast while Redis is down"
    assert [type(error) for _, error in recorder.heard] == [
        type(None),
        BrokerConnectionError,
        type(None),
    ]
    assert app.broker.job_state(after) is not None
    app.close()


def test_closing_the_broker_on_its_loop_closes_that_loops_connections(
    real_backend: Backend,
) -> None:
    broker = real_backend.broker()

    async def main() -> tuple[int, int]:
        await asyncio.gather(
            *(broker.enqueue_async([Message(f"c{n}", "c", b"")]) for n in range(5))
        )
        [lane] = broker._async_lanes.values()
        opened = len(lane._taken)
        broker.close()
        await asyncio.sleep(0.05)  # the closing task runs on this loop
        return opened, len(lane._taken)

    opened, left = asyncio.run(main())
    assert opened >= 1
    assert left == 0
    assert broker._async_lanes == {}
