"""worq: background jobs for Python, with pluggable brokers, serializers and storages.

Quick start::

    from worq_core import Worq

    app = Worq()  # memory:// by default; Worq("redis://127.0.0.1:6379/0") with worq-redis

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    job = add.enqueue(1, 2)
    app.worker().run(burst=True)
    assert job.result(timeout=5) == 3
"""

from typing import TYPE_CHECKING, Any

# The names below are imported on first use (PEP 562), not with the package: a producer that
# only enqueues never loads the worker, workflows or inspection, and a worker never loads the
# CLI's inspection helpers. Type checkers and IDEs read these imports; ``_LAZY`` says where each
# name lives at run time (tests/core/test_import_cost.py keeps the three lists the same).
if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.broker import Broker
    from worq_core.canvas import (
        Chain,
        Chord,
        Group,
        Signature,
        Workflow,
        WorkflowError,
        WorkflowNode,
        WorkflowStatus,
        chain,
        chord,
        group,
    )
    from worq_core.context import JobContext, Progress, current_job
    from worq_core.errors import (
        BrokerConnectionError,
        BrokerError,
        DeserializationError,
        DuplicatePluginError,
        EnqueueRejected,
        InvalidNameError,
        JobCancelled,
        JobFailed,
        PayloadTooLarge,
        PluginError,
        Reject,
        ResultTimeout,
        Retry,
        ScheduleError,
        ScheduleTaken,
        SerializationError,
        StorageConnectionError,
        StorageError,
        TaskError,
        TaskTimeoutError,
        UnknownPluginError,
        UnknownTaskError,
        UnsupportedError,
        WorqError,
    )
    from worq_core.hookspecs import hookimpl
    from worq_core.job import Job
    from worq_core.middleware import Decision, EnqueueRequest, Middleware
    from worq_core.models import (
        CancelOutcome,
        Capability,
        ConcurrencyLimit,
        DeadJob,
        Delivery,
        Event,
        EventKind,
        GroupMember,
        GroupSpec,
        GroupState,
        JobState,
        JobStatus,
        LeaseState,
        ListedJob,
        Message,
        Outcome,
        QueueStats,
        RateLimit,
        Settlement,
        UniqueKey,
        UniqueUntil,
        WorkerInfo,
    )
    from worq_core.registry import PluginLoadWarning, Registry, default_registry
    from worq_core.retry import RetryPolicy
    from worq_core.scheduling import Missed, Schedule
    from worq_core.serializer import Serializer
    from worq_core.storage import Storage
    from worq_core.task import AsyncTask, BoundTask, Task, TaskArgumentsError
    from worq_core.worker import ExitReason, Service, Worker, WorkerSettings

__version__ = "0.1.0"

__all__ = [
    "AsyncTask",
    "BoundTask",
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
    "CancelOutcome",
    "Capability",
    "Chain",
    "Chord",
    "ConcurrencyLimit",
    "DeadJob",
    "Decision",
    "Delivery",
    "DeserializationError",
    "DuplicatePluginError",
    "EnqueueRejected",
    "EnqueueRequest",
    "Event",
    "EventKind",
    "ExitReason",
    "Group",
    "GroupMember",
    "GroupSpec",
    "GroupState",
    "InvalidNameError",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobState",
    "JobStatus",
    "LeaseState",
    "ListedJob",
    "Message",
    "Middleware",
    "Missed",
    "Outcome",
    "PayloadTooLarge",
    "PluginError",
    "PluginLoadWarning",
    "Progress",
    "QueueStats",
    "RateLimit",
    "Registry",
    "Reject",
    "ResultTimeout",
    "Retry",
    "RetryPolicy",
    "Schedule",
    "ScheduleError",
    "ScheduleTaken",
    "SerializationError",
    "Serializer",
    "Service",
    "Settlement",
    "Signature",
    "Storage",
    "StorageConnectionError",
    "StorageError",
    "Task",
    "TaskArgumentsError",
    "TaskError",
    "TaskTimeoutError",
    "UniqueKey",
    "UniqueUntil",
    "UnknownPluginError",
    "UnknownTaskError",
    "UnsupportedError",
    "Worker",
    "WorkerInfo",
    "WorkerSettings",
    "Workflow",
    "WorkflowError",
    "WorkflowNode",
    "WorkflowStatus",
    "Worq",
    "WorqError",
    "__version__",
    "chain",
    "chord",
    "current_job",
    "default_registry",
    "group",
    "hookimpl",
]

_LAZY: dict[str, str] = {  # name -> the module that defines it
    "AsyncTask": "worq_core.task",
    "BoundTask": "worq_core.task",
    "Broker": "worq_core.broker",
    "BrokerConnectionError": "worq_core.errors",
    "BrokerError": "worq_core.errors",
    "CancelOutcome": "worq_core.models",
    "Capability": "worq_core.models",
    "Chain": "worq_core.canvas",
    "Chord": "worq_core.canvas",
    "ConcurrencyLimit": "worq_core.models",
    "DeadJob": "worq_core.models",
    "Decision": "worq_core.middleware",
    "Delivery": "worq_core.models",
    "DeserializationError": "worq_core.errors",
    "DuplicatePluginError": "worq_core.errors",
    "EnqueueRejected": "worq_core.errors",
    "EnqueueRequest": "worq_core.middleware",
    "Event": "worq_core.models",
    "EventKind": "worq_core.models",
    "ExitReason": "worq_core.worker",
    "Group": "worq_core.canvas",
    "GroupMember": "worq_core.models",
    "GroupSpec": "worq_core.models",
    "GroupState": "worq_core.models",
    "InvalidNameError": "worq_core.errors",
    "Job": "worq_core.job",
    "JobCancelled": "worq_core.errors",
    "JobContext": "worq_core.context",
    "JobFailed": "worq_core.errors",
    "JobState": "worq_core.models",
    "JobStatus": "worq_core.models",
    "LeaseState": "worq_core.models",
    "ListedJob": "worq_core.models",
    "Message": "worq_core.models",
    "Middleware": "worq_core.middleware",
    "Missed": "worq_core.scheduling",
    "Outcome": "worq_core.models",
    "PayloadTooLarge": "worq_core.errors",
    "PluginError": "worq_core.errors",
    "PluginLoadWarning": "worq_core.registry",
    "Progress": "worq_core.context",
    "QueueStats": "worq_core.models",
    "RateLimit": "worq_core.models",
    "Registry": "worq_core.registry",
    "Reject": "worq_core.errors",
    "ResultTimeout": "worq_core.errors",
    "Retry": "worq_core.errors",
    "RetryPolicy": "worq_core.retry",
    "Schedule": "worq_core.scheduling",
    "ScheduleError": "worq_core.errors",
    "ScheduleTaken": "worq_core.errors",
    "SerializationError": "worq_core.errors",
    "Serializer": "worq_core.serializer",
    "Service": "worq_core.worker",
    "Settlement": "worq_core.models",
    "Signature": "worq_core.canvas",
    "Storage": "worq_core.storage",
    "StorageConnectionError": "worq_core.errors",
    "StorageError": "worq_core.errors",
    "Task": "worq_core.task",
    "TaskArgumentsError": "worq_core.task",
    "TaskError": "worq_core.errors",
    "TaskTimeoutError": "worq_core.errors",
    "UniqueKey": "worq_core.models",
    "UniqueUntil": "worq_core.models",
    "UnknownPluginError": "worq_core.errors",
    "UnknownTaskError": "worq_core.errors",
    "UnsupportedError": "worq_core.errors",
    "Worker": "worq_core.worker",
    "WorkerInfo": "worq_core.models",
    "WorkerSettings": "worq_core.worker",
    "Workflow": "worq_core.canvas",
    "WorkflowError": "worq_core.canvas",
    "WorkflowNode": "worq_core.canvas",
    "WorkflowStatus": "worq_core.canvas",
    "Worq": "worq_core.app",
    "WorqError": "worq_core.errors",
    "chain": "worq_core.canvas",
    "chord": "worq_core.canvas",
    "current_job": "worq_core.context",
    "default_registry": "worq_core.registry",
    "group": "worq_core.canvas",
    "hookimpl": "worq_core.hookspecs",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, then keep the name here.

    A submodule is imported too (``worq_core.models`` after a bare ``import worq_core``), as it
    was when this package imported them all.
    """
    import importlib

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted({*globals(), *__all__})
