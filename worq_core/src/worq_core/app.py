"""The application object: configuration, the task registry, and the way to workers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from worq_core.broker import Broker
from worq_core.errors import DeserializationError, TaskError, UnknownTaskError, UnsupportedError
from worq_core.job import Envelope, Job, encode_cancelled
from worq_core.limits import KeyFunction, TaskLimits
from worq_core.middleware import Middleware, MiddlewareStack
from worq_core.models import CancelOutcome, Capability, Event, EventKind, JobStatus, UniqueUntil
from worq_core.registry import Registry, default_registry
from worq_core.retry import RetryPolicy
from worq_core.scheduling import Missed, Schedule, make_schedule
from worq_core.serializer import Serializer
from worq_core.storage import Storage
from worq_core.task import AsyncTask, SendOptions, Task, TaskConfig

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from worq_core.canvas import Workflow
    from worq_core.worker import Worker, WorkerSettings

P = ParamSpec("P")
R = TypeVar("R")


class TaskDecorator(Protocol):
    """What ``@app.task(...)`` with options returns: it registers the function it decorates."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:
        """Register ``fn`` as a task."""


DEFAULT_RESULT_TTL = 24 * 3600.0
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024


class Worq:
    """A worq application: where jobs go (broker), where results stay (storage), and the tasks.

    ``broker`` is a URL whose scheme picks an installed broker plugin (``memory://``,
    ``redis://...``) or a :class:`Broker` instance. ``storage`` defaults to the broker's own
    backend. ``middleware`` is an ordered list of :class:`Middleware` instances, or names of
    middleware classes that plugins registered. ``max_payload`` (bytes, default 16 MiB) caps
    one job's encoded arguments; larger ones raise :class:`~worq_core.errors.PayloadTooLarge`
    before anything is sent. ``events=True`` sends every state change of the app's jobs to the
    broker's recent-events stream (:mod:`worq_core.events`), for the dashboard and other
    followers. Building an app does no I/O; the broker and storage are created on first use.
    """

    def __init__(
        self,
        broker: str | Broker = "memory://",
        *,
        storage: str | Storage | None = None,
        serializer: str | Serializer = "msgpack",
        result_ttl: float = DEFAULT_RESULT_TTL,
        registry: Registry | None = None,
        middleware: Sequence[Middleware | str] = (),
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        events: bool = False,
    ) -> None:
        if max_payload < 1:
            raise ValueError("max_payload must be positive")
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        """Every periodic schedule, by name (see :meth:`periodic` and :meth:`schedule`)."""
        self.result_ttl = result_ttl
        self.max_payload = max_payload
        self._middleware_spec = tuple(middleware)
        self.events = events
        self._registry = registry
        self._broker_spec = broker
        self._storage_spec = storage
        self._serializer_spec = serializer

    def __repr__(self) -> str:
        spec = self._broker_spec
        return (
            f"<Worq broker={spec if isinstance(spec, str) else spec.name} tasks={len(self.tasks)}>"
        )

    @property
    def registry(self) -> Registry:
        """The plugin registry this app resolves names against."""
        if self._registry is None:
            self._registry = default_registry()
        return self._registry

    def configure(
        self, *, broker: str | Broker | None = None, storage: str | Storage | None = None
    ) -> None:
        """Point the app at another broker (and storage) before it is first used.

        This is what ``worq --broker URL`` does. When only the broker changes, the storage follows
        it to the same backend.
        """
        for cached in ("broker", "storage"):
            if cached in self.__dict__:
                raise TaskError("configure() must run before the app's broker or storage is used")
        if broker is not None:
            self._broker_spec = broker
            if storage is None and isinstance(broker, str):
                self._storage_spec = None
        if storage is not None:
            self._storage_spec = storage

    @functools.cached_property
    def broker(self) -> Broker:
        """The broker, built from the URL on first use."""
        spec = self._broker_spec
        if isinstance(spec, Broker):
            return spec
        return self.registry.broker_class(spec).from_url(spec)

    @functools.cached_property
    def storage(self) -> Storage:
        """The result storage; by default the broker's own backend (same URL)."""
        spec = self._storage_spec
        if isinstance(spec, Storage):
            return spec
        if spec is None:
            spec = self._broker_spec if isinstance(self._broker_spec, str) else self.broker.url
        return self.registry.storage_class(spec).from_url(spec)

    @functools.cached_property
    def middleware(self) -> MiddlewareStack:
        """The app's middleware, in order, names resolved through the registry on first use."""
        resolved = [
            m if isinstance(m, Middleware) else self.registry.middleware_class(m)()
            for m in self._middleware_spec
        ]
        if self.events:
            from worq_core.events import EventsMiddleware

            # Outermost: a run's "started" is told before any other middleware's work.
            resolved.insert(0, EventsMiddleware(self))
        return MiddlewareStack(resolved)

    def add_middleware(self, middleware: Middleware, *, outermost: bool = False) -> None:
        """Add a middleware after the app was built, last in the order (or first).

        For tools that switch a feature on from outside the user's module, such as ``worq
        worker --metrics-port``. Instances already resolved are kept (with their state); a
        worker built before the call does not see it.
        """
        spec = (middleware,)
        self._middleware_spec = (
            spec + self._middleware_spec if outermost else self._middleware_spec + spec
        )
        if "middleware" in self.__dict__:  # already resolved: keep those instances
            current = list(self.middleware.middlewares)
            stack = [middleware, *current] if outermost else [*current, middleware]
            self.__dict__["middleware"] = MiddlewareStack(stack)

    @functools.cached_property
    def broker_stores_results(self) -> bool:
        """Whether the broker writes this app's records itself, atomically with its changes."""
        broker = self.broker
        return Capability.RESULTS in broker.capabilities and broker.stores_results_in(self.storage)

    @functools.cached_property
    def serializer(self) -> Serializer:
        """The serializer, by name from the registry."""
        spec = self._serializer_spec
        if isinstance(spec, Serializer):
            return spec
        return self.registry.serializer_class(spec)()

    # -- tasks ---------------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        dont_retry_on: tuple[type[BaseException], ...] = (),
        unique: bool | str | UniqueUntil = False,
        unique_for: float = 0.0,
        unique_key: KeyFunction | None = None,
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        rate_key: KeyFunction | None = None,
        concurrency: int | None = None,
        concurrency_key: KeyFunction | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        dont_retry_on: tuple[type[BaseException], ...] = (),
        unique: bool | str | UniqueUntil = False,
        unique_for: float = 0.0,
        unique_key: KeyFunction | None = None,
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        rate_key: KeyFunction | None = None,
        concurrency: int | None = None,
        concurrency_key: KeyFunction | None = None,
    ) -> Any:
        """Register a function (sync or ``async def``) as a task; usable bare or with options.

        ``name`` defaults to ``module.qualname``. ``max_retries`` retries follow ``retry``'s
        backoff, then the job is dead-lettered. ``timeout`` (seconds) fails a run that overruns.
        With ``retry_on`` only those exceptions are retried; ``dont_retry_on`` exceptions
        dead-letter at once. A task may also raise :class:`~worq_core.Retry` (retry after a
        delay of its choosing) or :class:`~worq_core.Reject` (dead-letter now).

        Enforced by the broker across every worker (see ``docs/scheduling.md``): ``unique``
        (``True`` = ``"until_done"``, or ``"until_started"``) adds no job while an equal one
        (same ``unique_key``, by default the same arguments) is held, and returns that job's
        handle instead, for ``unique_for`` seconds more after it lets go. ``rate_limit``
        (``"100/m"``, ``"20/s"``, ``"5/10s"``) starts at most that many jobs per period,
        ``rate_burst`` at once after a quiet spell (default: the count), separately per
        ``rate_key`` if given. ``concurrency`` caps the jobs running at once, per
        ``concurrency_key`` if given. Limits count per queue. The key functions are called
        with the job's arguments by parameter name: ``rate_key=lambda user_id, **_: user_id``.
        """

        def register(function: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or f"{function.__module__}.{function.__qualname__}"
            limits = TaskLimits.declare(
                task_name,
                unique=unique,
                unique_for=unique_for,
                unique_key=unique_key,
                rate_limit=rate_limit,
                rate_burst=rate_burst,
                rate_key=rate_key,
                concurrency=concurrency,
                concurrency_key=concurrency_key,
            )
            config = TaskConfig(
                name=task_name,
                queue=queue,
                priority=priority,
                max_retries=max_retries,
                retry=retry or RetryPolicy(),
                timeout=timeout,
                retry_on=tuple(retry_on),
                dont_retry_on=tuple(dont_retry_on),
                limits=limits,
            )
            if config.name in self.tasks:
                raise TaskError(f"a task named {config.name!r} is already registered")
            kind = AsyncTask if inspect.iscoroutinefunction(function) else Task
            task = kind(self, function, config)
            self.tasks[config.name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str | ZoneInfo | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        missed: Missed | str = Missed.ONCE,
        grace: float = 60.0,
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task and run it on a schedule: ``@app.periodic(cron=...)``.

        ``cron`` takes five fields, or six with seconds first, read in ``tz`` (a zone name,
        default UTC); ``every`` is a fixed interval instead. ``args`` and ``kwargs`` are fixed
        for the schedule. ``missed`` says what happens to ticks that passed while no worker
        ran: ``"once"`` (default) fires one job for them, ``"skip"`` none. Other keywords go
        to :meth:`task`. The function stays a task: enqueue it or add more schedules with
        :meth:`schedule`. Every worker runs the scheduler; each tick fires once across them.
        """

        def register(function: Callable[P, R]) -> Task[P, R]:
            task: Task[P, R] = self.task(**task_options)(function)
            try:
                self.schedule(
                    task,
                    cron=cron,
                    every=every,
                    tz=tz,
                    args=args,
                    kwargs=kwargs,
                    name=name,
                    missed=missed,
                    grace=grace,
                )
            except BaseException:
                # A declaration that fails leaves nothing behind: fix it and declare again.
                del self.tasks[task.name]
                raise
            return task

        return register

    def schedule(
        self,
        task: Task[Any, Any] | str,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str | ZoneInfo | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        missed: Missed | str = Missed.ONCE,
        grace: float = 60.0,
        queue: str | None = None,
    ) -> Schedule:
        """Run a registered task on a schedule (see :meth:`periodic`); returns the schedule.

        ``name`` defaults to the task's name (with a hash of ``args``/``kwargs`` when given,
        and the trigger when that is taken); names are unique within the app.
        """
        target = self.get_task(task) if isinstance(task, str) else task
        made = make_schedule(
            target,
            cron=cron,
            every=every,
            tz=tz,
            args=args,
            kwargs=kwargs,
            name=name,
            missed=missed,
            grace=grace,
            queue=queue,
        )
        if name is None and made.name in self.schedules:
            made = dataclasses.replace(made, name=f"{made.name} {made.trigger.describe()}")
        if made.name in self.schedules:
            raise TaskError(f"a schedule named {made.name!r} is already registered")
        self.schedules[made.name] = made
        return made

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered as ``name``; raises :class:`UnknownTaskError`."""
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTaskError(name) from None

    def enqueue(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Job[Any]:
        """Enqueue a registered task by name (what ``worq enqueue`` uses)."""
        task = self.get_task(task_name)
        return task.options(**options).enqueue(*args, **(kwargs or {}))

    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Move dead jobs (all when ``job_ids`` is ``None``) back to ``queue``; returns how many.

        Their old records are deleted first, so their :class:`Job` handles wait for the new
        run instead of reporting the old failure.
        """
        broker = self.broker
        if job_ids is not None and Capability.LISTING in broker.capabilities:
            # Look up only the ids given, so requeueing one job never reads the whole DLQ.
            found = {i: broker.find_job(i) for i in dict.fromkeys(job_ids)}
            ids = [
                i
                for i, held in found.items()
                if held is not None and held.status is JobStatus.DEAD and held.queue == queue
            ]
        else:
            dead = [job.id for job in broker.dead_jobs(queue, limit=10_000_000)]
            dead_ids = set(dead)
            ids = dead if job_ids is None else [i for i in job_ids if i in dead_ids]
        if not ids:  # ids that are not dead keep their records
            return 0
        self.storage.delete(ids)
        return self.broker.requeue_dead(queue, ids)

    def job(self, job_id: str) -> Job[Any]:
        """A handle on an existing job by id; does no I/O.

        Job ids are unique across the app's queues, so the handle needs no queue: its
        ``queue`` is ``""`` (``broker.job_state(job_id).queue`` tells where it is).
        """
        return Job(self, job_id, "")

    def workflow(self, some_id: str) -> Workflow | None:
        """The handle of the workflow that ``some_id`` belongs to, from any process.

        ``some_id`` is a workflow's id or the id of any of its jobs or groups. ``None`` when
        it belongs to no workflow, or the workflow's record expired (it lives as long as
        results do, ``result_ttl``).
        """
        from worq_core.canvas import find

        return find(self, some_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job by id; see :meth:`Job.cancel`. Returns whether it was still there."""
        broker = self.broker
        if Capability.CANCEL not in broker.capabilities:
            raise UnsupportedError(broker.name, Capability.CANCEL.value, "cancelling a job")
        record = encode_cancelled(self.serializer)
        held = self._held_for_event(job_id)
        if self.broker_stores_results:
            outcome = broker.cancel(job_id, record, self.result_ttl)
        else:
            outcome = broker.cancel(job_id)
            if outcome is CancelOutcome.REMOVED:
                self.storage.save({job_id: record}, self.result_ttl)
        if held is not None and outcome is CancelOutcome.REMOVED:
            # A running job's cancellation is told by its worker, when it ends.
            task, queue = held
            event = Event(EventKind.CANCELLED, job_id, task, queue, time.time())
            self.broker.publish_events([event])
        return outcome is not CancelOutcome.NOT_FOUND

    def _held_for_event(self, job_id: str) -> tuple[str, str] | None:
        """The task and queue of a job about to be cancelled, when events are on."""
        if not self.events:
            return None
        if Capability.LISTING not in self.broker.capabilities:
            return "", ""
        held = self.broker.find_job(job_id)
        if held is None:
            return None
        try:
            return Envelope.decode(held.body, self.serializer).task, held.queue
        except DeserializationError:
            return "", held.queue

    # -- workers -------------------------------------------------------------------------------

    def worker(
        self,
        queues: Sequence[str] | None = None,
        concurrency: int = 8,
        lease: float = 30.0,
        *,
        settings: WorkerSettings | None = None,
    ) -> Worker:
        """A worker for this app. ``queues`` defaults to every queue a task is declared on."""
        from worq_core.worker import Worker, WorkerSettings

        if settings is None:
            settings = WorkerSettings(
                queues=tuple(queues or self.default_queues()), concurrency=concurrency, lease=lease
            )
        return Worker(self, settings)

    def default_queues(self) -> list[str]:
        """Every queue a registered task is declared on, ``default`` first."""
        queues = {"default"} | {task.config.queue for task in self.tasks.values()}
        return sorted(queues, key=lambda q: (q != "default", q))

    def close(self) -> None:
        """Close the broker and storage if they were opened."""
        for name in ("storage", "broker"):
            component = self.__dict__.pop(name, None)
            if component is not None:
                component.close()


__all__ = ["DEFAULT_RESULT_TTL", "SendOptions", "Worq"]
