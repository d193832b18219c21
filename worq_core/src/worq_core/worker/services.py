"""Services: periodic work inside a worker, all on one service thread.

Lease renewal, the timeout watchdog, the worker's registration and its resource limits are
services, and so is whatever a middleware returns from :meth:`Middleware.services` (cron,
metrics). A service says when it wants to run next; the runner sleeps until the earliest such
time, or until a service is woken early (a new timeout deadline, a progress report).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("worq.worker")


class Service:
    """Base class of a periodic task inside a worker; override :meth:`tick`.

    All services of a worker share one thread, so a tick must be short and must not block on
    a job; it may call the broker. Exceptions are logged and the service is tried again
    ``retry_after`` seconds later.
    """

    name = "service"
    retry_after = 1.0

    def start(self, now: float) -> float | None:
        """Called once as the worker starts; returns when to first :meth:`tick` (monotonic)."""
        return now

    def tick(self, now: float) -> float | None:
        """Do the work; returns when to run next (monotonic seconds), or ``None`` for never.

        A service that returned ``None`` runs again only when :meth:`ServiceRunner.wake`-d.
        """
        return None

    def stop(self) -> None:
        """Called once as the worker stops, after its last tick."""


class ServiceRunner:
    """Runs services on one daemon thread, each at the time it asked for."""

    def __init__(self, services: Sequence[Service], name: str = "worq-services") -> None:
        self.services = tuple(services)
        self._next: dict[Service, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        """Start every service, then the thread."""
        now = time.monotonic()
        for service in self.services:
            at = service.start(now)
            self._next[service] = float("inf") if at is None else at
        self._thread.start()

    def wake(self, service: Service, at: float | None = None) -> None:
        """Run ``service`` at ``at`` (monotonic; now if ``None``) unless it runs sooner anyway."""
        when = time.monotonic() if at is None else at
        with self._lock:
            if when >= self._next.get(service, float("inf")):
                return
            self._next[service] = when
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread, wait for it, then stop every service."""
        self._done = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        for service in self.services:
            try:
                service.stop()
            except Exception:
                log.exception("service %s failed to stop", service.name)

    def _serve(self) -> None:
        while not self._done:
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                due = [s for s in self.services if self._next[s] <= now]
                for service in due:
                    self._next[service] = float("inf")
            for service in due:
                try:
                    at = service.tick(now)
                except Exception:
                    log.exception("service %s failed; trying again shortly", service.name)
                    at = time.monotonic() + service.retry_after
                if at is not None:
                    with self._lock:  # a wake() during the tick may already ask for sooner
                        self._next[service] = min(self._next[service], at)
            with self._lock:
                soonest = min(self._next.values(), default=float("inf"))
            self._wake.wait(
                None if soonest == float("inf") else max(0.0, soonest - time.monotonic())
            )
