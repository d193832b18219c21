"""The fixture pattern: every test gets the app on a fresh in-memory broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from app import OUTBOX, app

from worq_core.testing import Drainer, in_memory


@pytest.fixture
def worker() -> Iterator[Drainer]:
    OUTBOX.clear()
    with in_memory(app) as drainer:
        yield drainer
