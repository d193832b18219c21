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
from worq_core.context import JobContext, current_job
from worq_core.errors import (
    BrokerConnectionError,
    BrokerError,
    DeserializationError,
    DuplicatePluginError,
    JobFailed,
    PluginError,
    ResultTimeout,
    SerializationError,
    StorageConnectionError,
    StorageError,
    TaskError,
    TaskTimeoutError,
    UnknownPluginError,
    UnknownTaskError,
    WorqError,
)
from worq_core.hookspecs import hookimpl
from worq_core.job import Job
from worq_core.models import (
    Capability,
    DeadJob,
    Delivery,
    JobStatus,
    Message,
    Outcome,
    QueueStats,
    Settlement,
    WorkerInfo,
)
from worq_core.registry import PluginLoadWarning, Registry, default_registry
from worq_core.retry import RetryPolicy
from worq_core.serializer import Serializer
from worq_core.storage import Storage
from worq_core.task import BoundTask, Task, TaskArgumentsError
from worq_core.worker import ExitReason, Worker, WorkerSettings

__version__ = "0.1.0"

__all__ = [
    "BoundTask",
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
    "Capability",
    "DeadJob",
    "Delivery",
    "DeserializationError",
    "DuplicatePluginError",
    "ExitReason",
    "Job",
    "JobContext",
    "JobFailed",
    "JobStatus",
    "Message",
    "Outcome",
    "PluginError",
    "PluginLoadWarning",
    "QueueStats",
    "Registry",
    "ResultTimeout",
    "RetryPolicy",
    "SerializationError",
    "Serializer",
    "Settlement",
    "Storage",
    "StorageConnectionError",
    "StorageError",
    "Task",
    "TaskArgumentsError",
    "TaskError",
    "TaskTimeoutError",
    "UnknownPluginError",
    "UnknownTaskError",
    "Worker",
    "WorkerInfo",
    "WorkerSettings",
    "Worq",
    "WorqError",
    "__version__",
    "current_job",
    "default_registry",
    "hookimpl",
]
