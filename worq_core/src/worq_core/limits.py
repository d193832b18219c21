"""A task's unique key and its global limits, as declared on ``@app.task`` and sent per job.

The broker enforces them (:attr:`Capability.UNIQUE`, :attr:`Capability.LIMITS`); this module
only turns a task's declaration and a call's arguments into the keys and numbers the broker
needs: :class:`~worq_core.models.UniqueKey`, :class:`~worq_core.models.RateLimit` and
:class:`~worq_core.models.ConcurrencyLimit`.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from worq_core.errors import TaskError
from worq_core.models import ConcurrencyLimit, RateLimit, UniqueKey, UniqueUntil

KeyFunction = Callable[..., Any]
"""Called with a job's arguments by parameter name; its ``str()`` becomes part of the key."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([smhd])\s*$")


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/m"`` -> ``(100, 60.0)``: jobs per period in seconds.

    Units are ``s``, ``m``, ``h`` and ``d``, optionally with a count (``"5/10s"``: five per ten
    seconds). Raises :class:`~worq_core.errors.TaskError` for anything else.
    """
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None:
        raise TaskError(f"bad rate limit {text!r}: write it as COUNT/UNIT, e.g. '100/m' or '5/10s'")
    count, multiple, unit = int(match[1]), float(match[2] or 1), match[3]
    if count < 1 or multiple <= 0:
        raise TaskError(f"bad rate limit {text!r}: the count and period must be positive")
    return count, multiple * _UNITS[unit]


def argument_hash(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """A stable hash of a call's arguments: equal arguments give equal hashes in any process.

    Mappings are hashed with their keys sorted, so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}``
    are one call; values msgpack cannot encode raise :class:`~worq_core.errors.TaskError`.
    """
    try:
        packed = msgpack.packb([_canonical(list(args)), _canonical(dict(kwargs))])
    except (TypeError, ValueError, OverflowError) as exc:
        raise TaskError(f"cannot hash these arguments for a unique key: {exc}") from exc
    return hashlib.blake2b(packed, digest_size=16).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        items = [(_canonical(k), _canonical(v)) for k, v in value.items()]
        try:
            items.sort()
        except TypeError:  # keys of mixed types: order by their type's name, then their text
            items.sort(key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        return ["\x00map", items]
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, set | frozenset):
        return ["\x00set", sorted((_canonical(v) for v in value), key=repr)]
    return value


def unique_until(value: bool | str | UniqueUntil | None) -> UniqueUntil | None:
    """``unique=`` as given to ``@app.task`` or ``options()``: ``True`` means until done."""
    if value is None or value is False:
        return None
    if value is True:
        return UniqueUntil.DONE
    try:
        return UniqueUntil(str(value).removeprefix("until_").removeprefix("until "))
    except ValueError:
        raise TaskError(
            f"bad unique mode {value!r}: use True, 'until_started' or 'until_done'"
        ) from None


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """What ``@app.task(unique=..., rate_limit=..., concurrency=...)`` declared."""

    unique: UniqueUntil | None = None
    unique_for: float = 0.0
    unique_key: KeyFunction | None = None
    rate_count: int = 0
    rate_period: float = 0.0
    rate_burst: int | None = None
    rate_key: KeyFunction | None = None
    concurrency: int | None = None
    concurrency_key: KeyFunction | None = None

    @classmethod
    def declare(
        cls,
        task: str,
        *,
        unique: bool | str | UniqueUntil | None,
        unique_for: float,
        unique_key: KeyFunction | None,
        rate_limit: str | None,
        rate_burst: int | None,
        rate_key: KeyFunction | None,
        concurrency: int | None,
        concurrency_key: KeyFunction | None,
    ) -> TaskLimits | None:
        """Check a task's declaration; ``None`` when it declares none of these."""
        mode = unique_until(unique)
        if unique_for < 0:
            raise TaskError(f"task {task!r}: unique_for must not be negative")
        if mode is None and (unique_for or unique_key is not None):
            raise TaskError(f"task {task!r}: unique_for and unique_key need unique=...")
        count, period = parse_rate(rate_limit) if rate_limit is not None else (0, 0.0)
        if rate_limit is None and (rate_burst is not None or rate_key is not None):
            raise TaskError(f"task {task!r}: rate_burst and rate_key need rate_limit=...")
        if rate_burst is not None and rate_burst < 1:
            raise TaskError(f"task {task!r}: rate_burst must be at least 1")
        if concurrency is not None and concurrency < 1:
            raise TaskError(f"task {task!r}: concurrency must be at least 1")
        if concurrency is None and concurrency_key is not None:
            raise TaskError(f"task {task!r}: concurrency_key needs concurrency=...")
        if mode is None and not count and concurrency is None:
            return None
        return cls(
            mode,
            float(unique_for),
            unique_key,
            count,
            period,
            rate_burst,
            rate_key,
            concurrency,
            concurrency_key,
        )

    def rate(self, task: str, named: Mapping[str, Any]) -> RateLimit | None:
        """The rate limit a call with arguments ``named`` (by parameter) counts against."""
        if not self.rate_count:
            return None
        key = _keyed(task, self.rate_key, named)
        burst = self.rate_burst if self.rate_burst is not None else self.rate_count
        return RateLimit(key, self.rate_period / self.rate_count, burst)

    def concurrency_limit(self, task: str, named: Mapping[str, Any]) -> ConcurrencyLimit | None:
        """The concurrency limit a call with arguments ``named`` counts against."""
        if self.concurrency is None:
            return None
        return ConcurrencyLimit(_keyed(task, self.concurrency_key, named), self.concurrency)


def unique_key_for(
    task: str,
    declared: TaskLimits | None,
    named: Mapping[str, Any],
    *,
    mode: UniqueUntil | Literal[False] | None,
    key: str | None,
    hold_for: float | None,
) -> UniqueKey | None:
    """The unique key of one call: ``options()`` first, then the task's declaration.

    ``named`` is the call's arguments by parameter name (:func:`named_arguments`). The default
    key is the task's name and :func:`argument_hash` of them, so ``f("a")``, ``f(x="a")`` and
    a default left out or written out make one key; a ``unique_key`` function is called with
    them.
    """
    if mode is False:  # options(unique=False): this job goes without the task's key
        return None
    if mode is None and declared is not None:
        mode = declared.unique
    if mode is None and key is None and hold_for is None:
        return None
    if mode is None:
        mode = UniqueUntil.DONE
    if key is None:
        if declared is not None and declared.unique_key is not None:
            key = f"{task}:{declared.unique_key(**named)}"
        else:
            key = f"{task}:{argument_hash((), named)}"
    if hold_for is None:
        hold_for = declared.unique_for if declared is not None else 0.0
    return UniqueKey(key, mode, hold_for)


def named_arguments(
    signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A call's arguments by parameter name, defaults filled in and ``**kwargs`` spread out.

    Key functions are called with these as keyword arguments, so ``lambda user_id, **_:
    user_id`` picks one argument however the caller passed it.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _keyed(task: str, function: KeyFunction | None, named: Mapping[str, Any]) -> str:
    if function is None:
        return task
    return f"{task}:{function(**named)}"
