"""The application object: configuration, the task registry, and the way to workers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from worq_core.broker import Broker
from worq_core.errors import TaskError, UnknownTaskError
from worq_core.job import Job
from worq_core.registry import Registry, default_registry
from worq_core.retry import RetryPolicy
from worq_core.serializer import Serializer
from worq_core.storage import Storage
from worq_core.task import SendOptions, Task, TaskConfig

if TYPE_CHECKING:
    from worq_core.worker import Worker, WorkerSettings

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_RESULT_TTL = 24 * 3600.0


class Worq:
    """A worq application: where jobs go (broker), where results stay (storage), and the tasks.

    ``broker`` is a URL whose scheme picks an installed broker plugin (``memory://``,
    ``redis://...``) or a :class:`Broker` instance. ``storage`` defaults to the broker's own
    backend. Building an app does no I/O; the broker and storage are created on first use.
    """

    def __init__(
        self,
        broker: str | Broker = "memory://",
        *,
        storage: str | Storage | None = None,
        serializer: str | Serializer = "msgpack",
        result_ttl: float = DEFAULT_RESULT_TTL,
        registry: Registry | None = None,
    ) -> None:
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.result_ttl = result_ttl
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
    def serializer(self) -> Serializer:
        """The serializer, by name from the registry."""
        spec = self._serializer_spec
        if isinstance(spec, Serializer):
            return spec
        return self.registry.serializer_class(spec)()

    # -- tasks ---------------------------------------------------------------------------------

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
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

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
    ) -> Any:
        """Register a function (sync or ``async def``) as a task; usable bare or with options.

        ``name`` defaults to ``module.qualname``. ``max_retries`` retries follow ``retry``'s
        backoff, then the job is dead-lettered. ``timeout`` (seconds) fails a run that overruns.
        """

        def register(function: Callable[..., Any]) -> Task[Any, Any]:
            config = TaskConfig(
                name=name or f"{function.__module__}.{function.__qualname__}",
                queue=queue,
                priority=priority,
                max_retries=max_retries,
                retry=retry or RetryPolicy(),
                timeout=timeout,
            )
            if config.name in self.tasks:
                raise TaskError(f"a task named {config.name!r} is already registered")
            task = Task(self, function, config)
            self.tasks[config.name] = task
            return task

        return register(fn) if fn is not None else register

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
    ) -> Job:
        """Enqueue a registered task by name (what ``worq enqueue`` uses)."""
        task = self.get_task(task_name)
        return task.options(**options).enqueue(*args, **(kwargs or {}))

    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Move dead jobs (all when ``job_ids`` is ``None``) back to ``queue``; returns how many.

        Their old records are deleted first, so their :class:`Job` handles wait for the new
        run instead of reporting the old failure.
        """
        dead = [job.id for job in self.broker.dead_jobs(queue, limit=10_000_000)]
        dead_ids = set(dead)
        ids = dead if job_ids is None else [i for i in job_ids if i in dead_ids]
        if not ids:  # ids that are not dead keep their records
            return 0
        self.storage.delete(ids)
        return self.broker.requeue_dead(queue, ids)

    def job(self, job_id: str, queue: str = "default") -> Job:
        """A handle on an existing job by id."""
        return Job(self, job_id, queue)

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
