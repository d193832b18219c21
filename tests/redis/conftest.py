"""Redis backends for the tests: a real server and fakeredis, each test under its own key prefix.

The real server comes from ``WORQ_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/<db>`` with
``<db>`` from ``WORQ_TEST_REDIS_DB``, default 9). Tests never flush a database: each one works
under a fresh key prefix and deletes only its own keys afterwards, so two runs at once never
meet. Without a reachable server the real-Redis cases are skipped locally and fail under ``CI``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from redis_support import BACKENDS, URL, Backend, Runtime, delete_prefix, new_prefix


@pytest.fixture(scope="session")
def real_redis_url() -> str:
    """The real server's URL; skips (or fails under CI) when it does not answer."""
    client = redis.Redis.from_url(URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"no Redis at {URL} ({exc}); set WORQ_TEST_REDIS_URL"
        if os.environ.get("CI"):
            pytest.fail(message + " - under CI a missing Redis is an error")
        pytest.skip(message)
    finally:
        client.close()
    return URL


def make_backend(kind: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    prefix = new_prefix()
    if kind == "redis":
        url = request.getfixturevalue("real_redis_url")
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2)
        try:
            yield Backend(kind, client, prefix)
        finally:
            delete_prefix(client, prefix)
            client.close()
    else:
        fakeredis = pytest.importorskip("fakeredis")
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield Backend(kind, client, prefix)
        client.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each test runs once on real Redis and once on fakeredis; each skips on its own."""
    yield from make_backend(request.param, request)


@pytest.fixture
def real_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Real Redis only (Lua timing, blocking and persistence behaviour that fakes cannot show)."""
    yield from make_backend("redis", request)


@pytest.fixture
def runtime(real_redis_url: str, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """Real `worq worker` processes of the app the test module names in ``RUNTIME_APP``.

    A module without it runs ``runtime_app``; the processes are stopped and the keys deleted
    afterwards.
    """
    rt = Runtime(real_redis_url, module=getattr(request.module, "RUNTIME_APP", "runtime_app"))
    yield rt
    rt.cleanup()
