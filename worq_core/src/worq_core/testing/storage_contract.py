"""The storage contract: what every :class:`~worq_core.Storage` must do, as tests."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from worq_core.storage import Storage
from worq_core.testing.support import eventually, unique

#: Bound on anything that should happen promptly; never reached when things work.
DEADLINE = 10.0


class StorageContract:
    """Subclass and provide a ``storage`` fixture yielding a fresh storage.

    Every case uses job ids of its own, so a storage shared between cases also works. The
    ``wait_async`` cases run their own event loop with :func:`asyncio.run`.
    """

    @pytest.fixture
    def job_id(self) -> str:
        """A job id no other case uses."""
        return unique("job")

    def test_a_job_without_a_record_loads_as_none(self, storage: Storage, job_id: str) -> None:
        assert storage.load(job_id) is None

    def test_a_saved_record_loads_back_byte_for_byte(self, storage: Storage, job_id: str) -> None:
        data = bytes(range(256)) * 4
        storage.save({job_id: data}, ttl=60)
        assert storage.load(job_id) == data

    def test_saving_again_replaces_the_record(self, storage: Storage, job_id: str) -> None:
        storage.save({job_id: b"first"}, ttl=60)
        storage.save({job_id: b"second"}, ttl=60)
        assert storage.load(job_id) == b"second"

    def test_one_save_stores_many_records(self, storage: Storage) -> None:
        records = {unique("job"): f"r{i}".encode() for i in range(50)}
        storage.save(records, ttl=60)
        assert {job_id: storage.load(job_id) for job_id in records} == records

    def test_a_record_expires_after_its_ttl(self, storage: Storage, job_id: str) -> None:
        storage.save({job_id: b"short-lived"}, ttl=0.3)
        assert storage.load(job_id) == b"short-lived"
        eventually(lambda: storage.load(job_id) is None, timeout=5, what="the record to expire")

    def test_wait_returns_a_record_that_is_already_there(
        self, storage: Storage, job_id: str
    ) -> None:
        storage.save({job_id: b"done"}, ttl=60)
        assert storage.wait(job_id, timeout=1) == b"done"

    def test_wait_wakes_up_when_the_record_is_saved(self, storage: Storage, job_id: str) -> None:
        waiting = threading.Event()
        got: list[bytes | None] = []

        def wait() -> None:
            waiting.set()
            got.append(storage.wait(job_id, timeout=10))

        thread = threading.Thread(target=wait)
        thread.start()
        waiting.wait(5)
        begin = time.monotonic()
        storage.save({job_id: b"result"}, ttl=60)
        thread.join(10)
        assert got == [b"result"]
        assert time.monotonic() - begin < 5, "wait() returned at its timeout, not on the save"

    def test_several_waiters_on_one_job_all_wake_up(self, storage: Storage, job_id: str) -> None:
        got: list[bytes | None] = []
        lock = threading.Lock()
        ready = threading.Barrier(4)

        def wait() -> None:
            ready.wait(5)
            value = storage.wait(job_id, timeout=10)
            with lock:
                got.append(value)

        threads = [threading.Thread(target=wait) for _ in range(3)]
        for thread in threads:
            thread.start()
        ready.wait(5)
        storage.save({job_id: b"shared"}, ttl=60)
        for thread in threads:
            thread.join(10)
        assert got == [b"shared"] * 3

    def test_wait_gives_up_after_its_timeout(self, storage: Storage, job_id: str) -> None:
        begin = time.monotonic()
        assert storage.wait(job_id, timeout=0.2) is None
        assert time.monotonic() - begin >= 0.15

    def test_deleted_records_are_gone_and_unknown_ids_are_ignored(
        self, storage: Storage, job_id: str
    ) -> None:
        other = unique("job")
        storage.save({job_id: b"old", other: b"kept"}, ttl=60)
        storage.delete([job_id, unique("never-saved")])
        assert storage.load(job_id) is None
        assert storage.load(other) == b"kept"
        storage.delete([])

    # -- wait_async ------------------------------------------------------------------------

    def test_wait_async_returns_a_record_that_is_already_there(
        self, storage: Storage, job_id: str
    ) -> None:
        storage.save({job_id: b"done"}, ttl=60)

        async def main() -> bytes | None:
            return await asyncio.wait_for(storage.wait_async(job_id, 1), DEADLINE)

        assert asyncio.run(main()) == b"done"

    def test_wait_async_wakes_up_when_another_thread_saves_the_record(
        self, storage: Storage, job_id: str
    ) -> None:
        async def main() -> tuple[bytes | None, float]:
            waiting = asyncio.ensure_future(storage.wait_async(job_id, DEADLINE))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            begin = time.monotonic()
            await asyncio.to_thread(storage.save, {job_id: b"result"}, 60)
            data = await asyncio.wait_for(waiting, DEADLINE)
            return data, time.monotonic() - begin

        data, took = asyncio.run(main())
        assert data == b"result"
        assert took < DEADLINE / 2, "wait_async returned at its timeout, not on the save"

    def test_wait_async_gives_up_after_its_timeout(self, storage: Storage, job_id: str) -> None:
        async def main() -> bytes | None:
            return await asyncio.wait_for(storage.wait_async(job_id, 0.2), DEADLINE)

        begin = time.monotonic()
        assert asyncio.run(main()) is None
        assert time.monotonic() - begin >= 0.15

    def test_a_cancelled_wait_async_lets_go_at_once(self, storage: Storage, job_id: str) -> None:
        async def main() -> float:
            waiting = asyncio.ensure_future(storage.wait_async(job_id, None))
            await asyncio.sleep(0.05)
            begin = time.monotonic()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(waiting, DEADLINE)
            return time.monotonic() - begin

        assert asyncio.run(main()) < DEADLINE / 2
        storage.save({job_id: b"later"}, ttl=60)
        assert storage.load(job_id) == b"later"
