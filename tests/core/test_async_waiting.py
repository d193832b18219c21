"""Async-native waiting: ``Job.result_async`` over ``Storage.wait_async``.

Two waits are checked: the memory storage's own (futures set by ``save``) and the default one of
the ``Storage`` base class (daemon threads of its own), through a storage that only implements
the blocking ``wait``. Records are saved straight into the storage, so no worker is involved.
Every wait has a deadline: a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import pytest

from worq_core import JobFailed, ResultTimeout, Storage, Worq
from worq_core.job import ErrorInfo, encode_failure, encode_success
from worq_core.testing.support import eventually, unique
from worq_memory import MemoryStorage

DEADLINE = 30.0
"""Liveness bound for anything that should happen promptly; never reached when things work."""

# More waiters than the default executor has threads (min(32, cores + 4)) on any machine.
MANY = max(8, min(32, (os.cpu_count() or 1) + 4) + 2)


class SyncOnlyStorage(Storage):
    """A storage with only the blocking ``wait``, so ``wait_async`` is the base class's default.

    Counts the ``wait`` calls under way, to see the waiter threads being let go.
    """

    name: ClassVar[str] = "sync-only"

    def __init__(self) -> None:
        self.inner = MemoryStorage()
        self.active = 0
        self._lock = threading.Lock()

    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        self.inner.save(records, ttl)

    def load(self, job_id: str) -> bytes | None:
        return self.inner.load(job_id)

    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        with self._lock:
            self.active += 1
        try:
            return self.inner.wait(job_id, timeout)
        finally:
            with self._lock:
                self.active -= 1

    def delete(self, job_ids: Sequence[str]) -> None:
        self.inner.delete(job_ids)


STORAGES = ["memory", "default"]


@pytest.fixture(params=STORAGES)
def app(request: pytest.FixtureRequest) -> Iterator[Worq]:
    storage = MemoryStorage() if request.param == "memory" else SyncOnlyStorage()
    app = Worq("memory://", storage=storage)
    yield app
    app.close()


def save_result(app: Worq, job_id: str, value: object) -> None:
    app.storage.save({job_id: encode_success(app.serializer, value)}, ttl=60)


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


def test_result_async_returns_a_result_saved_before(app: Worq) -> None:
    job = app.job(unique("job"))
    save_result(app, job.id, {"answer": 42})
    assert run_with_deadline(lambda: job.result_async(timeout=DEADLINE)) == {"answer": 42}


def test_result_async_returns_the_result_once_it_is_saved(app: Worq) -> None:
    job = app.job(unique("job"))

    async def main() -> object:
        waiter = asyncio.create_task(job.result_async(timeout=DEADLINE))
        await asyncio.sleep(0.05)
        assert not waiter.done(), "the wait ended before there was a result"
        saver = threading.Thread(target=save_result, args=(app, job.id, "later"))
        saver.start()  # from another thread, as a worker would
        try:
            return await waiter
        finally:
            saver.join(DEADLINE)

    assert run_with_deadline(main) == "later"


def test_result_async_raises_job_failed_for_a_dead_job(app: Worq) -> None:
    job = app.job(unique("job"))
    error = ErrorInfo("ValueError", "bad input", "Traceback ...")
    app.storage.save({job.id: encode_failure(app.serializer, error)}, ttl=60)
    with pytest.raises(JobFailed, match="bad input"):
        run_with_deadline(lambda: job.result_async(timeout=DEADLINE))


def test_result_async_raises_result_timeout_when_no_result_comes(app: Worq) -> None:
    job = app.job(unique("job"))
    with pytest.raises(ResultTimeout):
        run_with_deadline(lambda: job.result_async(timeout=0.2))
    with pytest.raises(TimeoutError):  # ResultTimeout is a TimeoutError
        run_with_deadline(lambda: job.result_async(timeout=0))


def test_several_waiters_on_one_job_all_get_its_result(app: Worq) -> None:
    job = app.job(unique("job"))

    async def main() -> list[object]:
        waiters = [asyncio.create_task(job.result_async(timeout=DEADLINE)) for _ in range(5)]
        await asyncio.sleep(0.05)
        save_result(app, job.id, 7)
        results: list[object] = await asyncio.gather(*waiters)
        return results

    assert run_with_deadline(main) == [7] * 5


def test_pending_waiters_do_not_delay_enqueue_async(app: Worq) -> None:
    @app.task
    def echo(text: str) -> str:
        return text

    ids = [unique("waited") for _ in range(MANY)]

    async def main() -> None:
        waiters = [asyncio.create_task(app.job(i).result_async(timeout=DEADLINE)) for i in ids]
        try:
            await asyncio.sleep(0.05)  # every waiter is waiting now
            job = await asyncio.wait_for(echo.enqueue_async("hi"), DEADLINE)
            # The enqueue went through while every waiter was still waiting: nothing it needed
            # was taken by them.
            assert not any(waiter.done() for waiter in waiters)
            assert job.task_name == echo.name
            for job_id in ids:
                save_result(app, job_id, job_id)
            assert await asyncio.wait_for(asyncio.gather(*waiters), DEADLINE) == ids
        finally:
            for job_id in ids:  # a regression must not leave threads blocked behind the test
                save_result(app, job_id, None)

    run_with_deadline(main)


def test_waiting_works_across_successive_event_loops(app: Worq) -> None:
    for round_ in range(3):
        job = app.job(unique("job"))

        async def main(job_id: str = job.id, value: int = round_) -> object:
            waiter = asyncio.create_task(app.job(job_id).result_async(timeout=DEADLINE))
            await asyncio.sleep(0.02)
            save_result(app, job_id, value)
            return await waiter

        assert run_with_deadline(main) == round_


def test_waiters_in_two_threads_loops_are_each_woken(app: Worq) -> None:
    jobs = [app.job(unique("job")) for _ in range(2)]
    got: dict[str, object] = {}
    started = threading.Barrier(3)

    def run(job_id: str) -> None:
        async def main() -> object:
            waiter = asyncio.create_task(app.job(job_id).result_async(timeout=DEADLINE))
            await asyncio.sleep(0)
            started.wait(DEADLINE)
            return await waiter

        got[job_id] = asyncio.run(main())

    threads = [threading.Thread(target=run, args=(job.id,)) for job in jobs]
    for thread in threads:
        thread.start()
    started.wait(DEADLINE)
    for job in jobs:
        save_result(app, job.id, job.id)
    for thread in threads:
        thread.join(DEADLINE)
    assert got == {job.id: job.id for job in jobs}


def test_a_cancelled_wait_raises_cancelled_error_and_lets_go(app: Worq) -> None:
    job = app.job(unique("job"))

    async def main() -> None:
        waiter = asyncio.create_task(job.result_async())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, DEADLINE)

    run_with_deadline(main)
    storage = app.storage
    if isinstance(storage, SyncOnlyStorage):
        # The thread was waiting in a bounded slice: it comes back within about a second.
        eventually(lambda: storage.active == 0, timeout=DEADLINE, what="the waiter thread")
    else:
        assert isinstance(storage, MemoryStorage)
        assert storage._async_waiters == {}, "a cancelled wait stayed registered"


_CANCEL_SCRIPT = """
import asyncio
import sys

from worq_core import Storage, Worq
from worq_memory import MemoryStorage


class SyncOnlyStorage(Storage):
    name = "sync-only"

    def __init__(self):
        self.inner = MemoryStorage()

    def save(self, records, ttl):
        self.inner.save(records, ttl)

    def load(self, job_id):
        return self.inner.load(job_id)

    def wait(self, job_id, timeout):
        return self.inner.wait(job_id, timeout)

    def delete(self, job_ids):
        self.inner.delete(job_ids)


kind, how = sys.argv[1], sys.argv[2]
app = Worq("memory://", storage=MemoryStorage() if kind == "memory" else SyncOnlyStorage())


async def main():
    waiters = [asyncio.create_task(app.job(f"never-{i}").result_async()) for i in range(8)]
    await asyncio.sleep(0.1)
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


@pytest.mark.parametrize("kind", STORAGES)
@pytest.mark.parametrize("how", ["cancel", "leave-to-asyncio-run"])
def test_asyncio_run_returns_promptly_after_a_waiter_is_cancelled(kind: str, how: str) -> None:
    script = textwrap.dedent(_CANCEL_SCRIPT)
    try:
        done = subprocess.run(
            [sys.executable, "-W", "default::ResourceWarning", "-c", script, kind, how],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"asyncio.run (or the interpreter's exit) hung: {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. a connection left unclosed
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.split()
    assert lines == (["cancelled", "returned"] if how == "cancel" else ["returned"])
