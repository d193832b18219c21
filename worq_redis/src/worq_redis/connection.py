"""Connections, settings, key names and script calls shared by the Redis broker and storage."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from worq_core import BrokerError, StorageError, WorqError
from worq_redis import lua

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis
except ImportError:  # pragma: no cover - a dependency of worq-redis (redis[hiredis])
    _hiredis_pack = None
else:
    _hiredis_pack = cast("Callable[[tuple[Any, ...]], bytes]", hiredis.pack_command)

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"

Clock = Callable[[], float]
AnyClient = redis.Redis | redis.RedisCluster
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
    wait_replicas: int = 0
    """Replicas that must hold an enqueue or a settlement before it returns (Redis ``WAIT``).

    0 (the default): a write is acknowledged once the master has it, and a failover may lose
    what the replicas had not copied yet. Also the URL parameter ``?wait_replicas=N``."""
    wait_timeout: float = 1.0
    """Longest ``WAIT`` for :attr:`wait_replicas`, in seconds; must be below ``socket_timeout``
    when :attr:`wait_replicas` is set."""
    outbox_sweep: float = 5.0
    """Redis Cluster only: how often (seconds) a worker sweeps the outboxes of its queues, and
    how old an entry must be for a sweep to forward it (its own forwarder died or failed)."""
    outbox_memory: float = 3600.0
    """Redis Cluster only: how long (seconds) a queue remembers the outbox entries it applied
    (from the last time each was applied), so that one applied again (its forwarder died after
    applying it, before deleting it) adds nothing. An entry no sweep applied for longer than
    this may be applied twice."""
    async_connections: int = 32
    """Most connections an event loop's enqueues (``enqueue_async``) open at once; more
    concurrent enqueues wait for one of them."""

    def __post_init__(self) -> None:
        if not self.prefix or "{" in self.prefix or "}" in self.prefix:
            raise ValueError("the key prefix must be non-empty and must not contain braces")
        if self.socket_timeout <= 0 or self.connect_timeout <= 0 or self.block_max <= 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.reap_batch < 1 or self.promote_batch < 1:
            raise ValueError("retries must be >= 0, batches >= 1")
        if self.enqueue_chunk < 1 or self.dead_max_count < 0 or self.dead_max_age < 0:
            raise ValueError("enqueue_chunk must be >= 1, dead limits >= 0")
        if self.wait_replicas < 0 or self.wait_timeout <= 0:
            raise ValueError("wait_replicas must be >= 0, wait_timeout positive")
        if self.wait_replicas and self.wait_timeout >= self.socket_timeout:
            raise ValueError("wait_timeout must be below socket_timeout (WAIT blocks the reply)")
        if self.async_connections < 1:
            raise ValueError("async_connections must be >= 1")
        if self.outbox_sweep <= 0 or self.outbox_memory <= self.outbox_sweep:
            raise ValueError("outbox_sweep must be positive, and outbox_memory longer")

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
            "RedisBroker takes one server or a Sentinel master (a redis.Redis client or a "
            "redis:// or redis+sentinel:// URL); for Redis Cluster use RedisClusterBroker, or "
            "a redis+cluster:// URL"
        )


class UnsupportedClient(BrokerError, StorageError, TypeError):
    """Something other than a URL or a ``redis.Redis`` client was given as the connection."""

    def __init__(self, given: object) -> None:
        super().__init__(
            f"worq-redis takes a redis://, rediss://, unix://, redis+sentinel://, "
            f"rediss+sentinel://, redis+cluster:// or rediss+cluster:// URL, a redis.Redis "
            f"client (also one from a Sentinel's master_for()) or, for RedisClusterBroker and "
            f"RedisStorage, a redis.RedisCluster client; not "
            f"{type(given).__module__}.{type(given).__qualname__}"
        )


class ReplicasBehind(BrokerError, StorageError):
    """A write is on the master, but fewer replicas than asked confirmed it in time.

    Raised by enqueues (and by :class:`RedisStorage` saves) made with
    :attr:`RedisSettings.wait_replicas`: the job *is* queued on the master, but a failover now
    could lose it. Enqueueing it again with the same id adds nothing if it survived.
    """

    def __init__(self, url: str, wanted: int, got: int, timeout: float) -> None:
        self.wanted, self.got = wanted, got
        super().__init__(
            f"only {got} of {wanted} replicas of {redact(url)} confirmed the write within "
            f"{timeout}s; it is on the master, but a failover may lose it"
        )


CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
"""URL schemes of a Redis Cluster, given by any of its nodes (``rediss``: TLS)."""

SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
"""URL schemes of a master found through Redis Sentinel (``rediss``: TLS everywhere)."""

_SENTINEL_PARAMS: Final = frozenset(
    {
        "sentinel_username",
        "sentinel_password",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
    }
)


def connect(
    target: object, settings: RedisSettings | None, prefix: str | None
) -> tuple[redis.Redis, str, RedisSettings, bool]:
    """Build (or adopt) a client. Returns ``(client, url, settings, owned)``. Does no I/O.

    ``target`` is a URL or a ``redis.Redis`` client (typed ``object``: callers are checked at
    run time), also one from a Sentinel's ``master_for()``. ``owned`` says whether we created
    the client (and so close it). Raises :class:`ClusterNotSupported` for a Redis Cluster
    client, :class:`UnsupportedClient` for anything else that is no URL or client.
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
        pool = target.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            if not pool.is_master:
                raise ValueError(
                    "a Sentinel replica client (slave_for()) cannot take worq's writes; "
                    "pass the client of master_for()"
                )
            return target, _describe_sentinel(pool), settings, False
        return target, _describe(kwargs), settings, False
    if not isinstance(target, str):
        raise UnsupportedClient(target)
    if target.partition("://")[0] in CLUSTER_SCHEMES:
        raise ClusterNotSupported
    base, rest, settings = _our_params(target, settings, prefix)
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.retries)
    scheme = base.partition("://")[0]
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_client(base, dict(rest), settings, retry), target, settings, True
    clean = f"{base}?{urllib.parse.urlencode(rest)}" if rest else base
    client = redis.Redis.from_url(
        clean,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        socket_keepalive=True,
        retry=retry,
        decode_responses=False,
    )
    return client, target, settings, True


def connect_cluster(
    target: object, settings: RedisSettings | None, prefix: str | None
) -> tuple[redis.RedisCluster, str, RedisSettings, bool]:
    """:func:`connect` for Redis Cluster: a ``redis+cluster://`` URL or a ``RedisCluster``.

    The URL names any node (``redis+cluster://[user:pw@]host:port[?prefix=...]``); the client
    finds the others. With ``wait_replicas``, ``WAIT`` runs on the node each write went to.
    """
    settings = settings or RedisSettings()
    if isinstance(target, redis.RedisCluster):
        given: Any = target  # redis-py's cluster client is untyped
        if given.get_connection_kwargs().get("decode_responses"):
            raise ValueError("worq-redis needs a client with decode_responses=False")
        if prefix is not None:
            settings = _replace_prefix(settings, prefix)
        node = given.get_nodes()[0]
        return target, f"redis+cluster://{node.host}:{node.port}", settings, False
    if not isinstance(target, str):
        raise UnsupportedClient(target)
    scheme = target.partition("://")[0]
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"a Redis Cluster URL starts with redis+cluster://, not {scheme}://")
    base, rest, settings = _our_params(target, settings, prefix)
    plain = ("rediss" if scheme.startswith("rediss") else "redis") + base[len(scheme) :]
    clean = f"{plain}?{urllib.parse.urlencode(rest)}" if rest else plain
    client = redis.RedisCluster.from_url(
        clean,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        socket_keepalive=True,
        decode_responses=False,
    )
    return client, target, settings, True


def _our_params(
    target: str, settings: RedisSettings, prefix: str | None
) -> tuple[str, list[tuple[str, str]], RedisSettings]:
    """``target`` without worq's own query parameters, the others, and the settings they make."""
    base, _, query_text = target.partition("?")
    query = urllib.parse.parse_qsl(query_text, keep_blank_values=True)
    ours = {k: v for k, v in query if k in ("prefix", "wait_replicas")}
    rest = [(k, v) for k, v in query if k not in ("prefix", "wait_replicas")]
    if prefix is not None:
        settings = _replace_prefix(settings, prefix)
    elif "prefix" in ours:
        settings = _replace_prefix(settings, ours["prefix"])
    if "wait_replicas" in ours:
        try:
            wanted = int(ours["wait_replicas"])
        except ValueError:
            raise ValueError(
                f"wait_replicas must be a number, not {ours['wait_replicas']!r}"
            ) from None
        settings = replace(settings, wait_replicas=wanted)
    return base, rest, settings


def _sentinel_client(
    base: str, params: dict[str, str], settings: RedisSettings, retry: Retry
) -> redis.Redis:
    """The master client of ``redis+sentinel://[user:pw@]h1:p1,h2:p2/service[/db]``. No I/O."""
    scheme, _, rest = base.partition("://")
    unknown = sorted(set(params) - _SENTINEL_PARAMS)
    if unknown:
        raise ValueError(f"unknown {scheme}:// URL parameters: {', '.join(unknown)}")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = [_host_port(item, 26379) for item in hosts.split(",") if item]
    service, _, db_text = path.strip("/").partition("/")
    if not sentinels or not service:
        raise ValueError(f"a {scheme}:// URL names sentinels and a service: {redact(base)}")
    try:
        db = int(db_text or "0")
    except ValueError:
        raise ValueError(f"bad database number {db_text!r} in {redact(base)}") from None
    tls: dict[str, Any] = {}
    if scheme.startswith("rediss"):
        tls["ssl"] = True
        for name in _SENTINEL_PARAMS - {"sentinel_username", "sentinel_password"}:
            if name in params:
                value: Any = params[name]
                if name == "ssl_check_hostname":
                    value = value.lower() in ("1", "true", "yes")
                tls[name] = value
    sentinel_auth = {
        "username": params.get("sentinel_username") or None,
        "password": params.get("sentinel_password") or None,
    }
    manager = Sentinel(
        sentinels,
        sentinel_kwargs={
            "socket_timeout": settings.connect_timeout,
            "socket_connect_timeout": settings.connect_timeout,
            **{k: v for k, v in sentinel_auth.items() if v},
            **tls,
        },
    )
    client: redis.Redis = manager.master_for(
        service,
        redis_class=redis.Redis,
        db=db,
        username=urllib.parse.unquote(username) or None,
        password=urllib.parse.unquote(password) or None,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        socket_keepalive=True,
        retry=retry,
        decode_responses=False,
        **tls,
    )
    return client


def _host_port(item: str, default: int) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``, or a bare host) as a pair."""
    if item.startswith("["):
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise ValueError(f"bad sentinel address {item!r}") from None


def close_client(client: redis.Redis) -> None:
    """Close a client we built, and for a Sentinel master client its sentinels' clients too."""
    pool = getattr(client, "connection_pool", None)  # a cluster client has one per node
    client.close()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


def _replace_prefix(settings: RedisSettings, prefix: str) -> RedisSettings:
    return replace(settings, prefix=prefix)


def _describe(kwargs: dict[str, Any]) -> str:
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


def _describe_sentinel(pool: SentinelConnectionPool) -> str:
    """The ``redis+sentinel://`` URL of a Sentinel master client's pool (without passwords)."""
    hosts = []
    for sentinel in pool.sentinel_manager.sentinels:
        kw = sentinel.get_connection_kwargs()
        host = str(kw.get("host", "localhost"))
        hosts.append(
            f"[{host}]:{kw.get('port', 26379)}"
            if ":" in host
            else f"{host}:{kw.get('port', 26379)}"
        )
    tls = issubclass(pool.connection_class, redis.SSLConnection)
    scheme = SENTINEL_SCHEMES[1] if tls else SENTINEL_SCHEMES[0]
    return f"{scheme}://{','.join(hosts)}/{pool.service_name}/{pool.connection_kwargs.get('db', 0)}"


def redact(url: str) -> str:
    """``url`` without its passwords, for error messages and logs.

    The one in the user part and any query parameter named like ``*password``
    (``sentinel_password``); the user part is cut by hand, since a Sentinel URL lists several
    hosts where a URL parser expects one port.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    path, question, query = tail.partition("?")
    if question:
        fragment = ""
        if "#" in query:
            query, fragment = query.split("#", 1)
            fragment = "#" + fragment
        pairs = [
            f"{name}=***" if name.endswith("password") else f"{name}{eq}{value}"
            for name, eq, value in (item.partition("=") for item in query.split("&"))
        ]
        tail = f"{path}?{'&'.join(pairs)}{fragment}"
    return f"{scheme}://{netloc}{tail}"


def server_identity(client: redis.Redis) -> tuple[Any, ...]:
    """What identifies the server and database a client talks to.

    For a Sentinel master client: the service, its database and the sentinels asked, since the
    server behind it changes with every failover.
    """
    kw = client.get_connection_kwargs()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return (
            "sentinel",
            pool.service_name,
            kw.get("db", 0),
            kw.get("username"),
            _describe_sentinel(pool),
        )
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
    except (RedisError, RedisClusterException) as exc:
        raise error(f"redis error at {redact(url)}: {type(exc).__name__}: {located(exc)}") from exc


_SCRIPT_SHA = re.compile(r"script: ([0-9a-f]{40})")
_REDIRECTED_TOO_OFTEN: Final = (
    "TTL exhausted: every attempt was answered MOVED, ASK or TRYAGAIN (a slot is moving or a "
    "failover is under way), so the call did not run; retry it"
)


def located(exc: BaseException) -> str:
    """The text of a Redis error, its script line numbers made ``.lua`` file lines.

    Redis names the script by SHA1 and numbers the lines of its whole source; for one of ours,
    :func:`worq_redis.lua.locate` turns ``user_script:<n>`` into ``<file>.lua:<line>``.
    """
    text = str(exc)
    if isinstance(exc, ClusterError) and text.startswith("TTL exhausted"):
        # redis-py's words for "redirected on every attempt", which says nothing to a user.
        return _REDIRECTED_TOO_OFTEN
    found = _SCRIPT_SHA.search(text)
    name = _script_named_by(found[1]) if found else None
    return text if name is None else lua.locate(name, text)


# -- keys ----------------------------------------------------------------------------------------


def queue_keys(prefix: str, queue: str, *, cluster: bool = False) -> tuple[str, ...]:
    """The keys every queue script of ``queue`` takes, in order.

    With ``cluster``, the eleventh is the queue's own id index (:func:`cluster_ids_key`), so
    every key is in the queue's slot.

    The ten keys of the queue itself, all under the hash tag ``{queue}`` (one Cluster slot), then
    the prefix's job-id index (:func:`ids_key`), which every queue of the prefix shares. The
    queue's keys for unique jobs and limits (``lua.DERIVED_KEY_SUFFIXES``, and one per unique,
    rate and concurrency key) are built by the scripts from the same base.
    """
    if not queue or queue.startswith("}"):
        raise ValueError(f"invalid queue name {queue!r}: empty, or starts with '}}'")
    base = f"{prefix}:{{{queue}}}:"
    ids = cluster_ids_key(prefix, queue) if cluster else ids_key(prefix)
    return (*(base + suffix for suffix in lua.QUEUE_KEY_SUFFIXES), ids)


def cluster_ids_key(prefix: str, queue: str) -> str:
    """Under Redis Cluster, the id index of one queue (in its slot): ids are unique per queue."""
    return f"{prefix}:{{{queue}}}:ids"


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


def cluster_schedules_key(prefix: str, queue: str) -> str:
    """Under Redis Cluster, the schedules whose jobs go to ``queue``, in its slot.

    A HASH of schedule name -> ``repr`` of its last fire time, as :func:`schedules_key`, so
    ``fire_schedule`` stays one script in one slot. :func:`schedule_queues_key` names the queues
    that have one.
    """
    return f"{prefix}:{{{queue}}}:schedules"


def schedule_queues_key(prefix: str) -> str:
    """Under Redis Cluster, the SET of queues with a schedules hash, for ``schedule_fires()``."""
    return f"{prefix}:schedule-queues"


def outbox_key(prefix: str, queue: str) -> str:
    """Under Redis Cluster, ``queue``'s outbox: a ZSET of effects on other slots, by age.

    The settle, cancel and fire_schedule scripts add an entry for each effect of theirs that
    belongs to another slot (a ``then`` message for another queue, a group member counted, a
    group released); the broker applies it there and deletes it (see ``docs/redis.md``).
    """
    return f"{prefix}:{{{queue}}}:outbox"


def applied_key(prefix: str, queue: str) -> str:
    """Under Redis Cluster, the outbox entries ``queue`` applied lately (a ZSET by time).

    ``forward`` answers a repeat of one of them with -1 and adds nothing (see ``docs/redis.md``).
    """
    return f"{prefix}:{{{queue}}}:applied"


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


class Script:
    """A Lua script known by its SHA1, loaded into Redis on first NOSCRIPT.

    Built by name (``Script("enqueue")``: the script of :mod:`worq_redis.lua`), its source is
    composed (and hashed) on first use, not at import: a worker runs a handful of the scripts,
    and composing all of them cost its start-up ~10 ms. Tests pass ``source`` and ``sha`` to
    run a variant of one.
    """

    __slots__ = ("_sha", "_source", "name")

    def __init__(self, name: str, source: str | None = None, sha: str | None = None) -> None:
        self.name = name
        self._source = source
        self._sha = sha

    @property
    def source(self) -> str:
        """The whole source Redis runs (helpers included)."""
        if self._source is None:
            self._source = lua.source(self.name)
        return self._source

    @property
    def sha(self) -> str:
        """The SHA1 of :attr:`source`, by which ``EVALSHA`` names it."""
        if self._sha is None:
            self._sha = hashlib.sha1(self.source.encode()).hexdigest()
        return self._sha

    def __repr__(self) -> str:
        return f"Script({self.name!r})"


SCRIPTS: Final = {
    name: Script(name)
    for name in [
        *lua.QUEUE_SCRIPTS,
        *lua.ONE_JOB_SCRIPTS,
        *lua.LOOKUP_SCRIPTS,
        *lua.SCHEDULE_SCRIPTS,
        *lua.RESULT_SCRIPTS,
        *(f"{name}@cluster" for name in lua.CLUSTER_VARIANTS),
        *lua.CLUSTER_SCRIPTS,
    ]
}


def _script_named_by(sha: str) -> str | None:
    """The name of our script whose SHA1 is ``sha`` (composing every script: errors only)."""
    return next((name for name, script in SCRIPTS.items() if script.sha == sha), None)


Call = tuple[Script, Sequence[KeyArg], Sequence[Arg]]


def command(target: Any, *args: Arg) -> Any:
    """``target.execute_command(*args)`` for a client or a pipeline (untyped in redis-py)."""
    return target.execute_command(*args)


def run_script(
    client: AnyClient, script: Script, keys: Sequence[KeyArg], args: Sequence[Arg]
) -> Any:
    """One ``EVALSHA``; loads the script and retries once if Redis lost it (NOSCRIPT)."""
    try:
        return command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        client.script_load(script.source)  # a cluster client loads it on every primary
        return command(client, "EVALSHA", script.sha, len(keys), *keys, *args)


def run_scripts(
    client: AnyClient, calls: Sequence[Call], *, extra: Sequence[Sequence[Arg]] = ()
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
            if isinstance(client, redis.RedisCluster):
                client.script_load(script.source)  # on every primary, not the pipeline's pick
            else:
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
    the pool when all are busy), writes with ``send_packed_command`` (packed by hiredis), reads with
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

    def scripts(
        self,
        calls: Sequence[Call],
        *,
        extra: Sequence[Sequence[Arg]] = (),
        wait: Sequence[Arg] | None = None,
    ) -> list[Any]:
        """Like :func:`run_scripts`, on this lane: one round trip, NOSCRIPT calls rerun.

        With ``wait`` (``numreplicas, timeout ms``) a ``WAIT`` follows the scripts on the same
        connection, in the same round trip (and again after a rerun), and its reply (how many
        replicas have every write so far) is appended to the returned list.
        """
        if len(calls) == 1 and not extra and wait is None:
            script, keys, args = calls[0]
            return [self.script(script, (len(keys), *keys), args)]
        tail: list[Sequence[Arg]] = [] if wait is None else [("WAIT", *wait)]
        commands = [*extra]
        commands += [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls]
        replies = self.pipeline([*commands, *tail])
        results = replies[len(extra) : len(commands)]
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            again: list[Sequence[Arg]] = [
                ("SCRIPT", "LOAD", source) for source in {calls[i][0].source for i in missing}
            ]
            for i in missing:
                script, keys, args = calls[i]
                again.append(("EVALSHA", script.sha, len(keys), *keys, *args))
            replies = self.pipeline([*again, *tail])
            rerun = replies[len(again) - len(missing) : len(again)]
            for i, reply in zip(missing, rerun, strict=True):
                results[i] = reply
        for result in results:
            if isinstance(result, Exception):
                raise result
        if tail:
            if isinstance(replies[-1], Exception):
                raise replies[-1]
            results.append(replies[-1])
        return results

    def transaction(self, calls: Sequence[Call], *, wait: Sequence[Arg] | None = None) -> list[Any]:
        """Script calls in one ``MULTI``/``EXEC`` on this lane: all run, back to back, or none.

        Uses ``EVAL`` with the source, since a NOSCRIPT inside a transaction would not stop the
        others; ``wait`` as in :meth:`scripts`. Returns the scripts' results in order.
        """
        commands: list[Sequence[Arg]] = [("MULTI",)]
        commands += [("EVAL", s.source, len(keys), *keys, *args) for s, keys, args in calls]
        commands.append(("EXEC",))
        if wait is not None:
            commands.append(("WAIT", *wait))
        replies = self.pipeline(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply  # a command refused at queueing time, EXECABORT, or WAIT's error
        results = list(replies[len(calls) + 1])
        for result in results:
            if isinstance(result, Exception):
                raise result
        if wait is not None:
            results.append(replies[-1])
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
                reply = _retry(conn, exc, lambda: _reconnected(conn, send, what))
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


def _packed(conn: Any, args: Sequence[Arg]) -> bytes:
    """``args`` as one command in the Redis protocol, as ``conn`` would pack it.

    hiredis packs a whole command in C, several times faster than redis-py's encoder, which
    checks and converts one argument at a time (for a one-job enqueue that cost more than the
    script's own run). What hiredis does not take (a bool, a bytearray), or a client that
    encodes text otherwise than as UTF-8, goes through redis-py's packer, which also raises
    redis-py's errors for bad values.
    """
    if _hiredis_pack is not None and conn.encoder.encoding == "utf-8":
        try:
            return _hiredis_pack(args if type(args) is tuple else tuple(args))
        except TypeError:
            pass
    return b"".join(conn.pack_command(*args))


def _one(conn: Any, args: Sequence[Arg]) -> Any:
    conn.send_packed_command([_packed(conn, args)])
    return conn.read_response()


def _many(conn: Any, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    conn.send_packed_command([b"".join([_packed(conn, args) for args in commands])])
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def _reconnected(conn: Any, send: Callable[[Any, Any], Any], what: Any) -> Any:
    """``send(conn, what)`` after ``conn.connect()``.

    A connection reconnects by itself when a command is sent, but straight to the host and port
    it had; ``connect()`` is where a Sentinel-managed connection asks the sentinels for the
    master first, so a lane follows a failover on its retry.
    """
    conn.connect()
    return send(conn, what)


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


class ClusterLane:
    """:class:`Lane`'s calls over a ``redis.RedisCluster`` client, for :class:`RedisClusterBroker`.

    Each call goes through the cluster client, which routes it to the node owning its keys'
    slot and follows ``MOVED`` and ``ASK`` redirections (a slot being migrated); a pipeline is
    split by node. Every script call names keys of one slot. Scripts Redis lost are loaded on
    every primary and the calls run again. No transactions: they would span nodes.

    Calls with ``wait`` go to the node of their keys on a :class:`Lane` of that node's own, the
    scripts and a ``WAIT`` in one round trip on one connection (``WAIT`` counts that
    connection's writes); a redirection or a lost node makes it refresh the slot map and try
    again, a few times.
    """

    def __init__(self, client: redis.RedisCluster) -> None:
        self._client: Any = client  # redis-py's cluster client is untyped
        self._nodes: dict[str, Lane] = {}

    def command(self, *args: Arg) -> Any:
        """One command on the node of its key."""
        return self._client.execute_command(*args)

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Commands pipelined per node; error replies come back as exceptions."""
        pipe = self._client.pipeline()
        for args in commands:
            pipe.execute_command(*args)
        return list(pipe.execute(raise_on_error=False))

    def script(self, script: Script, head: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` of ``script`` with ``head`` (``numkeys, *keys``) and ``args``."""
        try:
            return self._client.execute_command("EVALSHA", script.sha, *head, *args)
        except NoScriptError:
            self._client.script_load(script.source)
            return self._client.execute_command("EVALSHA", script.sha, *head, *args)

    def scripts(
        self,
        calls: Sequence[Call],
        *,
        extra: Sequence[Sequence[Arg]] = (),
        wait: Sequence[Arg] | None = None,
    ) -> list[Any]:
        """Like :meth:`Lane.scripts`, pipelined per node.

        With ``wait``, the reply appended is the fewest replicas that confirmed on any node the
        calls went to (``extra`` is not allowed then).
        """
        if wait is not None:
            return self._scripts_waited(calls, wait)
        if len(calls) == 1 and not extra:
            script, keys, args = calls[0]
            return [self.script(script, (len(keys), *keys), args)]
        commands = [*extra]
        commands += [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls]
        results = self.pipeline(commands)[len(extra) :]
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for source in {calls[i][0].source for i in missing}:
                self._client.script_load(source)
            again = [
                ("EVALSHA", calls[i][0].sha, len(calls[i][1]), *calls[i][1], *calls[i][2])
                for i in missing
            ]
            for i, reply in zip(missing, self.pipeline(again), strict=True):
                results[i] = reply
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _scripts_waited(self, calls: Sequence[Call], wait: Sequence[Arg]) -> list[Any]:
        by_node: dict[str, list[int]] = {}
        for index, (_, keys, _) in enumerate(calls):
            by_node.setdefault(self._client.get_node_from_key(keys[0]).name, []).append(index)
        results: list[Any] = [None] * len(calls)
        acked: int | None = None
        for indexes in by_node.values():
            group = [calls[i] for i in indexes]
            *replies, confirmed = self._on_owner(group, wait)
            for i, reply in zip(indexes, replies, strict=True):
                results[i] = reply
            acked = int(confirmed) if acked is None else min(acked, int(confirmed))
        return [*results, acked]

    def _on_owner(self, calls: Sequence[Call], wait: Sequence[Arg]) -> list[Any]:
        """``calls`` (one slot's) and ``WAIT`` on the node that owns the slot now."""
        attempts = 0
        while True:
            node = self._client.get_node_from_key(calls[0][1][0])
            lane = self._nodes.get(node.name)
            if lane is None:
                lane = self._nodes.setdefault(node.name, Lane(node.redis_connection))
            try:
                return lane.scripts(calls, wait=wait)
            except (MovedError, AskError, TryAgainError, ClusterDownError, RedisConnectionError):
                # Nothing ran (a redirection), or the node is gone: ask the cluster where the
                # slot is now, and try there.
                attempts += 1
                if attempts > _OWNER_ATTEMPTS:
                    raise
                time.sleep(min(1.0, 0.05 * 2**attempts))  # a failover takes a while
                self._client.nodes_manager.initialize()

    def close(self) -> None:
        """Give back the connections of the per-node lanes; the others are the client's."""
        for lane in self._nodes.values():
            lane.close()


# -- the asyncio lane ---------------------------------------------------------------------------

_ASYNC_KWARGS: Final = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "credential_provider",
        "client_name",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "health_check_interval",
        "protocol",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_password",
    }
)
"""The connection settings a blocking client's pool shares with its asyncio twin: where to
connect and how to authenticate, the timeouts and TLS, never objects made for blocking I/O
(its retry policy, parser, callbacks)."""


def async_pool(client: redis.Redis, settings: RedisSettings) -> Any | None:
    """A ``redis.asyncio`` connection pool that reaches what ``client`` reaches, or ``None``.

    The same server and database (or the same Sentinel service, found again after a failover)
    with the same credentials, timeouts and TLS settings, and ``settings.retries``. ``None``
    for a client whose connections have no asyncio twin (a custom connection class of its
    own), which then enqueues on a thread. Does no I/O; the pool belongs to the event loop
    that first uses it.
    """
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel
    from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool

    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _ASYNC_KWARGS}
    kwargs["decode_responses"] = False
    kwargs["retry"] = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), settings.retries)
    if isinstance(pool, SentinelConnectionPool):
        tls = pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
        if not tls and pool.connection_class is not redis.sentinel.SentinelManagedConnection:
            return None
        manager = pool.sentinel_manager
        sentinels = []
        for sentinel in manager.sentinels:
            kw = sentinel.get_connection_kwargs()
            sentinels.append((kw.get("host", "localhost"), kw.get("port", 26379)))
        sentinel_kwargs = {
            k: v for k, v in manager.sentinel_kwargs.items() if k in _ASYNC_KWARGS or k == "ssl"
        }
        if tls:
            kwargs["ssl"] = True
        return AsyncSentinelPool(  # type: ignore[no-untyped-call]
            pool.service_name,
            AsyncSentinel(sentinels, sentinel_kwargs=sentinel_kwargs),
            **kwargs,
        )
    twins = {
        redis.SSLConnection: aredis.SSLConnection,
        redis.UnixDomainSocketConnection: aredis.UnixDomainSocketConnection,
        redis.Connection: aredis.Connection,
    }
    twin = twins.get(pool.connection_class)
    if twin is None:
        return None
    return aredis.ConnectionPool(connection_class=twin, **kwargs)


class AsyncLane:
    """:class:`Lane` for asyncio code: one event loop's calls, on an asyncio pool's connections.

    Idle connections on a stack, each call on one of its own (so concurrent tasks of the loop
    never wait for one another's replies), packed by hiredis, read with ``read_response``. A
    connection or timeout error is retried on a fresh connection like the blocking lane's calls
    (``RedisSettings.retries``, capped backoff); a Redis error reply leaves the connection in
    sync and usable; anything else (a cancelled task among them) drops the connection's socket,
    since a reply may be half read. Not thread-safe: one lane per event loop.
    """

    def __init__(self, pool: Any, retries: int, most: int) -> None:
        self._pool = pool
        self._retries = retries
        self._most = max(1, min(most, pool.max_connections))
        self._idle: list[Any] = []
        self._taken: list[Any] = []
        self._waiting: deque[Any] = deque()  # futures of calls waiting for a connection
        self._guard: AsyncIterator[None] | None = None

    async def script(self, script: Script, head: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` of ``script``; loads it and runs it again if Redis lost it (NOSCRIPT)."""
        call = ("EVALSHA", script.sha, *head, *args)
        try:
            return (await self.pipeline([call]))[0]
        except NoScriptError:
            await self.pipeline([("SCRIPT", "LOAD", script.source)])
            return (await self.pipeline([call]))[0]

    async def scripts(
        self, calls: Sequence[Call], *, wait: Sequence[Arg] | None = None
    ) -> list[Any]:
        """:meth:`Lane.scripts` (without ``extra``): one round trip, NOSCRIPT calls rerun."""
        if len(calls) == 1 and wait is None:
            script, keys, args = calls[0]
            return [await self.script(script, (len(keys), *keys), args)]
        tail: list[Sequence[Arg]] = [] if wait is None else [("WAIT", *wait)]
        commands = [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls]
        replies = await self.pipeline([*commands, *tail], raise_errors=False)
        if any(isinstance(r, NoScriptError) for r in replies[: len(commands)]):
            loads = [("SCRIPT", "LOAD", source) for source in {s.source for s, _, _ in calls}]
            replies = (await self.pipeline([*loads, *commands, *tail], raise_errors=False))[
                len(loads) :
            ]
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def transaction(
        self, calls: Sequence[Call], *, wait: Sequence[Arg] | None = None
    ) -> list[Any]:
        """:meth:`Lane.transaction`: the scripts in one ``MULTI``/``EXEC``, all or none."""
        commands: list[Sequence[Arg]] = [("MULTI",)]
        commands += [("EVAL", s.source, len(keys), *keys, *args) for s, keys, args in calls]
        commands.append(("EXEC",))
        if wait is not None:
            commands.append(("WAIT", *wait))
        replies = await self.pipeline(commands)
        results = list(replies[len(calls) + 1])
        for result in results:
            if isinstance(result, Exception):
                raise result
        if wait is not None:
            results.append(replies[-1])
        return results

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], *, raise_errors: bool = True
    ) -> list[Any]:
        """Commands in one write and one round trip.

        The first error reply is raised, unless ``raise_errors`` is false: then error replies
        come back as exceptions.
        """
        conn = await self._acquire()
        attempt = 0
        while True:
            try:
                replies = await _exchange(conn, commands)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await _drop(conn)
                if attempt >= self._retries:
                    self._release(conn)
                    raise
                attempt += 1
                await asyncio_sleep(min(0.5, 0.05 * 2**attempt))
            except BaseException:
                await _drop(conn)  # a reply may be half read: start afresh on the next use
                self._release(conn)
                raise
        self._release(conn)
        if raise_errors:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def close_with_loop(self) -> None:
        """Close this lane when its event loop shuts down its async generators.

        ``asyncio.run`` (and servers built on it, such as uvicorn) close every async generator
        still suspended before closing the loop: one suspended here closes the lane's
        connections in time, while their loop can still close them.
        """
        self._guard = _closed_at_shutdown(self)
        await anext(self._guard)

    async def close(self) -> None:
        """Close every connection and the pool; the lane takes new ones if used again."""
        self._idle.clear()
        while self._taken:
            conn = self._taken.pop()
            if conn is not None:
                await _drop(conn)
        await self._pool.disconnect()

    async def _acquire(self) -> Any:
        """An idle connection, a new one while fewer than the most are open, or the next freed."""
        if self._idle:
            return self._idle.pop()
        if len(self._taken) < self._most:
            self._taken.append(None)  # counted before the await, so no other call overshoots
            try:
                conn = await self._pool.get_connection()
            finally:
                self._taken.remove(None)
            self._taken.append(conn)
            return conn
        import asyncio

        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed over as the caller was cancelled
            else:
                self._waiting.remove(waiter)
            raise

    def _release(self, conn: Any) -> None:
        """Hand ``conn`` to the longest-waiting call, or put it back on the idle stack."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)


async def _closed_at_shutdown(lane: AsyncLane) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await lane.close()


async def asyncio_sleep(seconds: float) -> None:
    """``asyncio.sleep``, imported on first use (a worker with no async task never needs it)."""
    import asyncio

    await asyncio.sleep(seconds)


async def _exchange(conn: Any, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    data = b"".join([_packed(conn, args) for args in commands])
    await conn.send_packed_command([data])
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def _drop(conn: Any) -> None:
    """Close ``conn``'s socket without waiting for the peer; it reconnects on its next use."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


_OWNER_ATTEMPTS: Final = 8
"""How often a call that waits for replicas asks the cluster again where its slot is."""

_LANES: weakref.WeakSet[Lane] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # The child must not touch the parent's sockets; it takes new connections when it needs them.
    for lane in list(_LANES):
        lane._idle.clear()
        lane._taken.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
