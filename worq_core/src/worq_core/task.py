"""Tasks: functions registered on an app, which can be called inline or enqueued as jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from worq_core.errors import TaskError
from worq_core.job import Envelope, Job
from worq_core.models import Message
from worq_core.retry import RetryPolicy

if TYPE_CHECKING:
    from worq_core.app import Worq

P = ParamSpec("P")
R = TypeVar("R")


class TaskArgumentsError(TaskError, TypeError):
    """Arguments that do not fit the task's signature; nothing was enqueued."""

    def __init__(self, task: str, reason: str) -> None:
        self.task = task
        self.reason = reason
        super().__init__(f"bad arguments for task {task!r}: {reason}")


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """A task's declared options (see :meth:`Worq.task`)."""

    name: str
    queue: str = "default"
    priority: int = 0
    max_retries: int = 3
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Per-enqueue overrides from :meth:`Task.options`."""

    queue: str | None = None
    priority: int | None = None
    delay: float | None = None
    eta: float | None = None
    job_id: str | None = None


class Task(Generic[P, R]):
    """A registered task. Call it to run inline; :meth:`enqueue` it to run on a worker."""

    def __init__(self, app: Worq, fn: Callable[P, R], config: TaskConfig) -> None:
        if config.max_retries < 0:
            raise TaskError(f"task {config.name!r}: max_retries must be >= 0")
        if config.timeout is not None and config.timeout <= 0:
            raise TaskError(f"task {config.name!r}: timeout must be positive")
        self.app = app
        self.fn = fn
        self.config = config
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature = inspect.signature(fn)
        self._bound_arities: set[int] = set()  # positional-argument counts known to bind
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def name(self) -> str:
        """The name that jobs carry and workers look up."""
        return self.config.name

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.config.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task inline, in this process, with no broker involved."""
        return self.fn(*args, **kwargs)

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        eta: float | None = None,
        job_id: str | None = None,
    ) -> BoundTask[P, R]:
        """Override options for the next enqueue: ``add.options(delay=30).enqueue(1, 2)``.

        ``delay`` is seconds from now, ``eta`` a Unix time; give at most one. ``job_id`` makes the
        enqueue idempotent: a job with that id that is still queued or running is not added twice.
        """
        if delay is not None and eta is not None:
            raise TaskError("give delay or eta, not both")
        if delay is not None and delay < 0:
            raise TaskError("delay must not be negative")
        return BoundTask(self, SendOptions(queue, priority, delay, eta, job_id))

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Send one job and return its :class:`Job`.

        Raises before sending anything if the arguments do not fit the signature
        (:class:`TaskArgumentsError`) or cannot be serialized (:class:`SerializationError`).
        """
        return BoundTask(self, SendOptions()).enqueue(*args, **kwargs)

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """:meth:`enqueue` for asyncio code; the broker call runs on a thread."""
        return await BoundTask(self, SendOptions()).enqueue_async(*args, **kwargs)

    def enqueue_many(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[Job]:
        """Send many jobs in one broker batch, all or nothing.

        Each item is a tuple of positional arguments, or a mapping of keyword arguments.
        """
        return BoundTask(self, SendOptions()).enqueue_many(calls)


class BoundTask(Generic[P, R]):
    """A task with per-enqueue options applied; made by :meth:`Task.options`."""

    def __init__(self, task: Task[P, R], send: SendOptions) -> None:
        self.task = task
        self.send = send

    def options(self, **overrides: Any) -> BoundTask[P, R]:
        """Further overrides on top of these."""
        merged = dataclasses.replace(self.send, **overrides)
        return self.task.options(**dataclasses.asdict(merged))

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Send one job with these options."""
        message, job = self._prepare(list(args), dict(kwargs), self.send.job_id)
        self._send(message)
        return job

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """:meth:`enqueue` for asyncio code; the broker call runs on a thread."""
        message, job = self._prepare(list(args), dict(kwargs), self.send.job_id)
        await asyncio.to_thread(self._send, message)
        return job

    def _send(self, message: Message) -> None:
        app = self.task.app
        if self.send.job_id is not None and app.broker.job_state(message.queue, message.id) is None:
            # The id may have run before: its old record must not answer for this new run.
            # (While the broker still holds the id, the enqueue is a no-op and the record stays.)
            app.storage.delete([message.id])
        app.broker.enqueue([message])

    def enqueue_many(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[Job]:
        """Send many jobs in one broker batch, all or nothing."""
        if self.send.job_id is not None:
            raise TaskError("job_id names one job; it cannot be used with enqueue_many")
        prepared = []
        for call in calls:
            if isinstance(call, Mapping):
                prepared.append(self._prepare([], dict(call), None))
            elif isinstance(call, Sequence) and not isinstance(call, str | bytes):
                prepared.append(self._prepare(list(call), {}, None))
            else:
                raise TaskArgumentsError(
                    self.task.name, "each enqueue_many item is a tuple of args or a dict of kwargs"
                )
        if prepared:
            self.task.app.broker.enqueue([message for message, _ in prepared])
        return [job for _, job in prepared]

    def _prepare(
        self, args: list[Any], kwargs: dict[str, Any], job_id: str | None
    ) -> tuple[Message, Job]:
        task = self.task
        # Whether arguments bind depends only on their count and keyword names, so a count of
        # positional arguments that bound once is not checked again (it costs microseconds).
        if kwargs or len(args) not in task._bound_arities:
            try:
                task._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TaskArgumentsError(task.name, str(exc)) from exc
            if not kwargs:
                task._bound_arities.add(len(args))
        if not job_id:
            # uuid.uuid4().hex, without building a UUID object: 16 random bytes, version 4.
            raw = bytearray(os.urandom(16))
            raw[6] = raw[6] & 0x0F | 0x40
            raw[8] = raw[8] & 0x3F | 0x80
            job_id = raw.hex()
        now = time.time()
        body = Envelope(job_id, task.name, args, kwargs, now).encode(task.app.serializer)
        send, config = self.send, task.config
        eta = send.eta if send.eta is not None else (now + send.delay if send.delay else None)
        queue = send.queue or config.queue
        priority = config.priority if send.priority is None else send.priority
        return Message(job_id, queue, body, priority, eta), Job(task.app, job_id, queue, task.name)
