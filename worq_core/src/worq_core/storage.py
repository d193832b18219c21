"""The storage contract: keeps finished jobs' records (results and final errors) with a TTL."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Self


class Storage(ABC):
    """Base class of every result storage.

    A storage keeps opaque bytes per job id for a time-to-live; worq-core decides what they mean
    (a result, or the error of a dead job). It never interprets them. Methods must be safe to
    call from several threads at once.
    """

    name: ClassVar[str]
    """Unique plugin name, e.g. ``"redis"``."""
    schemes: ClassVar[tuple[str, ...]] = ()
    """URL schemes this storage serves; a broker URL with the same scheme picks it by default."""

    url: str = ""

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build a storage from a URL whose scheme is one of :attr:`schemes`. Does no I/O."""
        return cls(url)  # type: ignore[call-arg]

    @abstractmethod
    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        """Store each job's record, replacing any earlier one, to expire after ``ttl`` seconds.

        Wakes every :meth:`wait` on those job ids.
        """

    @abstractmethod
    def load(self, job_id: str) -> bytes | None:
        """The job's record, or ``None`` if there is none (yet, or any more)."""

    @abstractmethod
    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        """Block until the job has a record and return it; ``None`` after ``timeout`` seconds.

        ``timeout=None`` waits forever. Must not busy-poll.
        """

    @abstractmethod
    def delete(self, job_ids: Sequence[str]) -> None:
        """Forget the records of these jobs (unknown ids are ignored).

        Called before a job id runs again (a dead job requeued, or ``job_id=`` reused) so that
        an old record is never taken for the new run's.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections. The storage is unusable afterwards."""
