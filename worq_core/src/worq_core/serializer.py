"""The serializer contract: plain data to bytes and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar


class Serializer(ABC):
    """Turns plain data into bytes and back.

    Plain data is ``dict`` (with ``str`` keys), ``list``, ``str``, ``bytes``, ``int``, ``float``,
    ``bool`` and ``None``, nested freely; tuples come back as lists. A serializer never names
    code to import: worq has no pickle. Instances are stateless and thread-safe.
    """

    name: ClassVar[str]
    """Unique plugin name, used in ``Worq(serializer=...)``."""

    @abstractmethod
    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raises :class:`~worq_core.errors.SerializationError` if it can't."""

    @abstractmethod
    def loads(self, data: bytes) -> Any:
        """Decode ``data``; raises :class:`~worq_core.errors.DeserializationError` if it can't."""
