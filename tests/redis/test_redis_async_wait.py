"""RedisStorage.wait_async: a redis.asyncio client per event loop, on the sync wait's protocol.

On real Redis the wait runs on a ``redis.asyncio`` client built from the sync client's settings.
A fakeredis client (and any connection class other than redis-py's own) has no asyncio
counterpart, so it waits through ``Storage.wait_async``'s daemon threads: the ``backend`` cases
cover both paths. Every wait has a deadline, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
from redis_support import Backend, counting_client, delete_prefix, new_prefix

from worq_core import ResultTimeout, Worq
from worq_core.job import encode_success
from worq_core.testing.support import eventually, unique
from worq_redis import RedisStorage

DEADLINE = 30.0
"""Liveness bound for anything that should happen promptly; never reached when things work."""

# More waiters than the default executor has threads (min(32, cores + 4)) on any machine.
MANY = max(8, min(32, (os.cpu_count() or 1) + 4) + 2)

T = TypeVar("T")


def run_with_deadline(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` on a thread of its own; fails if it has not returned by DEADLINE."""
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(main()))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if thread.is_alive():
        pytest.fail("asyncio.run did not return: something is still waiting")
    if errors:
        raise errors[0]
    return outcome[0]


def named_connections(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    """The server's connections named ``name`` (``CLIENT LIST`` entries)."""
    return [c for c in client.client_list() if c.get("name") == name]


def blocked(client: redis.Redis, name: str) -> int:
    return sum("b" in c.get("flags", "") for c in named_connections(client, name))


@pytest.fixture
def storage(backend: Backend) -> Iterator[RedisStorage]:
    storage = backend.storage()
    yield storage
    storage.close()


def test_wait_async_returns_a_record_saved_before(storage: RedisStorage) -> None:
    job_id = unique("job")
    storage.save({job_id: b"done"}, ttl=60)
    assert run_with_deadline(lambda: storage.wait_async(job_id, DEADLINE)) == b"done"


def test_wait_async_wakes_when_the_record_is_saved(storage: RedisStorage) -> None:
    job_id = unique("job")

    async def main() -> bytes | None:
        waiter = asyncio.create_task(storage.wait_async(job_id, DEADLINE))
        await asyncio.sleep(0.1)
        assert not waiter.done(), "the wait ended before there was a record"
        saver = threading.Thread(target=storage.save, args=({job_id: b"result"}, 60))
        saver.start()
        try:
            return await waiter
        finally:
            saver.join(DEADLINE)

    assert run_with_deadline(main) == b"result"


def test_wait_async_gives_none_after_its_timeout(storage: RedisStorage) -> None:
    job_id = unique("job")
    assert run_with_deadline(lambda: storage.wait_async(job_id, 0.3)) is None
    assert run_with_deadline(lambda: storage.wait_async(job_id, 0)) is None


def test_async_and_sync_waiters_on_one_job_all_wake(storage: RedisStorage) -> None:
    job_id = unique("job")
    sync_got: list[bytes | None] = []
    sync_waiter = threading.Thread(target=lambda: sync_got.append(storage.wait(job_id, DEADLINE)))

    async def main() -> list[bytes | None]:
        waiters = [asyncio.create_task(storage.wait_async(job_id, DEADLINE)) for _ in range(4)]
        sync_waiter.start()
        await asyncio.sleep(0.2)
        storage.save({job_id: b"shared"}, ttl=60)
        results: list[bytes | None] = await asyncio.gather(*waiters)
        return results

    assert run_with_deadline(main) == [b"shared"] * 4
    sync_waiter.join(DEADLINE)
    assert sync_got == [b"shared"]


def test_result_async_returns_the_value_or_raises_result_timeout(backend: Backend) -> None:
    app = Worq(backend.broker(), storage=backend.storage())
    job, never = app.job(unique("job")), app.job(unique("never"))

    async def main() -> object:
        waiter = asyncio.create_task(job.result_async(timeout=DEADLINE))
        await asyncio.sleep(0.1)
        app.storage.save({job.id: encode_success(app.serializer, [1, "two"])}, ttl=60)
        value = await waiter
        with pytest.raises(ResultTimeout):
            await never.result_async(timeout=0.2)
        return value

    try:
        assert run_with_deadline(main) == [1, "two"]
    finally:
        app.close()


def test_pending_waiters_do_not_delay_enqueue_async(backend: Backend) -> None:
    app = Worq(backend.broker(), storage=backend.storage())

    @app.task
    def echo(text: str) -> str:
        return text

    ids = [unique("waited") for _ in range(MANY)]

    def release() -> None:
        app.storage.save({i: encode_success(app.serializer, i) for i in ids}, ttl=60)

    async def main() -> None:
        waiters = [asyncio.create_task(app.job(i).result_async(timeout=DEADLINE)) for i in ids]
        try:
            await asyncio.sleep(0.2)  # every waiter is waiting now
            job = await asyncio.wait_for(echo.enqueue_async("hi"), DEADLINE)
            # It went through while every waiter still waited: they took nothing it needed.
            assert not any(waiter.done() for waiter in waiters)
            assert job.task_name == echo.name
            release()
            assert await asyncio.wait_for(asyncio.gather(*waiters), DEADLINE) == ids
        finally:
            release()  # a regression must not leave threads blocked behind the test

    try:
        run_with_deadline(main)
    finally:
        app.close()


def test_successive_event_loops_each_wait_on_a_client_of_their_own(storage: RedisStorage) -> None:
    for round_ in range(3):
        job_id = unique("job")

        async def main(job_id: str = job_id, record: bytes = b"%d" % round_) -> bytes | None:
            waiter = asyncio.create_task(storage.wait_async(job_id, DEADLINE))
            await asyncio.sleep(0.05)
            storage.save({job_id: record}, ttl=60)
            return await waiter

        assert run_with_deadline(main) == b"%d" % round_


# -- real Redis: what the server sees --------------------------------------------------------------


@pytest.fixture
def named(real_backend: Backend, real_redis_url: str) -> Iterator[tuple[RedisStorage, str]]:
    """A storage whose connections carry a name of their own, for ``CLIENT LIST``."""
    name = unique("worq-async-wait")
    client = redis.Redis.from_url(real_redis_url, client_name=name, socket_timeout=30)
    storage = RedisStorage(client, prefix=real_backend.prefix)
    yield storage, name
    storage.close()
    client.close()


def test_cancelled_waits_leave_no_connection_blocked(
    named: tuple[RedisStorage, str], real_backend: Backend
) -> None:
    storage, name = named
    admin = real_backend.client

    async def main() -> None:
        waiters = [asyncio.create_task(storage.wait_async(unique("job"), None)) for _ in range(3)]
        while blocked(admin, name) < 3:  # bounded by run_with_deadline
            await asyncio.sleep(0.02)
        for waiter in waiters:
            waiter.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        eventually(lambda: blocked(admin, name) == 0, timeout=DEADLINE, what="unblocked waits")

    run_with_deadline(main)
    # asyncio.run closed this loop's client on its way out.
    eventually(lambda: not named_connections(admin, name), DEADLINE, "connections closed")


def test_close_closes_the_client_of_a_running_loop(
    named: tuple[RedisStorage, str], real_backend: Backend
) -> None:
    storage, name = named
    job_id = unique("job")
    real_backend.storage().save({job_id: b"there"}, ttl=60)  # not on the named sync client
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        future = asyncio.run_coroutine_threadsafe(storage.wait_async(job_id, DEADLINE), loop)
        assert future.result(DEADLINE) == b"there"
        assert named_connections(real_backend.client, name), "the wait used no connection"
        storage.close()
        eventually(lambda: not named_connections(real_backend.client, name), DEADLINE, "closed")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE)
        loop.close()


def test_a_storage_from_a_url_waits_on_the_same_database(
    real_backend: Backend, real_redis_url: str
) -> None:
    storage = RedisStorage(f"{real_redis_url}?prefix={real_backend.prefix}")
    job_id = unique("job")
    try:

        async def main() -> bytes | None:
            waiter = asyncio.create_task(storage.wait_async(job_id, DEADLINE))
            await asyncio.sleep(0.1)
            real_backend.storage().save({job_id: b"same db"}, ttl=60)
            return await waiter

        assert run_with_deadline(main) == b"same db"
    finally:
        storage.close()


def test_a_connection_class_of_its_own_waits_on_threads(
    real_backend: Backend, real_redis_url: str
) -> None:
    client, _ = counting_client(real_redis_url)  # a Connection subclass: no asyncio twin
    storage = RedisStorage(client, prefix=real_backend.prefix)
    job_id = unique("job")
    try:

        async def main() -> bytes | None:
            waiter = asyncio.create_task(storage.wait_async(job_id, DEADLINE))
            await asyncio.sleep(0.1)
            storage.save({job_id: b"threaded"}, ttl=60)
            return await waiter

        assert run_with_deadline(main) == b"threaded"
    finally:
        storage.close()
        client.close()


# -- asyncio.run returns after a cancelled wait ----------------------------------------------------

_CANCEL_SCRIPT = """
import asyncio
import sys

from worq_core import Worq
from worq_redis import RedisStorage

kind, url, prefix, how = sys.argv[1:5]
if kind == "redis":
    storage = RedisStorage(url, prefix=prefix)
else:
    import fakeredis

    storage = RedisStorage(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix=prefix)
app = Worq("memory://", storage=storage)


async def main():
    waiters = [asyncio.create_task(app.job(f"never-{i}").result_async()) for i in range(8)]
    await asyncio.sleep(0.3)
    if how == "cancel":
        waiters[0].cancel()
        try:
            await waiters[0]
        except asyncio.CancelledError:
            print("cancelled", flush=True)
    # else: asyncio.run cancels the pending waiters itself


asyncio.run(main())
print("returned", flush=True)
"""


@pytest.mark.parametrize("how", ["cancel", "leave-to-asyncio-run"])
def test_asyncio_run_returns_promptly_after_a_waiter_is_cancelled(
    request: pytest.FixtureRequest, kind: str, how: str
) -> None:
    prefix = new_prefix()
    url = ""
    if kind == "redis":
        url = request.getfixturevalue("real_redis_url")
    else:
        pytest.importorskip("fakeredis")
    script = textwrap.dedent(_CANCEL_SCRIPT)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-W",
                "default::ResourceWarning",
                "-c",
                script,
                kind,
                url,
                prefix,
                how,
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"asyncio.run (or the interpreter's exit) hung: {exc.stderr!r}")
    finally:
        if url:
            admin = redis.Redis.from_url(url)
            delete_prefix(admin, prefix)
            admin.close()
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. a connection left unclosed
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.split()
    assert lines == (["cancelled", "returned"] if how == "cancel" else ["returned"])


@pytest.fixture(params=["redis", "fakeredis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)
