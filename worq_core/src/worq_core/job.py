"""Job handles, and the envelope and record formats that travel through brokers and storages."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worq_core.errors import DeserializationError, JobFailed, ResultTimeout
from worq_core.models import JobStatus
from worq_core.serializer import Serializer

if TYPE_CHECKING:
    from worq_core.app import Worq

ENVELOPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a job's broker message carries, before serialization: a task name, never code."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    enqueued_at: float

    def encode(self, serializer: Serializer) -> bytes:
        """Serialize; raises :class:`~worq_core.errors.SerializationError` for unsupported args."""
        return serializer.dumps(
            {
                "v": ENVELOPE_VERSION,
                "id": self.id,
                "task": self.task,
                "args": self.args,
                "kwargs": self.kwargs,
                "at": self.enqueued_at,
            }
        )

    @classmethod
    def decode(cls, data: bytes, serializer: Serializer) -> Envelope:
        """Deserialize and validate; raises :class:`~worq_core.errors.DeserializationError`."""
        value = serializer.loads(data)
        try:
            if value["v"] != ENVELOPE_VERSION:
                raise ValueError(f"unsupported envelope version {value['v']!r}")
            envelope = cls(
                id=value["id"],
                task=value["task"],
                args=value["args"],
                kwargs=value["kwargs"],
                enqueued_at=value["at"],
            )
            if not (
                isinstance(envelope.id, str)
                and isinstance(envelope.task, str)
                and isinstance(envelope.args, list)
                and isinstance(envelope.kwargs, dict)
            ):
                raise ValueError("malformed job envelope")
        except (TypeError, KeyError, ValueError) as exc:
            raise DeserializationError(serializer.name, f"not a worq job: {exc!r}") from exc
        return envelope


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A remote error, kept as text."""

    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str | None = None) -> ErrorInfo:
        """Describe ``exc`` by its qualified type name and message."""
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        try:
            message = str(exc)
        except Exception:  # noqa: BLE001 - a user exception whose __str__ itself fails
            message = f"<unprintable {kind.__qualname__}>"
        return cls(name, message, traceback)

    def summary(self) -> str:
        """One line: ``Type: message``."""
        return f"{self.type}: {self.message}"


def encode_success(serializer: Serializer, value: Any) -> bytes:
    """The storage record of a job that returned ``value``."""
    return serializer.dumps(
        {"status": JobStatus.SUCCEEDED.value, "result": value, "at": time.time()}
    )


def encode_failure(serializer: Serializer, error: ErrorInfo) -> bytes:
    """The storage record of a job that failed for good."""
    return serializer.dumps(
        {
            "status": JobStatus.DEAD.value,
            "error": {"type": error.type, "message": error.message, "traceback": error.traceback},
            "at": time.time(),
        }
    )


def decode_record(job_id: str, data: bytes, serializer: Serializer) -> tuple[JobStatus, Any]:
    """A storage record as ``(SUCCEEDED, value)`` or ``(DEAD, JobFailed)``."""
    record = serializer.loads(data)
    if record.get("status") == JobStatus.SUCCEEDED.value:
        return JobStatus.SUCCEEDED, record.get("result")
    error = record.get("error") or {}
    return JobStatus.DEAD, JobFailed(
        job_id,
        str(error.get("type", "Error")),
        str(error.get("message", "")),
        error.get("traceback"),
    )


class Job:
    """A handle on an enqueued job: its id, its status and, once finished, its result.

    Cheap to create (``app.job(job_id)``) and safe to share between threads.
    """

    __slots__ = ("app", "id", "queue", "task_name")

    def __init__(self, app: Worq, job_id: str, queue: str = "default", task_name: str = "") -> None:
        self.app = app
        self.id = job_id
        self.queue = queue
        self.task_name = task_name

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.task_name or '?'} queue={self.queue}>"

    def status(self) -> JobStatus:
        """Where the job is now: the broker's view while it holds the job, else its record."""
        state, record = self.app.broker.job_status(self.queue, self.id, self.app.storage)
        if state is not None:
            return state
        if record is None:
            return JobStatus.UNKNOWN
        status, _ = decode_record(self.id, record, self.app.serializer)
        return status

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its task's return value.

        Raises :class:`~worq_core.errors.JobFailed` if it was dead-lettered, and
        :class:`~worq_core.errors.ResultTimeout` (a :class:`TimeoutError`) after ``timeout``
        seconds (``None`` waits forever).
        """
        data = self.app.storage.wait(self.id, timeout)
        if data is None:
            raise ResultTimeout(self.id, timeout)
        status, value = decode_record(self.id, data, self.app.serializer)
        if status is JobStatus.DEAD:
            raise value
        return value

    async def result_async(self, timeout: float | None = None) -> Any:
        """:meth:`result` for asyncio code; waits on a thread, not on the event loop."""
        return await asyncio.to_thread(self.result, timeout)
