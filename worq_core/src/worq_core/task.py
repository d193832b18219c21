"""Tasks: functions registered on an app, which can be called inline or enqueued as jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar

from worq_core.context import JobContext
from worq_core.context import _current as _current_job
from worq_core.errors import PayloadTooLarge, TaskError, UnsupportedError, WorqError
from worq_core.job import _NO_HEADERS, Envelope, Job, envelope_body
from worq_core.limits import TaskLimits, named_arguments, unique_key_for, unique_until
from worq_core.middleware import EnqueueRequest
from worq_core.models import Capability, Message, UniqueUntil
from worq_core.retry import RetryPolicy
from worq_core.validation import check_job_id, check_queue

logger = logging.getLogger("worq.task")

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.canvas import Signature

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
    retry_on: tuple[type[BaseException], ...] = ()
    """Only these exceptions are retried (all are, when empty); others dead-letter at once."""
    dont_retry_on: tuple[type[BaseException], ...] = ()
    """These exceptions dead-letter at once, whatever retries are left."""
    limits: TaskLimits | None = None
    """Its unique key and its global rate and concurrency limits, if it declares any."""


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Per-enqueue overrides from :meth:`Task.options`."""

    queue: str | None = None
    priority: int | None = None
    delay: float | None = None
    eta: float | None = None
    job_id: str | None = None
    headers: Mapping[str, str] | None = None
    timeout: float | None = None
    max_retries: int | None = None
    retry: RetryPolicy | None = None
    unique: UniqueUntil | Literal[False] | None = None
    """The unique mode for this job; ``False``: none, whatever the task declares."""
    unique_key: str | None = None
    unique_for: float | None = None
    connection: object | None = None
    """The application's own database connection to enqueue on (:meth:`Broker.enqueue_on`)."""

    def job_options(self) -> dict[str, Any]:
        """The overrides that travel with the job, for the worker."""
        options: dict[str, Any] = {}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.max_retries is not None:
            options["max_retries"] = self.max_retries
        if self.retry is not None:
            r = self.retry
            options["retry"] = [r.base, r.factor, r.max_delay, r.jitter]
        return options


class Task(Generic[P, R]):
    """A registered task. Call it to run inline; :meth:`enqueue` it to run on a worker."""

    def __init__(self, app: Worq, fn: Callable[P, R], config: TaskConfig) -> None:
        if config.max_retries < 0:
            raise TaskError(f"task {config.name!r}: max_retries must be >= 0")
        if config.timeout is not None and config.timeout <= 0:
            raise TaskError(f"task {config.name!r}: timeout must be positive")
        check_queue(config.queue)
        self.app = app
        self.fn = fn
        self.config = config
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature = inspect.signature(fn)
        self._bound_arities: set[int] = set()  # positional-argument counts known to bind
        self._plain: BoundTask[P, R] = BoundTask(self, SendOptions())  # enqueue's, made once
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def name(self) -> str:
        """The name that jobs carry and workers look up."""
        return self.config.name

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.config.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task inline, in this process, with no broker involved.

        The call gets a :func:`current_job` context of its own (attempt 1, no headers), so a
        task that reports progress or checks ``cancelled`` also works when called directly.
        """
        context = self._inline_context()
        token = _current_job.set(context)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _current_job.reset(token)

    def _inline_context(self) -> JobContext:
        return JobContext(_new_job_id(), self.name, self.config.queue, 1, self.config.max_retries)

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        eta: float | None = None,
        job_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        unique: bool | str | UniqueUntil | None = None,
        unique_key: str | None = None,
        unique_for: float | None = None,
        connection: object | None = None,
    ) -> BoundTask[P, R]:
        """Override options for the next enqueue: ``add.options(delay=30).enqueue(1, 2)``.

        ``delay`` is seconds from now, ``eta`` a Unix time; give at most one. ``job_id`` makes the
        enqueue idempotent: while a job with that id is still held (in any queue of the app),
        no second one is added. ``headers`` are string pairs the task reads from
        ``current_job().headers``. ``timeout``, ``max_retries`` and ``retry`` override the
        task's own for this job. ``unique`` (``True``, ``"until_started"`` or
        ``"until_done"``), ``unique_key`` and ``unique_for`` (seconds) make this one job
        unique, or change the task's own unique settings: while an equal job is held, the
        enqueue adds nothing and returns that job's handle (see ``docs/scheduling.md``).
        ``unique=False`` sends this one job without the task's unique key.

        ``connection`` is your own open database connection, on a broker with the
        ``transactional`` capability (worq-postgres: a ``psycopg.Connection``): the job is
        written inside that connection's transaction and exists only if it commits. Other
        brokers raise :class:`~worq_core.errors.UnsupportedError`.
        """
        if delay is not None and eta is not None:
            raise TaskError("give delay or eta, not both")
        if delay is not None and delay < 0:
            raise TaskError("delay must not be negative")
        if queue is not None:
            check_queue(queue)
        if job_id is not None:
            check_job_id(job_id)
        if headers is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise TaskError("job headers must be strings")
        if timeout is not None and timeout <= 0:
            raise TaskError("timeout must be positive")
        if max_retries is not None and max_retries < 0:
            raise TaskError("max_retries must be >= 0")
        if unique_for is not None and unique_for < 0:
            raise TaskError("unique_for must not be negative")
        if unique_key is not None and not (isinstance(unique_key, str) and unique_key):
            raise TaskError("unique_key must be a non-empty string")
        if unique is False and (unique_key is not None or unique_for is not None):
            raise TaskError("unique=False sends the job without a key: drop unique_key/unique_for")
        send = SendOptions(
            queue,
            priority,
            delay,
            eta,
            job_id,
            None if headers is None else dict(headers),
            timeout,
            max_retries,
            retry,
            False if unique is False else unique_until(unique),
            unique_key,
            unique_for,
            connection,
        )
        if connection is not None:
            broker = self.app.broker
            if Capability.TRANSACTIONAL not in broker.capabilities:
                raise UnsupportedError(
                    broker.name, Capability.TRANSACTIONAL.value, "enqueueing on your connection"
                )
        return BoundTask(self, send)

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature of this call, for a workflow: ``chain(fetch.s(url), parse.s())``.

        Nothing is sent. Its arguments are checked when the workflow is enqueued; in a chain,
        every step but the first gets the previous step's result as its first argument, so its
        own arguments here leave that one out (why they are not typed like the task's).
        """
        return self._plain.s(*args, **kwargs)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Send one job and return its :class:`Job`.

        Raises before sending anything if the arguments do not fit the signature
        (:class:`TaskArgumentsError`) or cannot be serialized (:class:`SerializationError`).
        """
        return self._plain.enqueue(*args, **kwargs)

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """:meth:`enqueue` for asyncio code, through :meth:`Broker.enqueue_async`.

        A broker with an asyncio client (worq-redis) sends the job from the event loop itself;
        any other runs its blocking enqueue on a thread.
        """
        return await self._plain.enqueue_async(*args, **kwargs)

    def enqueue_many(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[Job[R]]:
        """Send many jobs in one broker batch, all or nothing.

        Each item is a tuple of positional arguments, or a mapping of keyword arguments.
        """
        return self._plain.enqueue_many(calls)


class AsyncTask(Task[P, R]):
    """A task whose function is ``async def``; ``R`` is what its coroutine returns.

    Calling it inline returns the coroutine to await, which runs with a :func:`current_job`
    context of its own.
    """

    def __call__(  # type: ignore[override]
        self, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, R]:
        """Build the coroutine of an inline run (awaiting it runs the task)."""
        return _inline_async(self._inline_context(), self.fn(*args, **kwargs))  # type: ignore[arg-type]


class BoundTask(Generic[P, R]):
    """A task with per-enqueue options applied; made by :meth:`Task.options`."""

    def __init__(self, task: Task[P, R], send: SendOptions) -> None:
        self.task = task
        self.send = send
        self._job_options = send.job_options() or _NO_HEADERS

    def options(self, **overrides: Any) -> BoundTask[P, R]:
        """Further overrides on top of these (headers are merged)."""
        if overrides.get("headers") is not None and self.send.headers:
            overrides["headers"] = {**self.send.headers, **overrides["headers"]}
        merged = dataclasses.replace(self.send, **overrides)
        return self.task.options(
            **{f.name: getattr(merged, f.name) for f in dataclasses.fields(merged)}
        )

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Send one job with these options.

        A unique job whose key is held returns the handle of the job that holds it.
        """
        message, job, request = self._prepare(list(args), dict(kwargs), self.send.job_id)
        if request is None or not self.task.app.middleware.after_enqueues:
            return self._standing(job, self._send(message))
        with self._reporting([request]):
            return self._standing(job, self._send(message))

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """:meth:`enqueue` for asyncio code, through :meth:`Broker.enqueue_async`.

        A broker with an asyncio client sends the job from the event loop itself; any other runs
        its :meth:`Broker.enqueue` on a thread. The same middleware hooks, answers and errors as
        :meth:`enqueue`.
        """
        message, job, request = self._prepare(list(args), dict(kwargs), self.send.job_id)
        with self._reporting([request]):
            return self._standing(job, await self._send_async(message))

    @contextlib.contextmanager
    def _reporting(self, requests: Sequence[EnqueueRequest | None]) -> Iterator[None]:
        """Tell the ``after_enqueue`` middleware how sending ``requests`` ended."""
        hooks = self.task.app.middleware.after_enqueues
        if not hooks:
            yield
            return
        sent = [request for request in requests if request is not None]
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            tell_after_enqueue(hooks, sent, error)

    def _standing(self, job: Job[R], holder: str | None) -> Job[R]:
        """``job``, or a handle on ``holder``: the equal job that stands for it."""
        if holder is None or holder == job.id:
            return job
        return Job(job.app, holder, job.queue, job.task_name)

    def _send(self, message: Message) -> str | None:
        """Send one message; ``None`` if it was added, else the id of the job standing for it."""
        app = self.task.app
        sent_at = time.time()
        if self.send.connection is not None:
            [holder] = app.broker.enqueue_on(self.send.connection, [message])
        elif message.unique is not None:
            [holder] = app.broker.enqueue_unique([message])
        else:
            holder = None if app.broker.enqueue([message]) == [True] else message.id
        if message.clear_record and holder is None and not app.broker_stores_results:
            self._clear_stale_record(message.id, sent_at)
        return holder

    async def _send_async(self, message: Message) -> str | None:
        """:meth:`_send` from an event loop, through the broker's asyncio enqueue."""
        import asyncio  # here, not at the top: only asyncio code comes here, and it has it

        if self.send.connection is not None:  # the caller's connection is a blocking one
            return await asyncio.to_thread(self._send, message)
        app = self.task.app
        sent_at = time.time()
        if message.unique is not None:
            [holder] = await app.broker.enqueue_unique_async([message])
        else:
            added = await app.broker.enqueue_async([message])
            holder = None if added == [True] else message.id
        if message.clear_record and holder is None and not app.broker_stores_results:
            await asyncio.to_thread(self._clear_stale_record, message.id, sent_at)
        return holder

    def _clear_stale_record(self, job_id: str, sent_at: float) -> None:
        """Delete what an earlier run of a caller's id left in a storage the broker does not write.

        A broker that stores results dropped the old record in the step that added the job.
        Here it must not answer for the new run: it is deleted only if the id was added (a job
        still held keeps its record, the caller checks) and only if it is older than this
        enqueue (never the new run's).
        """
        app = self.task.app
        old = app.storage.load(job_id)
        if old is not None and _record_time(old, app) < sent_at:
            app.storage.delete([job_id])

    def enqueue_many(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[Job[R]]:
        """Send many jobs in one broker batch, all or nothing."""
        if self.send.job_id is not None:
            raise TaskError("job_id names one job; it cannot be used with enqueue_many")
        send, task = self.send, self.task
        stack = task.app.middleware
        if (
            send.connection is None
            and send.unique is None
            and send.unique_key is None
            and task.config.limits is None
            and not (stack.enqueue or stack.after_enqueues)
        ):
            messages, jobs = self._plain_batch(calls)
            if messages:
                task.app.broker.enqueue(messages)
            return jobs
        prepared = []
        try:
            for call in calls:
                if isinstance(call, Mapping):
                    prepared.append(self._prepare([], dict(call), None))
                elif isinstance(call, Sequence) and not isinstance(call, str | bytes):
                    prepared.append(self._prepare(list(call), {}, None))
                else:
                    raise TaskArgumentsError(
                        self.task.name,
                        "each enqueue_many item is a tuple of args or a dict of kwargs",
                    )
        except BaseException as exc:
            # Nothing of the batch is sent: the items prepared so far hear why.
            earlier = [request for _, _, request in prepared if request is not None]
            if earlier:
                tell_after_enqueue(self.task.app.middleware.after_enqueues, earlier, exc)
            raise
        if not prepared:
            return []
        messages = [message for message, _, _ in prepared]
        broker = self.task.app.broker
        with self._reporting([request for _, _, request in prepared]):
            if self.send.connection is not None or any(
                message.unique is not None for message in messages
            ):
                holders = (
                    broker.enqueue_unique(messages)
                    if self.send.connection is None
                    else broker.enqueue_on(self.send.connection, messages)
                )
                return [
                    self._standing(job, h) for (_, job, _), h in zip(prepared, holders, strict=True)
                ]
            broker.enqueue(messages)
        return [job for _, job, _ in prepared]

    def _plain_batch(
        self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]
    ) -> tuple[list[Message], list[Job[R]]]:
        """The messages and handles of ``calls``, for a batch :meth:`_prepare` need not see.

        A batch with no middleware, unique keys, limits or caller's ids: its per-call work is cut
        to what differs per call. Everything the calls share is worked out once (queue,
        priority, eta, headers, options, the enqueue time), and the ids come from one read of
        the OS's randomness.
        """
        task, send = self.task, self.send
        app, config = task.app, task.config
        items = calls if isinstance(calls, list | tuple) else list(calls)
        queue = send.queue or config.queue
        priority = config.priority if send.priority is None else send.priority
        now = time.time()
        eta = send.eta if send.eta is not None else (now + send.delay if send.delay else None)
        name, headers, options = task.name, send.headers or _NO_HEADERS, self._job_options
        serializer, limit = app.serializer, app.max_payload
        signature, arities = task._signature, task._bound_arities
        messages: list[Message] = []
        jobs: list[Job[R]] = []
        for job_id, call in zip(_new_job_ids(len(items)), items, strict=True):
            if type(call) is tuple or type(call) is list:
                args, kwargs = list(call), {}
            elif isinstance(call, Mapping):
                args, kwargs = [], dict(call)
            elif isinstance(call, Sequence) and not isinstance(call, str | bytes):
                args, kwargs = list(call), {}
            else:
                raise TaskArgumentsError(
                    task.name, "each enqueue_many item is a tuple of args or a dict of kwargs"
                )
            if kwargs or len(args) not in arities:
                try:
                    signature.bind(*args, **kwargs)
                except TypeError as exc:
                    raise TaskArgumentsError(task.name, str(exc)) from exc
                if not kwargs:
                    arities.add(len(args))
            body = envelope_body(serializer, job_id, name, args, kwargs, now, headers, options)
            if len(body) > limit:
                raise PayloadTooLarge(serializer.name, len(body), limit)
            messages.append(Message(job_id, queue, body, priority, eta))
            jobs.append(Job(app, job_id, queue, name))
        return messages, jobs

    def _headers(
        self, job_id: str, queue: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[Mapping[str, str] | None, EnqueueRequest | None]:
        """The job's headers: these options', then what the app's enqueue middleware set.

        Also the request the middleware saw (``None`` when no middleware looks at enqueues).
        """
        headers = self.send.headers
        stack = self.task.app.middleware
        if not (stack.enqueue or stack.after_enqueues):
            return headers, None
        request = EnqueueRequest(self.task.name, job_id, queue, args, kwargs, dict(headers or {}))
        try:
            for hook in stack.enqueue:
                hook(request)
            headers = request.headers
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                raise TaskError(f"middleware set headers that are not all strings: {headers!r}")
        except BaseException as exc:
            # A veto (or a bad header): what an earlier before_enqueue opened must hear of it.
            tell_after_enqueue(stack.after_enqueues, [request], exc)
            raise
        return headers, request

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature of this call with these options, for a workflow (:mod:`worq_core.canvas`)."""
        from worq_core.canvas import Signature

        return Signature(self, args, dict(kwargs))

    def _step_spec(
        self, args: list[Any], kwargs: dict[str, Any], *, pass_result: bool, job_id: str
    ) -> dict[str, Any]:
        """A workflow step as its links carry it; checks the arguments as :meth:`enqueue` does.

        With ``pass_result`` the step will receive the previous step's result first. ``job_id``
        is the workflow's id for the step, unless the caller fixed one with ``options``.
        """
        task = self.task
        try:
            task._signature.bind(*([None] if pass_result else []), *args, **kwargs)
        except TypeError as exc:
            raise TaskArgumentsError(task.name, str(exc)) from exc
        send = self.send
        if send.unique is not None or send.unique_key is not None or task.config.limits:
            raise TaskError(
                f"task {task.name!r}: unique keys and limits do not apply to workflow steps yet"
            )
        if send.delay is not None or send.eta is not None:
            raise TaskError(f"task {task.name!r}: a workflow step cannot be delayed yet")
        if send.connection is not None:
            raise TaskError(
                f"task {task.name!r}: a workflow step cannot be enqueued on a connection yet"
            )
        job_id = send.job_id or job_id
        queue = send.queue or task.config.queue
        spec: dict[str, Any] = {
            "id": job_id,
            "task": task.name,
            "args": args,
            "kwargs": kwargs,
            "queue": queue,
            "p": task.config.priority if send.priority is None else send.priority,
            "pass": pass_result,
        }
        if send.job_id:
            spec["fixed"] = True  # a caller's id: an earlier run's record is cleared on enqueue
        headers, _ = self._headers(job_id, queue, args, kwargs)
        if headers:
            spec["h"] = dict(headers)
        if self._job_options:
            spec["o"] = dict(self._job_options)
        return spec

    def _prepare(
        self, args: list[Any], kwargs: dict[str, Any], job_id: str | None
    ) -> tuple[Message, Job[R], EnqueueRequest | None]:
        task = self.task
        app = task.app
        # Whether arguments bind depends only on their count and keyword names, so a count of
        # positional arguments that bound once is not checked again (it costs microseconds).
        if kwargs or len(args) not in task._bound_arities:
            try:
                task._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TaskArgumentsError(task.name, str(exc)) from exc
            if not kwargs:
                task._bound_arities.add(len(args))
        fixed = bool(job_id)
        if not job_id:
            job_id = _new_job_id()
        send, config = self.send, task.config
        queue = send.queue or config.queue
        headers, request = self._headers(job_id, queue, args, kwargs)
        try:
            now = time.time()
            body = envelope_body(
                app.serializer,
                job_id,
                task.name,
                args,
                kwargs,
                now,
                headers or _NO_HEADERS,
                self._job_options,
            )
            if len(body) > app.max_payload:
                raise PayloadTooLarge(app.serializer.name, len(body), app.max_payload)
            eta = send.eta if send.eta is not None else (now + send.delay if send.delay else None)
            priority = config.priority if send.priority is None else send.priority
            message = Message(job_id, queue, body, priority, eta, fixed)
            if config.limits is not None or send.unique is not None or send.unique_key is not None:
                message = self._limited(message, args, kwargs)
        except BaseException as exc:
            if request is not None:  # it will not be sent: a span opened for it must end
                tell_after_enqueue(app.middleware.after_enqueues, [request], exc)
            raise
        return message, Job(app, job_id, queue, task.name), request

    def _limited(self, message: Message, args: list[Any], kwargs: dict[str, Any]) -> Message:
        """``message`` with the unique key and limits of this call, checked against the broker."""
        task, send = self.task, self.send
        limits = task.config.limits
        named = named_arguments(task._signature, args, kwargs)
        unique = unique_key_for(
            task.name,
            limits,
            named,
            mode=send.unique,
            key=send.unique_key,
            hold_for=send.unique_for,
        )
        rate = limits.rate(task.name, named) if limits is not None else None
        concurrency = limits.concurrency_limit(task.name, named) if limits is not None else None
        broker = task.app.broker
        if unique is not None and Capability.UNIQUE not in broker.capabilities:
            raise UnsupportedError(broker.name, Capability.UNIQUE.value, "a unique job")
        if (rate or concurrency) and Capability.LIMITS not in broker.capabilities:
            raise UnsupportedError(
                broker.name, Capability.LIMITS.value, "a rate or concurrency limit"
            )
        return dataclasses.replace(message, unique=unique, rate=rate, concurrency=concurrency)


def tell_after_enqueue(
    hooks: Sequence[Callable[[Sequence[EnqueueRequest], BaseException | None], None]],
    requests: Sequence[EnqueueRequest],
    error: BaseException | None,
) -> None:
    """Call each ``after_enqueue`` hook; one that raises is logged and the others still run."""
    for hook in hooks:
        try:
            hook(requests, error)
        except Exception:
            logger.exception("after_enqueue middleware %r failed", hook)


def tell_sent(app: Worq, messages: Sequence[Message]) -> None:
    """Tell the app's ``after_enqueue`` hooks of messages sent without an enqueue call.

    Workflow steps are built when the workflow is enqueued and sent later, by the broker with
    the settlement of the step before them: their requests are rebuilt from the messages.
    """
    hooks = app.middleware.after_enqueues
    if not hooks or not messages:
        return
    requests = []
    for message in messages:
        try:
            envelope = Envelope.decode(message.body, app.serializer)
        except WorqError:  # encoded by this process a moment ago; never expected
            continue
        requests.append(
            EnqueueRequest(
                envelope.task,
                message.id,
                message.queue,
                envelope.args,
                dict(envelope.kwargs),
                dict(envelope.headers),
            )
        )
    tell_after_enqueue(hooks, requests, None)


def _new_job_id() -> str:
    """``uuid.uuid4().hex``, without building a UUID object: 16 random bytes, version 4."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()


_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))
_VARIANT = bytes(b & 0x3F | 0x80 for b in range(256))


def _new_job_ids(count: int) -> list[str]:
    """``count`` ids as :func:`_new_job_id` makes them, from one read of the OS's randomness.

    The version and variant bits of every id are set by two C-level translations of strided
    slices, and the hex text is made once and cut.
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    text = raw.hex()
    return [text[at : at + 32] for at in range(0, 32 * count, 32)]


def _record_time(data: bytes, app: Worq) -> float:
    try:
        return float(app.serializer.loads(data).get("at") or 0.0)
    except Exception:  # noqa: BLE001 - an unreadable record is stale by definition
        return 0.0


async def _inline_async(context: JobContext, coro: Awaitable[R]) -> R:
    token = _current_job.set(context)
    try:
        return await coro
    finally:
        _current_job.reset(token)
