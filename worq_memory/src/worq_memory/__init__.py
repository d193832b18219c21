"""worq-memory: the in-process broker and result storage behind ``memory://``."""

from worq_memory.broker import MemoryBroker
from worq_memory.storage import MemoryStorage

__all__ = ["MemoryBroker", "MemoryStorage"]
