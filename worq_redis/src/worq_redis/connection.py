"""Connections, settings, key names and script calls shared by the Redis broker and storage."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from worq_core import BrokerError, StorageError, WorqError
from worq_redis import lua

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"

Clock = Callable[[], float]
KeyArg = str | bytes
Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """How worq-redis talks to Redis. Shared by :class:`RedisBroker` and :class:`RedisStorage`.

    The ``prefix`` can also be given in the URL's query string (``redis://host/0?prefix=myapp``);
    an explicit ``prefix=`` argument wins over both.
    """

    prefix: str = "worq"
    """First part of every key; two apps (or test runs) with different prefixes never meet."""
    socket_timeout: float = 5.0
    """Seconds to wait for a reply before a command fails; bounds every call but blocking ones."""
    connect_timeout: float = 2.0
    """Seconds to wait for a TCP (or TLS) connection."""
    retries: int = 1
    """Times a command is retried on a fresh connection after a connection error."""
    block_max: float = 2.0
    """Longest single blocking wait (``BZPOPMIN``/``BLMOVE``); kept below ``socket_timeout``."""
    dead_max_count: int = 10_000
    """Dead-letter queue length kept per queue; the oldest are dropped beyond it."""
    dead_max_age: float = 7 * 24 * 3600.0
    """Seconds a dead-lettered job is kept."""
    reap_batch: int = 100
    """Expired leases returned to their queue per fetch (a bounded step, no global lock)."""
    promote_batch: int = 1000
    """Due delayed jobs moved to ready per fetch."""
    enqueue_chunk: int = 1000
    """Jobs per enqueue script call; a larger batch is several calls in one transaction."""
    events_max: int = 10_000
    """About how many recent events the events stream keeps (``XADD MAXLEN ~``): the oldest
    go first."""

    def __post_init__(self) -> None:
        if not self.prefix or "{" in self.prefix or "}" in self.prefix:
            raise ValueError("the key prefix must be non-empty and must not contain braces")
        if self.socket_timeout <= 0 or self.connect_timeout <= 0 or self.block_max <= 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.reap_batch < 1 or self.promote_batch < 1:
            raise ValueError("retries must be >= 0, batches >= 1")
        if self.enqueue_chunk < 1 or self.dead_max_count < 0 or self.dead_max_age < 0:
            raise ValueError("enqueue_chunk must be >= 1, dead limits >= 0")

    @property
    def blocking_timeout(self) -> float:
        """Longest blocking call, safely below the socket timeout."""
        return max(0.01, min(self.block_max, self.socket_timeout / 2))


class ClusterNotSupported(BrokerError, StorageError):
    """A Redis Cluster client was given to :class:`RedisBroker` or :class:`RedisStorage`.

    Both a :class:`~worq_core.BrokerError` and a :class:`~worq_core.StorageError`, so either
    constructor's callers catch it as they expect.
    """

    def __init__(self) -> None:
        super().__init__(
            "Redis Cluster is not supported yet by worq-redis; use a single server or Sentinel "
            "(a redis.Redis client, e.g. from a Sentinel's master_for())"
        )


def connect(
    target: object, settings: RedisSettings | None, prefix: str | None
) -> tuple[redis.Redis, str, RedisSettings, bool]:
    """Build (or adopt) a client. Returns ``(client, url, settings, owned)``. Does no I/O.

    ``target`` is a URL or a ``redis.Redis`` client (typed ``object``: callers are checked at
    run time). ``owned`` says whether we created the client (and so close it). Raises
    :class:`ClusterNotSupported` for a Redis Cluster client, ``TypeError`` for anything else.
    """
    settings = settings or RedisSettings()
    if isinstance(target, redis.RedisCluster):
        raise ClusterNotSupported
    if isinstance(target, redis.Redis):
        kwargs = target.get_connection_kwargs()
        if kwargs.get("decode_responses"):
            raise ValueError("worq-redis needs a client with decode_responses=False")
        if prefix is not None:
            settings = _replace_prefix(settings, prefix)
        return target, _describe(kwargs), settings, False
    if not isinstance(target, str):
        kind = type(target).__name__
        raise TypeError(f"expected a Redis URL or a redis.Redis client, not {kind}")
    base, _, query_text = target.partition("?")
    query = urllib.parse.parse_qsl(query_text, keep_blank_values=True)
    url_prefix = [v for k, v in query if k == "prefix"]
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "prefix"])
    clean = f"{base}?{rest}" if rest else base
    if prefix is not None:
        settings = _replace_prefix(settings, prefix)
    elif url_prefix:
        settings = _replace_prefix(settings, url_prefix[-1])
    client = redis.Redis.from_url(
        clean,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.retries),
        decode_responses=False,
    )
    return client, target, settings, True


def _replace_prefix(settings: RedisSettings, prefix: str) -> RedisSettings:
    from dataclasses import replace

    return replace(settings, prefix=prefix)


def _describe(kwargs: dict[str, Any]) -> str:
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


def redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def server_identity(client: redis.Redis) -> tuple[Any, ...]:
    """What identifies the server and database a client talks to."""
    kw = client.get_connection_kwargs()
    return (
        kw.get("host"),
        kw.get("port"),
        kw.get("path"),
        kw.get("db", 0),
        kw.get("username"),
        client.connection_pool.connection_class,
    )


@contextlib.contextmanager
def translate_errors(
    url: str, connection_error: Callable[[str, str], WorqError], error: Callable[[str], WorqError]
) -> Iterator[None]:
    """Turn redis-py exceptions into worq's error tree, chaining the original."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise connection_error(redact(url), f"{type(exc).__name__}: {exc}") from exc
    except RedisError as exc:
        raise error(f"redis error at {redact(url)}: {type(exc).__name__}: {located(exc)}") from exc


_SCRIPT_SHA = re.compile(r"script: ([0-9a-f]{40})")


def located(exc: BaseException) -> str:
    """The text of a Redis error, its script line numbers made ``.lua`` file lines.

    Redis names the script by SHA1 and numbers the lines of its whole source; for one of ours,
    :func:`worq_redis.lua.locate` turns ``user_script:<n>`` into ``<file>.lua:<line>``.
    """
    text = str(exc)
    found = _SCRIPT_SHA.search(text)
    name = _SCRIPT_NAMES.get(found[1]) if found else None
    return text if name is None else lua.locate(name, text)


# -- keys ----------------------------------------------------------------------------------------


def queue_keys(prefix: str, queue: str) -> tuple[str, ...]:
    """The keys every queue script of ``queue`` takes, in order.

    The ten keys of the queue itself, all under the hash tag ``{queue}`` (one Cluster slot), then
    the prefix's job-id index (:func:`ids_key`), which every queue of the prefix shares. The
    queue's keys for unique jobs and limits (``lua.DERIVED_KEY_SUFFIXES``, and one per unique,
    rate and concurrency key) are built by the scripts from the same base.
    """
    if not queue or queue.startswith("}"):
        raise ValueError(f"invalid queue name {queue!r}: empty, or starts with '}}'")
    base = f"{prefix}:{{{queue}}}:"
    return (*(base + suffix for suffix in lua.QUEUE_KEY_SUFFIXES), ids_key(prefix))


def ids_key(prefix: str) -> str:
    """The job-id index of ``prefix``: a HASH of every job id its brokers hold -> its queue.

    It makes a job id unique across all queues of the prefix. It is the one key shared by every
    queue's scripts, so it is outside every queue's Cluster slot: Redis Cluster support will need
    a decision here (see ``docs/redis.md``). The ``job_state`` script also builds queue key names
    from the queue it finds here (as :func:`queue_keys` does).
    """
    return f"{prefix}:ids"


def result_keys(prefix: str, job_id: str) -> tuple[str, str, str]:
    """A job's result, waiting marker and wake-up list, under the hash tag ``{job_id}``."""
    base = f"{prefix}:res:{{{job_id}}}"
    return base, base + ":waiting", base + ":done"


def schedules_key(prefix: str) -> str:
    """The schedules of ``prefix``: a HASH of schedule name -> ``repr`` of its last fire time.

    Like the id index it is shared by every queue (``fire_schedule`` takes it next to the keys of
    the queue its job goes to), so it is outside every queue's Cluster slot.
    """
    return f"{prefix}:schedules"


def events_key(prefix: str) -> str:
    """The recent-events STREAM of ``prefix``, capped near ``RedisSettings.events_max``."""
    return f"{prefix}:events"


def group_key(prefix: str, group_id: str) -> str:
    """A workflow group's state: a HASH under the hash tag ``{group_id}`` (see ``docs/redis.md``).

    It holds the group's size, ttl, callback and each counted index's status and output. The
    settle and cancel scripts build its name the same way (``group_key`` in :mod:`worq_redis.lua`)
    from the prefix of the keys they were given, so it is outside their queue's Cluster slot.
    """
    return f"{prefix}:grp:{{{group_id}}}"


def registry_key(prefix: str) -> str:
    """The set of queue names the brokers under ``prefix`` have seen."""
    return f"{prefix}:queues"


# -- scripts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script known by its SHA1, loaded into Redis on first NOSCRIPT."""

    name: str
    source: str
    sha: str

    @classmethod
    def named(cls, name: str) -> Script:
        """The script ``name`` from :mod:`worq_redis.lua`."""
        text = lua.source(name)
        return cls(name, text, hashlib.sha1(text.encode()).hexdigest())


SCRIPTS: Final = {
    name: Script.named(name)
    for name in [
        *lua.QUEUE_SCRIPTS,
        *lua.LOOKUP_SCRIPTS,
        *lua.SCHEDULE_SCRIPTS,
        *lua.RESULT_SCRIPTS,
    ]
}

_SCRIPT_NAMES: Final = {script.sha: name for name, script in SCRIPTS.items()}

Call = tuple[Script, Sequence[KeyArg], Sequence[Arg]]


def command(target: Any, *args: Arg) -> Any:
    """``target.execute_command(*args)`` for a client or a pipeline (untyped in redis-py)."""
    return target.execute_command(*args)


def run_script(
    client: redis.Redis, script: Script, keys: Sequence[KeyArg], args: Sequence[Arg]
) -> Any:
    """One ``EVALSHA``; loads the script and retries once if Redis lost it (NOSCRIPT)."""
    try:
        return command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        command(client, "SCRIPT", "LOAD", script.source)
        return command(client, "EVALSHA", script.sha, len(keys), *keys, *args)


def run_scripts(
    client: redis.Redis, calls: Sequence[Call], *, extra: Sequence[Sequence[Arg]] = ()
) -> list[Any]:
    """Several script calls (after the plain commands ``extra``) in one pipelined round trip.

    Not a transaction: each call is atomic on its own. Calls that failed with NOSCRIPT are
    loaded and run again (the others already ran). Returns the scripts' results in order; the
    first other error is raised.
    """
    if len(calls) == 1 and not extra:
        return [run_script(client, *calls[0])]
    pipe = client.pipeline(transaction=False)
    for plain in extra:
        command(pipe, *plain)
    for script, keys, args in calls:
        command(pipe, "EVALSHA", script.sha, len(keys), *keys, *args)
    results = pipe.execute(raise_on_error=False)[len(extra) :]
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        pipe = client.pipeline(transaction=False)
        for script in {calls[i][0] for i in missing}:
            command(pipe, "SCRIPT", "LOAD", script.source)
        for i in missing:
            script, keys, args = calls[i]
            command(pipe, "EVALSHA", script.sha, len(keys), *keys, *args)
        again = pipe.execute(raise_on_error=False)[-len(missing) :]
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def run_transaction(
    client: redis.Redis, calls: Sequence[Call], *, extra: Sequence[Sequence[Arg]] = ()
) -> list[Any]:
    """Script calls in one ``MULTI``/``EXEC``: all run, back to back, or none does.

    Uses ``EVAL`` with the source, since a NOSCRIPT inside a transaction would not stop the
    others. Returns the scripts' results in order.
    """
    pipe = client.pipeline(transaction=True)
    for plain in extra:
        command(pipe, *plain)
    for script, keys, args in calls:
        command(pipe, "EVAL", script.source, len(keys), *keys, *args)
    results = pipe.execute(raise_on_error=True)
    return list(results[len(extra) :])


def clock_arg(clock: Clock | None) -> str:
    """``ARGV[1]`` of every script: empty for Redis ``TIME``, or the test clock's reading."""
    return "" if clock is None else repr(float(clock()))


# -- the lean command path ---------------------------------------------------------------------


class Lane:
    """Connections of their own for the hot calls, used without redis-py's per-command machinery.

    ``client.execute_command`` costs a pool checkout (a lock and a ``poll`` for stray data), a
    ``Retry`` wrapper, response callbacks and a pool release per command; a pipeline adds its own
    command stack. A lane keeps the connections it took from the client's pool on a stack of idle
    ones (``list.pop``/``append``, atomic under the GIL): a call pops one (or takes a new one from
    the pool when all are busy), writes with ``send_command``/``send_packed_command``, reads with
    ``read_response`` and pushes it back. So the fetch loop, the heartbeat and job threads never
    share a connection, and a lane holds at most as many connections as calls ever ran at once.

    Errors behave as through the client: Redis error replies are raised as redis-py exceptions
    (the connection stays usable); a connection or timeout error disconnects the connection, which
    reconnects on its next use, and the call is retried by the connection's own ``Retry`` policy
    (``RedisSettings.retries`` with capped backoff for a client we built), so every call stays
    bounded by the socket timeouts. :meth:`close` returns the connections to the pool; so does
    garbage collection of the lane, and a forked child forgets its parent's connections.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[Any] = []
        self._taken: list[Any] = []  # every connection this lane took, to give back
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _give_back, self._pool, self._taken, self._idle)
        _LANES.add(self)

    def command(self, *args: Arg) -> Any:
        """One command, its raw reply (no redis-py response callback)."""
        return self._run(_one, args)

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Commands in one write and one round trip; error replies come back as exceptions."""
        return list(self._run(_many, commands))

    def script(self, script: Script, head: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` of ``script`` with ``head`` (``numkeys, *keys``) and ``args``.

        Loads the script and runs it again if Redis lost it (NOSCRIPT).
        """
        call = ("EVALSHA", script.sha, *head, *args)
        try:
            return self._run(_one, call)
        except NoScriptError:
            self._run(_one, ("SCRIPT", "LOAD", script.source))
            return self._run(_one, call)

    def scripts(self, calls: Sequence[Call], *, extra: Sequence[Sequence[Arg]] = ()) -> list[Any]:
        """Like :func:`run_scripts`, on this lane: one round trip, NOSCRIPT calls rerun."""
        if len(calls) == 1 and not extra:
            script, keys, args = calls[0]
            return [self.script(script, (len(keys), *keys), args)]
        commands = [*extra]
        commands += [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls]
        results = self.pipeline(commands)[len(extra) :]
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            again: list[Sequence[Arg]] = [
                ("SCRIPT", "LOAD", source) for source in {calls[i][0].source for i in missing}
            ]
            for i in missing:
                script, keys, args = calls[i]
                again.append(("EVALSHA", script.sha, len(keys), *keys, *args))
            replies = self.pipeline(again)[-len(missing) :]
            for i, reply in zip(missing, replies, strict=True):
                results[i] = reply
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def close(self) -> None:
        """Give every connection back to the pool; the lane takes new ones if used again."""
        with self._lock:
            _give_back(self._pool, self._taken, self._idle)

    def _run(self, send: Callable[[Any, Any], Any], what: Any) -> Any:
        idle = self._idle
        try:
            conn = idle.pop()
        except IndexError:
            conn = self._take()
        try:
            reply = send(conn, what)
        except ResponseError:
            idle.append(conn)  # an error reply: the connection is in sync and usable
            raise
        except (RedisConnectionError, RedisTimeoutError) as exc:
            try:
                reply = _retry(conn, exc, lambda: send(conn, what))
            except BaseException:
                conn.disconnect()
                idle.append(conn)
                raise
        except BaseException:
            conn.disconnect()  # a reply may be half read: start afresh on the next use
            idle.append(conn)
            raise
        idle.append(conn)
        return reply

    def _take(self) -> Any:
        conn = self._pool.get_connection()
        with self._lock:
            self._taken.append(conn)
        return conn


def _one(conn: Any, args: Sequence[Arg]) -> Any:
    conn.send_command(*args)
    return conn.read_response()


def _many(conn: Any, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def _retry(conn: Any, first: Exception, again: Callable[[], Any]) -> Any:
    """Finish a call whose first attempt failed with ``first``, under ``conn.retry``.

    The policy sees the first failure as its own (disconnect, back off), so the attempts and
    pauses are exactly those of a redis-py client call.
    """
    pending = [first]

    def attempt() -> Any:
        if pending:
            raise pending.pop()
        return again()

    return conn.retry.call_with_retry(attempt, lambda _error: conn.disconnect())


def _give_back(pool: Any, taken: list[Any], idle: list[Any]) -> None:
    idle.clear()
    while taken:
        conn = taken.pop()
        try:
            pool.release(conn)
        except Exception:  # noqa: BLE001 - a pool already closed or reset: drop it
            conn.disconnect()


_LANES: weakref.WeakSet[Lane] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # The child must not touch the parent's sockets; it takes new connections when it needs them.
    for lane in list(_LANES):
        lane._idle.clear()
        lane._taken.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
