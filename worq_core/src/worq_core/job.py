"""Job handles, and the envelope and record formats that travel through brokers and storages."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from worq_core.context import Progress
from worq_core.errors import DeserializationError, JobCancelled, JobFailed, ResultTimeout
from worq_core.models import JobStatus
from worq_core.retry import RetryPolicy
from worq_core.serializer import Serializer

if TYPE_CHECKING:
    from worq_core.app import Worq

R = TypeVar("R")

ENVELOPE_VERSION = 2
"""The envelope format producers write: an array (see :class:`Envelope`). Version 1, a map, still
decodes."""
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def envelope_body(
    serializer: Serializer,
    job_id: str,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    enqueued_at: float,
    headers: Mapping[str, str] = _NO_HEADERS,
    options: Mapping[str, Any] = _NO_HEADERS,
    workflow: Mapping[str, Any] = _NO_HEADERS,
) -> bytes:
    """The bytes of :meth:`Envelope.encode`, without building an :class:`Envelope` first.

    For the enqueue paths, which only send them. Raises
    :class:`~worq_core.errors.SerializationError` for unsupported arguments.
    """
    if workflow:
        parts = [dict(headers), dict(options), dict(workflow)]
        return serializer.dumps([2, job_id, task, args, kwargs, enqueued_at, *parts])
    if options:
        return serializer.dumps(
            [2, job_id, task, args, kwargs, enqueued_at, dict(headers), dict(options)]
        )
    if headers:
        return serializer.dumps([2, job_id, task, args, kwargs, enqueued_at, dict(headers)])
    return serializer.dumps([2, job_id, task, args, kwargs, enqueued_at])


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a job's broker message carries, before serialization: a task name, never code.

    ``headers`` are string pairs for middleware and users (trace ids, tenants, workflow links);
    ``options`` are per-enqueue overrides of the task's ``timeout``, ``max_retries`` and
    ``retry`` (as ``[base, factor, max_delay, jitter]``). ``workflow`` holds a workflow
    step's links (:mod:`worq_core.canvas`): what to send when it succeeds, and where its
    arguments and its output go.

    Encoded as an array, ``[2, id, task, args, kwargs, enqueued_at, headers, options,
    workflow]``, the last three left out from the end while empty (an empty one before a
    non-empty one is ``{}``): no key names to write and read on every job. The first format, a
    map (``{"v": 1, "id": ..., "task": ..., "args": ..., "kwargs": ..., "at": ..., "h": ...,
    "o": ..., "w": ...}``), still decodes, so jobs an older producer queued run as before.
    """

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    enqueued_at: float
    headers: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    workflow: Mapping[str, Any] = field(default_factory=dict)

    def encode(self, serializer: Serializer) -> bytes:
        """Serialize; raises :class:`~worq_core.errors.SerializationError` for unsupported args."""
        return envelope_body(
            serializer,
            self.id,
            self.task,
            self.args,
            self.kwargs,
            self.enqueued_at,
            self.headers,
            self.options,
            self.workflow,
        )

    @classmethod
    def decode(cls, data: bytes, serializer: Serializer) -> Envelope:
        """Deserialize and validate; raises :class:`~worq_core.errors.DeserializationError`.

        Reads both formats: the array producers write now, and the map of version 1.
        """
        value = serializer.loads(data)
        try:
            if type(value) is list:
                if not 6 <= len(value) <= 9 or value[0] != ENVELOPE_VERSION:
                    raise ValueError("not an envelope array of version 2")
                job_id, task, args, kwargs, at = value[1:6]
                headers = (value[6] if len(value) > 6 else None) or _NO_HEADERS
                options = (value[7] if len(value) > 7 else None) or _NO_HEADERS
                workflow = (value[8] if len(value) > 8 else None) or _NO_HEADERS
            elif type(value) is dict:
                if value["v"] != 1:
                    raise ValueError(f"unsupported envelope version {value['v']!r}")
                job_id, task, args, kwargs, at = (
                    value["id"],
                    value["task"],
                    value["args"],
                    value["kwargs"],
                    value["at"],
                )
                headers = value.get("h") or _NO_HEADERS
                options = value.get("o") or _NO_HEADERS
                workflow = value.get("w") or _NO_HEADERS
            else:
                raise ValueError(f"an envelope is an array or a map, not {type(value).__name__}")
            if not (
                type(job_id) is str
                and type(task) is str
                and type(args) is list
                and type(kwargs) is dict
                and type(at) in (int, float)
            ):
                raise ValueError("malformed job envelope")
            if headers is not _NO_HEADERS and not (
                isinstance(headers, dict)
                and all(type(k) is str and type(v) is str for k, v in headers.items())
            ):
                raise ValueError("job headers must be a mapping of strings to strings")
            if options is not _NO_HEADERS:
                if not isinstance(options, dict):
                    raise ValueError("job options must be a mapping")
                check_options(options)
            if workflow is not _NO_HEADERS and not isinstance(workflow, dict):
                raise ValueError("job workflow links must be a mapping")
        except (TypeError, KeyError, ValueError) as exc:
            raise DeserializationError(serializer.name, f"not a worq job: {exc!r}") from exc
        return cls(job_id, task, args, kwargs, at, headers, options, workflow)


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``options`` are valid per-enqueue overrides."""
    unknown = set(options) - {"timeout", "max_retries", "retry"}
    if unknown:
        raise ValueError(f"unknown job options {sorted(unknown)}")
    timeout = options.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    retries = options.get("max_retries")
    if retries is not None and (not isinstance(retries, int) or retries < 0):
        raise ValueError(f"max_retries must be a whole number >= 0, not {retries!r}")
    if "retry" in options:
        RetryPolicy(*options["retry"])


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


def encode_cancelled(serializer: Serializer) -> bytes:
    """The storage record of a job that was cancelled."""
    return serializer.dumps({"status": JobStatus.CANCELLED.value, "at": time.time()})


def decode_record(job_id: str, data: bytes, serializer: Serializer) -> tuple[JobStatus, Any]:
    """A record as ``(SUCCEEDED, value)``, or ``(DEAD | CANCELLED, the error to raise)``."""
    record = serializer.loads(data)
    if record.get("status") == JobStatus.SUCCEEDED.value:
        return JobStatus.SUCCEEDED, record.get("result")
    if record.get("status") == JobStatus.CANCELLED.value:
        return JobStatus.CANCELLED, JobCancelled(job_id)
    error = record.get("error") or {}
    return JobStatus.DEAD, JobFailed(
        job_id,
        str(error.get("type", "Error")),
        str(error.get("message", "")),
        error.get("traceback"),
    )


class Job(Generic[R]):
    """A handle on an enqueued job: its id, its status and, once finished, its result.

    ``Job[R]`` is typed by its task's return type. Cheap to create (``app.job(job_id)``) and
    safe to share between threads. ``queue`` is where it was sent; a job id is unique across an
    app's queues, so every lookup works by id alone.
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
        state, record = self.app.broker.job_status(self.id, self.app.storage)
        if state is not None:
            return state.status
        if record is None:
            return JobStatus.UNKNOWN
        status, _ = decode_record(self.id, record, self.app.serializer)
        return status

    def progress(self) -> Progress | None:
        """The latest progress its task reported, while it runs; ``None`` otherwise.

        Needs a broker with :attr:`Capability.PROGRESS`; others always answer ``None``.
        """
        state = self.app.broker.job_state(self.id)
        if state is None or state.progress is None:
            return None
        try:
            return Progress.from_data(self.app.serializer.loads(state.progress))
        except (KeyError, TypeError, ValueError, DeserializationError):
            return None

    def cancel(self) -> bool:
        """Cancel the job; returns whether it was still there to cancel.

        A queued, scheduled or retrying job is removed at once and ends CANCELLED. A running
        job is told through its worker's next lease renewal (``current_job().cancelled`` turns
        true; an async task gets :class:`asyncio.CancelledError`) and ends CANCELLED unless it
        succeeds first. A cancelled job is never retried nor dead-lettered. A finished, dead
        or unknown job returns ``False`` and nothing changes. Raises
        :class:`~worq_core.errors.UnsupportedError` if the broker cannot cancel.
        """
        return self.app.cancel(self.id)

    def result(self, timeout: float | None = None) -> R:
        """Wait for the job to finish and return its task's return value.

        Raises :class:`~worq_core.errors.JobFailed` if it was dead-lettered,
        :class:`~worq_core.errors.JobCancelled` if it was cancelled, and
        :class:`~worq_core.errors.ResultTimeout` (a :class:`TimeoutError`) after ``timeout``
        seconds (``None`` waits forever).
        """
        data = self.app.storage.wait(self.id, timeout)
        if data is None:
            raise ResultTimeout(self.id, timeout)
        return self._value(data)

    def _value(self, data: bytes) -> R:
        status, value = decode_record(self.id, data, self.app.serializer)
        if status is not JobStatus.SUCCEEDED:
            raise value
        return value  # type: ignore[no-any-return]

    async def result_async(self, timeout: float | None = None) -> R:
        """:meth:`result` for asyncio code, through :meth:`Storage.wait_async`.

        Cancelling the awaiting task ends the wait; it ties up no thread of the event loop's
        default executor.
        """
        data = await self.app.storage.wait_async(self.id, timeout)
        if data is None:
            raise ResultTimeout(self.id, timeout)
        return self._value(data)
