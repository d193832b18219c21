"""Lease renewal from a separate process, where a task holding the GIL cannot starve it.

A thread heartbeat stops whenever a task runs long C code that never releases the GIL (a big
regex, a tight numeric loop in an extension): the leases of everything the worker holds then
expire and the jobs run a second time elsewhere. The :class:`LeaseKeeper` process has its own
interpreter and its own broker connection, so it keeps renewing.

The worker tells it which leases it holds (one pipe message per heartbeat). Fencing makes the
loose coupling safe: renewing a job the worker has meanwhile settled is simply refused by the
broker. If the worker process dies, even by SIGKILL, the pipe closes, the keeper exits at
once, and the leases run out as they should.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Sequence

from worq_core.models import Delivery

log = logging.getLogger("worq.lease_keeper")

_Held = list[tuple[str, str, str, int]]  # (job id, queue, token, attempts)


class LeaseKeeper:
    """A child process that extends the leases the worker says it holds.

    Only for brokers that another process can rebuild from ``broker_url`` (shared brokers).
    """

    def __init__(self, broker_url: str, lease: float, interval: float) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a threaded worker
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child_end, broker_url, lease, interval, logging.getLogger().level),
            name="worq-lease-keeper",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        # Wait until it can renew: a job fetched before then could lose its lease unnoticed.
        if not self._conn.poll(30) or self._conn.recv() != "ready":
            self.close()
            raise RuntimeError("the lease keeper process did not start")

    def hold(self, deliveries: Sequence[Delivery]) -> bool:
        """Replace the set of leases to renew (bodies are not sent).

        Returns ``False`` if the keeper is gone, so the caller renews the leases itself.
        """
        held: _Held = [(d.id, d.queue, d.token, d.attempts) for d in deliveries]
        try:
            self._conn.send(held)
        except OSError:
            return False
        return self._process.is_alive()

    def is_alive(self) -> bool:
        """Whether the keeper process still runs."""
        return self._process.is_alive()

    def close(self) -> None:
        """Stop the keeper and wait for it (briefly)."""
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


def _serve(
    conn: multiprocessing.connection.Connection,
    broker_url: str,
    lease: float,
    interval: float,
    log_level: int,
) -> None:
    """The keeper's main loop; runs in the child process."""
    # The worker decides when the keeper stops (it closes the pipe, or dies): a SIGTERM sent to
    # the whole process group must not take the keeper down while the worker finishes its jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    from worq_core.registry import default_registry

    broker = default_registry().broker_class(broker_url).from_url(broker_url)
    conn.send("ready")
    held: list[Delivery] = []
    next_beat = time.monotonic() + interval
    renewed_at = time.monotonic()
    try:
        while True:
            if conn.poll(max(0.0, next_beat - time.monotonic())):
                try:
                    message: _Held | None = conn.recv()
                except EOFError:
                    return  # the worker is gone: let its leases expire
                if message is None:
                    return
                held = [Delivery(i, q, b"", t, a) for i, q, t, a in message]
                continue
            next_beat = time.monotonic() + interval
            if not held:
                renewed_at = time.monotonic()
                continue
            try:
                alive = broker.extend(held, lease)
            except Exception as exc:  # noqa: BLE001 - keep renewing through outages
                silent = time.monotonic() - renewed_at
                level = logging.ERROR if silent > lease else logging.WARNING
                log.log(
                    level,
                    "renewing %d leases failed (%.0fs since the last): %s",
                    len(held),
                    silent,
                    exc,
                )
                continue
            renewed_at = time.monotonic()
            lost = [d.id for d, ok in zip(held, alive, strict=True) if not ok]
            if lost:
                held = [d for d in held if d.id not in set(lost)]
                log.debug("leases no longer held (settled, or expired): %s", ", ".join(lost))
    finally:
        broker.close()
