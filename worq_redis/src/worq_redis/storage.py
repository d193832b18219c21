"""The Redis result storage: one string key per finished job, with a TTL."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, ClassVar, Self, cast

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry
from typing_extensions import override

from worq_core import Storage, StorageConnectionError, StorageError
from worq_redis.connection import (
    CLUSTER_SCHEMES,
    DEFAULT_URL,
    SCRIPTS,
    SENTINEL_SCHEMES,
    Arg,
    Call,
    ClusterLane,
    KeyArg,
    Lane,
    RedisSettings,
    ReplicasBehind,
    Script,
    close_client,
    command,
    connect,
    connect_cluster,
    redact,
    result_keys,
    run_script,
    run_scripts,
    translate_errors,
)


class RedisStorage(Storage):
    """Job records in Redis under ``<prefix>:res:{<job id>}``, each with its own TTL.

    :meth:`wait` blocks without polling: it marks the job as waited on and blocks on the job's
    wake-up list, which whoever writes the record (this storage, or the broker's ack script)
    fills when it sees the mark. That works from any process or machine. Thread-safe.
    """

    name: ClassVar[str] = "redis"
    schemes: ClassVar[tuple[str, ...]] = (
        "redis",
        "rediss",
        "unix",
        *SENTINEL_SCHEMES,
        *CLUSTER_SCHEMES,
    )

    def __init__(
        self,
        url: str | redis.Redis | redis.RedisCluster = DEFAULT_URL,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
    ) -> None:
        if isinstance(url, redis.RedisCluster) or (
            isinstance(url, str) and url.partition("://")[0] in CLUSTER_SCHEMES
        ):
            # Each record's keys share the job's hash tag: a cluster client routes them all.
            cluster, self.url, self.settings, self._owned = connect_cluster(url, settings, prefix)
            self.client = cast("redis.Redis", cluster)
        else:
            self.client, self.url, self.settings, self._owned = connect(url, settings, prefix)
        self.prefix = self.settings.prefix

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def __repr__(self) -> str:
        return f"<RedisStorage {redact(self.url).split('@')[-1]} prefix={self.prefix!r}>"

    @override
    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        """Write each record (one script per job, all in one round trip) and wake its waiters."""
        if not records:
            return
        ttl_ms = int(ttl * 1000)
        calls: list[Call] = [
            (SCRIPTS["save_result"], result_keys(self.prefix, job_id), ["", ttl_ms, data])
            for job_id, data in records.items()
        ]
        wanted = self.settings.wait_replicas
        with self._errors():
            if not wanted:
                run_scripts(self.client, calls)
                return
            wait = (wanted, max(1, round(self.settings.wait_timeout * 1000)))
            acked = int(self._lane().scripts(calls, wait=wait)[-1])
        if acked < wanted:
            raise ReplicasBehind(self.url, wanted, acked, self.settings.wait_timeout)

    @override
    def delete(self, job_ids: Sequence[str]) -> None:
        """Delete the records (and wait markers) of these jobs, one pipelined round trip."""
        if not job_ids:
            return
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                for key in result_keys(self.prefix, job_id):  # a cluster pipeline: one key a DEL
                    pipe.delete(key)
            pipe.execute()

    @override
    def load(self, job_id: str) -> bytes | None:
        with self._errors():
            data = command(self.client, "GET", result_keys(self.prefix, job_id)[0])
        return None if data is None else bytes(data)

    @override
    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        """Block until the job has a record; ``None`` after ``timeout`` seconds.

        Each step marks the job as waited on and reads the record in one script, then blocks on
        ``BLMOVE`` of the job's wake-up list onto itself (so every waiter sees the wake-up) for
        at most :attr:`RedisSettings.blocking_timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = result_keys(self.prefix, job_id)
        step = self.settings.blocking_timeout
        mark_ms = int((step + self.settings.socket_timeout) * 1000) + 1000
        with self._errors():
            while True:
                data = run_script(self.client, SCRIPTS["arm_wait"], keys, ["", mark_ms])
                if data is not None:
                    return bytes(data)
                remaining = step if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return None
                block = max(0.001, min(step, remaining))
                command(self.client, "BLMOVE", keys[2], keys[2], "RIGHT", "LEFT", f"{block:.3f}")

    @override
    async def wait_async(self, job_id: str, timeout: float | None) -> bytes | None:
        """:meth:`wait` on the event loop: the same steps, on a ``redis.asyncio`` client.

        The client is this loop's own, made on first use with the sync client's connection
        settings. Cancelling the awaiting task interrupts the blocked ``BLMOVE``, and redis-py
        drops a connection whose reply was cut short, so nothing is left blocking. A client
        whose connection class has no asyncio counterpart waits through
        :meth:`Storage.wait_async` instead.
        """
        client = await self._async_clients().get()
        if client is None:
            return await super().wait_async(job_id, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = result_keys(self.prefix, job_id)
        step = self.settings.blocking_timeout
        mark_ms = int((step + self.settings.socket_timeout) * 1000) + 1000
        with self._errors():
            while True:
                data = await _script(client, SCRIPTS["arm_wait"], keys, ["", mark_ms])
                if data is not None:
                    return bytes(data)
                remaining = step if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return None
                block = max(0.001, min(step, remaining))
                await _command(client, "BLMOVE", keys[2], keys[2], "RIGHT", "LEFT", f"{block:.3f}")

    @override
    def close(self) -> None:
        """Close the connection pool, unless the client was handed to us.

        The asyncio clients of :meth:`wait_async` are always closed (on loops still running;
        the others were closed when their loop shut down).
        """
        clients = self.__dict__.get("_aio_clients")
        if clients is not None:
            clients.close()
        lane = self.__dict__.get("_wait_lane")
        if lane is not None:
            lane.close()
        if self._owned:
            close_client(self.client)

    def _async_clients(self) -> _LoopClients:
        clients: _LoopClients | None = self.__dict__.get("_aio_clients")
        if clients is None:  # setdefault: two threads at once still share one
            clients = self.__dict__.setdefault("_aio_clients", _LoopClients(self.client))
        return clients

    def _errors(self) -> Any:
        return translate_errors(self.url, StorageConnectionError, StorageError)

    def _lane(self) -> Lane | ClusterLane:
        """Connections for saves that ``WAIT`` (which counts its own connection's writes)."""
        lane: Lane | ClusterLane | None = self.__dict__.get("_wait_lane")
        if lane is None:  # setdefault: two threads at once still share one
            client: Any = self.client
            made = ClusterLane(client) if isinstance(client, redis.RedisCluster) else Lane(client)
            lane = self.__dict__.setdefault("_wait_lane", made)
        return lane


# -- wait_async: asyncio clients -------------------------------------------------------------------

_Holder = AsyncGenerator[None, None]


class _LoopClients:
    """One ``redis.asyncio`` client per event loop, with a sync client's connection settings.

    An asyncio client belongs to the loop it first ran on, so each loop gets its own; a later
    ``asyncio.run`` makes a new one. Each client is held by a small async generator, which its
    loop closes when it shuts down (``asyncio.run`` does, before closing the loop), and that
    closes the client; :meth:`close` does the same on loops still running.
    """

    def __init__(self, sync: redis.Redis) -> None:
        self._sync = sync
        self._lock = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, _Holder]] = {}

    async def get(self) -> redis.asyncio.Redis | None:
        """This loop's client (made now if needed); ``None`` if no asyncio client can be made."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.get(loop)
            if entry is not None:
                return entry[0]
            for old in [old for old in self._clients if old.is_closed()]:
                del self._clients[old]
            client = _async_client(self._sync)
            if client is None:
                return None
            holder = _hold(client)
            self._clients[loop] = (client, holder)
        await anext(holder)  # runs to its yield at once; the loop now closes it at shutdown
        return client

    def close(self) -> None:
        """Close the clients of running loops; those of loops yet to run close with them."""
        with self._lock:
            for loop in list(self._clients):
                if loop.is_closed():
                    del self._clients[loop]
                elif loop.is_running():
                    _, holder = self._clients.pop(loop)
                    asyncio.run_coroutine_threadsafe(_release(holder), loop)


async def _hold(client: redis.asyncio.Redis) -> _Holder:
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # closing only drops connections; nothing to report
            await client.aclose()


async def _release(holder: _Holder) -> None:
    await holder.aclose()


_SHARED_KWARGS = frozenset(
    {
        "db",
        "username",
        "password",
        "credential_provider",
        "socket_timeout",
        "socket_connect_timeout",
        "client_name",
        "health_check_interval",
        "protocol",
    }
)
_TCP_KWARGS = frozenset({"host", "port", "socket_keepalive", "socket_keepalive_options"})
_SSL_KWARGS = frozenset(
    name
    for name in inspect.signature(redis.asyncio.SSLConnection.__init__).parameters
    if name.startswith("ssl_")
)
_ASYNC_TWINS: dict[
    type[Any], tuple[type[redis.asyncio.connection.AbstractConnection], frozenset[str]]
]
_ASYNC_TWINS = {
    redis.Connection: (redis.asyncio.Connection, _SHARED_KWARGS | _TCP_KWARGS),
    redis.SSLConnection: (redis.asyncio.SSLConnection, _SHARED_KWARGS | _TCP_KWARGS | _SSL_KWARGS),
    redis.UnixDomainSocketConnection: (
        redis.asyncio.UnixDomainSocketConnection,
        _SHARED_KWARGS | {"path"},
    ),
}
"""redis-py's sync connection classes, their asyncio counterparts, and the settings they share."""


def _async_client(sync: redis.Redis) -> redis.asyncio.Redis | None:
    """A new asyncio client to the server, database and credentials of ``sync``. No I/O.

    ``None`` unless ``sync`` connects with one of redis-py's own TCP, TLS or Unix socket
    connection classes: a subclass or another class (fakeredis, instrumentation) may not talk
    to the server the way its asyncio counterpart would, so nothing is guessed.
    """
    pool = getattr(sync, "connection_pool", None)  # none on a cluster client
    if pool is None:
        return None
    twin = _ASYNC_TWINS.get(pool.connection_class)
    if twin is None:
        return None
    kind, names = twin
    given = pool.connection_kwargs
    kwargs = {name: value for name, value in given.items() if name in names}
    if not isinstance(kwargs.get("socket_keepalive_options", {}), Mapping):
        del kwargs["socket_keepalive_options"]  # redis-py's "not given" marker
    retry = given.get("retry")
    retries = retry.get_retries() if isinstance(retry, Retry) else 0
    kwargs["retry"] = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), retries)
    connections = redis.asyncio.ConnectionPool(
        connection_class=kind, decode_responses=False, **kwargs
    )
    return redis.asyncio.Redis.from_pool(connections)


async def _command(client: Any, *args: Arg) -> Any:
    return await client.execute_command(*args)


async def _script(client: Any, script: Script, keys: Sequence[KeyArg], args: Sequence[Arg]) -> Any:
    """One ``EVALSHA``; loads the script and retries once if Redis lost it (NOSCRIPT)."""
    try:
        return await _command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await _command(client, "SCRIPT", "LOAD", script.source)
        return await _command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
