"""The "With SQLAlchemy" recipe of docs/postgres.md, run as written on the real PostgreSQL.

The test takes the recipe's code block from the page and executes it, with only the engine's
URL pointed at the test database, so the page and what is tested cannot drift apart.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if not os.environ.get("CI"):  # under CI a missing test dependency is an error
    pytest.importorskip("sqlalchemy", reason="a test dependency (the noxfile's TEST_DEPS)")
from sqlalchemy import Integer, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from worq_core import Worq
from worq_core.job import Envelope

PAGE = Path(__file__).resolve().parents[2] / "docs" / "postgres.md"
RECIPE_URL = "postgresql+psycopg://app@db.internal/shop"


def recipe() -> str:
    """The Python block under "### With SQLAlchemy"."""
    section = PAGE.read_text(encoding="utf-8").split("### With SQLAlchemy", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "docs/postgres.md lost its SQLAlchemy recipe"
    assert RECIPE_URL in block[1], "the recipe's engine URL changed: update RECIPE_URL"
    return block[1]


@pytest.fixture
def setup(pg_url: str) -> Iterator[tuple[Worq, Any, str, str]]:
    """The app, an ``Order`` model in the test schema, the engine URL, and the task's queue."""
    schema = pg_url.rpartition("schema=")[2]
    engine_url = "postgresql+psycopg" + pg_url.split("?")[0].removeprefix("postgresql")

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = f"orders_{uuid.uuid4().hex[:8]}"
        __table_args__ = {"schema": schema}  # noqa: RUF012 - SQLAlchemy's own convention
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        total: Mapped[int] = mapped_column(Integer)

    engine = create_engine(engine_url)
    Base.metadata.create_all(engine, tables=[Order.__table__])  # type: ignore[list-item]
    app = Worq(pg_url)
    yield app, Order, engine_url, f"sqla-{uuid.uuid4().hex[:8]}"
    app.close()
    engine.dispose()


def run_recipe(app: Worq, order: Any, engine_url: str, queue: str, *, fail: bool) -> None:
    """Execute the recipe with ``ship`` a task of ``app``; ``fail``: raise after the enqueue."""

    @app.task(queue=queue)
    def ship(order_id: int) -> None: ...

    class Failing:
        """``ship``, whose enqueue is followed by an error inside the transaction block."""

        def options(self, **options: Any) -> Failing:
            self.bound = ship.options(**options)
            return self

        def enqueue(self, *args: Any) -> None:
            self.bound.enqueue(*args)
            raise RuntimeError("the transaction fails after the enqueue")

    code = recipe().replace(RECIPE_URL, engine_url)
    exec(code, {"Order": order, "ship": Failing() if fail else ship})


def held(app: Worq, order: Any, engine_url: str, queue: str) -> tuple[int, list[int]]:
    """Jobs the queue holds, and the orders the table holds."""
    [stats] = app.broker.stats([queue])
    engine = create_engine(engine_url)
    try:
        with Session(engine) as session:
            ids = list(session.scalars(select(order.id)))
    finally:
        engine.dispose()
    return stats.ready, ids


def test_the_sqlalchemy_recipe_commits_the_order_and_its_job_together(
    setup: tuple[Worq, Any, str, str],
) -> None:
    app, order, engine_url, queue = setup
    run_recipe(app, order, engine_url, queue, fail=False)
    assert held(app, order, engine_url, queue) == (1, [42])
    [delivery] = app.broker.fetch([queue], 1, lease=30, wait=0)
    assert Envelope.decode(delivery.body, app.serializer).args == [42]


def test_the_sqlalchemy_recipe_rolls_back_the_order_and_its_job_together(
    setup: tuple[Worq, Any, str, str],
) -> None:
    app, order, engine_url, queue = setup
    with pytest.raises(RuntimeError, match="after the enqueue"):
        run_recipe(app, order, engine_url, queue, fail=True)
    assert held(app, order, engine_url, queue) == (0, [])
