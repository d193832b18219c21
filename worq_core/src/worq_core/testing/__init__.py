"""worq's conformance suite: the delivery contract, written once, run against every backend.

Install with ``pip install worq-core[testing]`` and subclass the contracts in your own tests::

    import pytest
    from worq_core.testing import BrokerContract

    class TestMyBroker(BrokerContract):
        @pytest.fixture
        def broker(self):
            broker = MyBroker("my://localhost")  # fresh and empty for every test
            yield broker
            broker.close()

:class:`BrokerContract` needs a ``broker`` fixture, :class:`StorageContract` a ``storage``
fixture, :class:`SerializerContract` a ``serializer`` fixture, and :class:`WorkerContract` (whole
jobs through a real worker) both ``broker`` and ``storage``. Cases that need a
:class:`~worq_core.Capability` your broker does not declare are skipped; a broker with
:attr:`~worq_core.Capability.RESULTS` also needs a ``storage`` fixture for BrokerContract (the
storage it writes records into).

For your own app's tests, :func:`in_memory` points an app at the memory broker and its
:class:`Drainer` runs the queued jobs (see ``docs/testing.md``).

The contract modules are imported lazily so that worq-core's pytest plugin can register them
for assertion rewriting before they load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worq_core.testing.broker_contract import BrokerContract
    from worq_core.testing.helpers import Drainer, in_memory
    from worq_core.testing.serializer_contract import SerializerContract
    from worq_core.testing.storage_contract import StorageContract
    from worq_core.testing.worker_contract import WorkerContract

_WHERE = {
    "BrokerContract": "worq_core.testing.broker_contract",
    "Drainer": "worq_core.testing.helpers",
    "SerializerContract": "worq_core.testing.serializer_contract",
    "StorageContract": "worq_core.testing.storage_contract",
    "WorkerContract": "worq_core.testing.worker_contract",
    "in_memory": "worq_core.testing.helpers",
}

__all__ = [
    "BrokerContract",
    "Drainer",
    "SerializerContract",
    "StorageContract",
    "WorkerContract",
    "in_memory",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
