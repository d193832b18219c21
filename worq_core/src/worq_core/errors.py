"""The worq error tree.

Every error worq raises derives from :class:`WorqError`. Errors keep the data they are about as
attributes and build their message in ``__init__`` so callers never have to parse text.
"""

from __future__ import annotations

from collections.abc import Iterable


class WorqError(Exception):
    """Base class of every error raised by worq."""


# -- plugins -----------------------------------------------------------------------------------


class PluginError(WorqError):
    """A plugin could not be loaded, or what it registered is invalid."""


class DuplicatePluginError(PluginError):
    """Two plugins registered the same name (or URL scheme) for the same kind of component."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        self.kind = kind
        self.name = name
        self.first = first
        self.second = second
        super().__init__(
            f"{kind} {name!r} is registered twice: by {first} and by {second}; "
            f"uninstall one of them"
        )


class UnknownPluginError(PluginError, LookupError):
    """No installed plugin provides the requested name or URL scheme."""

    def __init__(
        self, kind: str, name: str, available: Iterable[str], install_hint: str | None = None
    ) -> None:
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        self.install_hint = install_hint
        choices = ", ".join(self.available) or "none"
        message = f"unknown {kind} {name!r}; available: {choices}"
        if install_hint:
            message = (
                f"{name} needs {install_hint}: pip install {install_hint} (available: {choices})"
            )
        super().__init__(message)


# -- serialization -----------------------------------------------------------------------------


class SerializationError(WorqError, ValueError):
    """A value could not be turned into bytes by a serializer."""

    def __init__(self, serializer: str, reason: str) -> None:
        self.serializer = serializer
        self.reason = reason
        super().__init__(f"{serializer} serializer cannot encode the value: {reason}")


class DeserializationError(WorqError, ValueError):
    """Bytes could not be decoded into a job envelope or a result."""

    def __init__(self, serializer: str, reason: str) -> None:
        self.serializer = serializer
        self.reason = reason
        super().__init__(f"{serializer} serializer cannot decode the payload: {reason}")


# -- broker and storage ------------------------------------------------------------------------


class BrokerError(WorqError):
    """The broker failed to carry out an operation."""


class BrokerConnectionError(BrokerError, ConnectionError):
    """The broker's server could not be reached within the configured time."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the broker at {url}: {reason}")


class StorageError(WorqError):
    """The result storage failed to carry out an operation."""


class StorageConnectionError(StorageError, ConnectionError):
    """The storage's server could not be reached within the configured time."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the result storage at {url}: {reason}")


# -- tasks and jobs ----------------------------------------------------------------------------


class TaskError(WorqError):
    """A task was declared or called incorrectly."""


class ScheduleTaken(WorqError):
    """A schedule's tick was fired by another scheduler first, so this one sent no job.

    Never raised: it is what ``after_enqueue`` middleware is told for the job it prepared.
    """

    def __init__(self) -> None:
        super().__init__("another scheduler fired this tick first; this job was not sent")


class ScheduleError(TaskError, ValueError):
    """A schedule was declared wrongly, or a trigger was asked for a tick it cannot have.

    For example a bad cron expression, an unknown time zone, or a non-positive interval.
    """


class UnknownTaskError(TaskError, LookupError):
    """A job names a task that the worker's app does not register."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no task named {name!r} is registered on this app")


class TaskTimeoutError(WorqError, TimeoutError):
    """A job ran past its task's ``timeout``."""

    def __init__(self, task: str, timeout: float) -> None:
        self.task = task
        self.timeout = timeout
        super().__init__(f"task {task!r} ran past its timeout of {timeout:g}s")


class JobFailed(WorqError):
    """A job failed for good (it is dead-lettered); raised by :meth:`Job.result`.

    Carries the remote error's type name, message and formatted traceback, as text: the remote
    exception class is never imported or re-created.
    """

    def __init__(
        self, job_id: str, error_type: str, message: str, traceback: str | None = None
    ) -> None:
        self.job_id = job_id
        self.error_type = error_type
        self.message = message
        self.traceback = traceback
        super().__init__(f"job {job_id} failed: {error_type}: {message}")


class ResultTimeout(WorqError, TimeoutError):
    """:meth:`Job.result` gave up waiting before the job finished."""

    def __init__(self, job_id: str, timeout: float | None) -> None:
        self.job_id = job_id
        self.timeout = timeout
        super().__init__(f"job {job_id} has no result after {timeout}s")


class JobCancelled(WorqError):
    """The job was cancelled (:meth:`Job.cancel`); raised by :meth:`Job.result`."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was cancelled")


class UnsupportedError(WorqError):
    """The broker does not declare the capability an operation needs."""

    def __init__(self, broker: str, capability: str, operation: str) -> None:
        self.broker = broker
        self.capability = capability
        self.operation = operation
        super().__init__(
            f"{operation} needs a broker with the {capability!r} capability; "
            f"the {broker} broker does not have it"
        )


class InvalidNameError(TaskError, ValueError):
    """A queue name or job id that worq refuses (empty, blank, control characters, too long)."""

    def __init__(self, what: str, value: str, reason: str) -> None:
        self.what = what
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {what} {value[:80]!r}: {reason}")


class PayloadTooLarge(SerializationError):
    """A job's encoded payload is larger than the app's ``max_payload``; nothing was sent."""

    def __init__(self, serializer: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            serializer,
            f"the job is {size} bytes, over the app's max_payload of {limit} bytes "
            f"(pass large data by reference, or raise Worq(max_payload=...))",
        )


class EnqueueRejected(TaskError):
    """A middleware vetoed an enqueue; nothing was sent."""

    def __init__(self, task: str, reason: str, middleware: str = "") -> None:
        self.task = task
        self.reason = reason
        self.middleware = middleware
        by = f" by {middleware}" if middleware else ""
        super().__init__(f"enqueue of {task!r} rejected{by}: {reason}")


# -- control flow raised by tasks ------------------------------------------------------------


class Retry(Exception):
    """Raise in a task to ask for a retry after ``delay`` seconds (the retry policy's if None).

    It counts as a failed attempt: with no retries left the job is dead-lettered.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and delay < 0:
            raise ValueError("Retry delay must not be negative")
        self.delay = delay
        self.reason = reason
        super().__init__(reason or (f"retry in {delay:g}s" if delay is not None else "retry"))


class Reject(Exception):
    """Raise in a task to dead-letter the job at once, whatever retries it has left."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(reason or "rejected by the task")
