"""The worker, in parts.

=================  ==========================================================================
``core``           :class:`Worker`: lifecycle, the fetch loop, taking a job on, running it
``settings``       :class:`WorkerSettings`, :class:`ExitReason`, :class:`WorkerCounters`
``run``            :class:`Run` and its state machine (:class:`RunState`, checked transitions)
``executors``      where code runs: slot threads, and one event loop for ``async def`` tasks
``settle``         the settle path: verdict (retries, Retry, Reject, cancel), record, settle
``leases``         lease renewal, from a thread or through the lease-keeper process
``watchdog``       the timeout watchdog, and the registration and resource-limit services
``services``       :class:`Service` and the one thread that runs a worker's services
=================  ==========================================================================
"""

from worq_core.worker.core import ASYNC_CANCEL_GRACE, DUPLICATE_SIGNAL_WINDOW, Worker
from worq_core.worker.run import InvalidTransition, Run, RunState
from worq_core.worker.services import Service, ServiceRunner
from worq_core.worker.settings import ExitReason, WorkerCounters, WorkerSettings, resident_memory

__all__ = [
    "ASYNC_CANCEL_GRACE",
    "DUPLICATE_SIGNAL_WINDOW",
    "ExitReason",
    "InvalidTransition",
    "Run",
    "RunState",
    "Service",
    "ServiceRunner",
    "Worker",
    "WorkerCounters",
    "WorkerSettings",
    "resident_memory",
]
