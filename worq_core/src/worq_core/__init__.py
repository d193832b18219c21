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
