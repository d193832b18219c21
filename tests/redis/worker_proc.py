"""A worker process for the crash tests: ``python worker_proc.py`` with settings in the env.

WORQ_TEST_URL, WORQ_TEST_PREFIX: where the queue lives. WORQ_TEST_LEASE, WORQ_TEST_HEARTBEAT:
lease and heartbeat seconds. The ``step`` task reports to the test through Redis lists and
waits at two gates the test opens, so the test can kill it before or after its side effect.
"""

from __future__ import annotations

import logging
import os

import redis

from worq_core import Worker, WorkerSettings, Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisStorage

URL = os.environ["WORQ_TEST_URL"]
PREFIX = os.environ["WORQ_TEST_PREFIX"]


def make_app() -> Worq:
    app = Worq(
        RedisBroker(URL, prefix=PREFIX),
        storage=RedisStorage(URL, prefix=PREFIX),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )

    @app.task(name="step", queue="crash", max_retries=5)
    def step(tag: str) -> int:
        control = redis.Redis.from_url(URL)
        pid = os.getpid()
        control.rpush(f"{PREFIX}:events", f"start:{pid}")
        control.blpop([f"{PREFIX}:gate:{pid}:1"], timeout=30)
        control.rpush(f"{PREFIX}:effects", tag)  # the side effect
        control.rpush(f"{PREFIX}:events", f"effect:{pid}")
        control.blpop([f"{PREFIX}:gate:{pid}:2"], timeout=30)
        return pid

    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    heartbeat = os.environ.get("WORQ_TEST_HEARTBEAT")
    settings = WorkerSettings(
        queues=("crash",),
        concurrency=1,
        lease=float(os.environ.get("WORQ_TEST_LEASE", "1.0")),
        heartbeat=float(heartbeat) if heartbeat else None,
        grace=10.0,
        idle_wait=0.2,
    )
    Worker(make_app(), settings).run()
