"""The ASGI producer: ``uvicorn peers.web_app:app``, one route per way of enqueueing a job.

``/worq`` awaits worq's ``enqueue_async``; ``/raw`` awaits one ``redis.asyncio`` LPUSH of a
payload the size of worq's (``PEER_BENCH_PAYLOAD`` bytes). Both answer 204 and nothing else,
so the routes differ only in how they send the job.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from peers import PREFIX, STASH_KEY, URL
from peers.worq_app import stash

PAYLOAD = b"x" * int(os.environ.get("PEER_BENCH_PAYLOAD", "150"))
RAW_KEY = f"{PREFIX}:web:raw"

_client: redis.asyncio.Redis | None = None


@asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    global _client
    _client = redis.asyncio.Redis.from_url(URL)
    try:
        yield
    finally:
        await _client.aclose()


async def enqueue_worq(_: Request) -> Response:
    await stash.enqueue_async(STASH_KEY, 1)
    return Response(status_code=204)


async def enqueue_raw(_: Request) -> Response:
    assert _client is not None
    await _client.lpush(RAW_KEY, PAYLOAD)
    return Response(status_code=204)


app = Starlette(
    routes=[Route("/worq", enqueue_worq), Route("/raw", enqueue_raw)], lifespan=lifespan
)
