"""worq-core's own serializers, registered through its ``worq`` entry point like any plugin."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterable
from typing import Any, ClassVar

import msgpack
from typing_extensions import override

from worq_core.errors import DeserializationError, SerializationError
from worq_core.hookspecs import hookimpl
from worq_core.serializer import Serializer

_CONTAINERS = (dict, list, tuple)
_packers = threading.local()
"""Each thread's msgpack ``Packer``: ``packb`` builds one per call, which cost more than packing
a small envelope."""


def _check_keys(value: Any) -> None:
    """Raise ``TypeError`` for a dict key that is not a ``str``, at any depth.

    Only containers are descended into (scalars cost nothing): this runs on every job.
    """
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"dict keys must be str, not {type(key).__name__}")
            if type(item) in _CONTAINERS:
                _check_keys(item)
    elif type(value) in _CONTAINERS:
        for item in value:
            if type(item) in _CONTAINERS:
                _check_keys(item)


class MsgpackSerializer(Serializer):
    """Compact binary encoding; the default. ``bytes`` stay ``bytes``, tuples become lists."""

    name: ClassVar[str] = "msgpack"

    @override
    def dumps(self, value: Any) -> bytes:
        try:
            packer = _packers.packer
        except AttributeError:
            packer = _packers.packer = msgpack.Packer(use_bin_type=True, datetime=False)
        try:
            _check_keys(value)  # msgpack would pack {(1, 2): x} and then refuse to unpack it
            data: bytes = packer.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            del _packers.packer  # it may hold half of the value: the next call takes a new one
            raise SerializationError(self.name, str(exc)) from exc
        return data

    @override
    def loads(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises a zoo of types for corrupt input
            raise DeserializationError(self.name, repr(exc)) from exc


# JSON has no bytes, so they travel as {"$bytes": "<base64>"}. A user's own dict with a single
# "$"-prefixed key is wrapped as {"$dict": {...}} so that it can never be mistaken for one.
_BYTES = "$bytes"
_DICT = "$dict"


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"dict keys must be str, not {type(key).__name__}")
        encoded = {key: _to_json(item) for key, item in value.items()}
        if len(value) == 1 and next(iter(value)).startswith("$"):
            return {_DICT: encoded}
        return encoded
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return value
    raise TypeError(f"{type(value).__name__} is not plain data")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, item),) = value.items()
            if key == _BYTES:
                return base64.b64decode(item, validate=True)
            if key == _DICT:
                return {k: _from_json(v) for k, v in item.items()}
        return {key: _from_json(item) for key, item in value.items()}
    return value


class JsonSerializer(Serializer):
    """Human-readable UTF-8 JSON, for interoperating with non-Python producers."""

    name: ClassVar[str] = "json"

    @override
    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(_to_json(value), separators=(",", ":")).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(self.name, str(exc)) from exc

    @override
    def loads(self, data: bytes) -> Any:
        try:
            return _from_json(json.loads(data))
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise DeserializationError(self.name, repr(exc)) from exc


@hookimpl
def worq_register_serializers() -> Iterable[type[Serializer]]:
    """worq-core ships msgpack (the default) and json."""
    return [MsgpackSerializer, JsonSerializer]
