"""The web app of the producer benchmark: ``uvicorn asgi_app:app`` (Starlette), two handlers.

``GET /raw`` does one ``redis.asyncio`` LPUSH of a 100-byte payload (the floor); ``GET
/enqueue`` does ``await noop.enqueue_async()``. Both answer 200 with an empty body. The Redis URL
and key prefix come from ``WORQ_BENCH_URL`` and ``WORQ_BENCH_PREFIX`` (set by
``redis_bench.py``), so the server meets the benchmark's own keys and nothing else.
"""

from __future__ import annotations

import os

import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from worq_core import Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisStorage

URL = os.environ.get("WORQ_BENCH_URL", "redis://127.0.0.1:6379/10")
PREFIX = os.environ.get("WORQ_BENCH_PREFIX", "worqbench")
PAYLOAD = b"x" * 100

worq = Worq(
    RedisBroker(URL, prefix=PREFIX),
    storage=RedisStorage(URL, prefix=PREFIX),
    serializer=MsgpackSerializer(),
    registry=Registry(),
)
client = redis.asyncio.Redis.from_url(URL)


@worq.task(name="noop", queue="asgi")
def noop() -> None:
    """A no-op job: the web handler only enqueues it."""


async def raw(request: Request) -> Response:
    await client.lpush(f"{PREFIX}:asgi-raw", PAYLOAD)
    return Response()


async def enqueue(request: Request) -> Response:
    await noop.enqueue_async()
    return Response()


app = Starlette(routes=[Route("/raw", raw), Route("/enqueue", enqueue)])
