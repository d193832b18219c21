"""worq-core's pytest plugin (entry point ``pytest11: worq``).

It only registers the conformance suite for assertion rewriting and declares its marker, so it
costs nothing in projects that do not use the suite.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite(
    "worq_core.testing.broker_contract",
    "worq_core.testing.inspection_contract",
    "worq_core.testing.scheduling_contract",
    "worq_core.testing.serializer_contract",
    "worq_core.testing.storage_contract",
    "worq_core.testing.worker_contract",
    "worq_core.testing.workflow_contract",
    "worq_core.testing.support",
    "worq_core.testing.worker_leases_contract",
)


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``worq_requires`` marker."""
    config.addinivalue_line(
        "markers",
        "worq_requires(*capabilities): skip unless the broker under test declares them",
    )
