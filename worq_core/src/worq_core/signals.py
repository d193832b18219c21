"""SIGTERM/SIGINT handling shared by the worker and the supervisor."""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[], None], log: logging.Logger) -> Iterator[None]:
    """Call ``handler`` on SIGTERM/SIGINT within the block; previous handlers come back after.

    ``handler`` runs on a thread of its own, never inside the signal handler: Python runs a
    signal handler on the main thread between two of its instructions, so one that took a lock
    the main thread held at that moment (inside ``Event.wait`` or ``Event.set``, say) would wait
    for itself forever. The signal handler only queues the signal (``SimpleQueue.put`` is
    reentrant).

    Does nothing off the main thread, where Python cannot install signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: queue.SimpleQueue[int | None] = queue.SimpleQueue()

    def dispatch() -> None:
        while (signum := received.get()) is not None:
            log.info("received %s", signal.Signals(signum).name)
            try:
                handler()
            except Exception:
                log.exception("handling %s failed", signal.Signals(signum).name)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.put(signum)

    dispatcher = threading.Thread(target=dispatch, name="worq-signals", daemon=True)
    dispatcher.start()
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        received.put(None)
        dispatcher.join(timeout=1.0)  # a stop that came as the block ended is still carried out
