"""The Alembic revisions and the ORM models describe the same schema."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi import FastAPI
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from parley.db.base import Base
from parley.db.migrate import include_object, upgrade
from parley.db.session import Database


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"include_object": include_object, "compare_type": True}
    )
    with warnings.catch_warnings():
        # SQLite cannot reflect expression indexes; Alembic says so and skips them.
        warnings.filterwarnings("ignore", message=".*expression-based index.*")
        return compare_metadata(context, Base.metadata)


async def test_models_and_migrations_agree(app: FastAPI) -> None:
    async with app.state.db.engine.connect() as conn:
        diff = await conn.run_sync(_diff)
    assert diff == []


async def test_hot_query_indexes_exist(app: FastAPI) -> None:
    def indexes(connection: Connection) -> dict[str, set[tuple[str, ...]]]:
        inspector = inspect(connection)
        out: dict[str, set[tuple[str, ...]]] = {}
        for table in ("messages", "memberships", "conversations"):
            found = {tuple(i["column_names"]) for i in inspector.get_indexes(table)}
            found |= {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)}
            pk = inspector.get_pk_constraint(table)["constrained_columns"]
            found.add(tuple(pk))
            out[table] = found
        return out

    async with app.state.db.engine.connect() as conn:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*expression-based index.*")
            found = await conn.run_sync(indexes)
    assert ("conversation_id", "seq") in found["messages"]
    assert ("conversation_id", "sender_id", "client_msg_id") in found["messages"]
    assert ("conversation_id", "updated_seq") in found["messages"]
    assert ("conversation_id", "user_id") in found["memberships"]
    assert ("user_id", "conversation_id") in found["memberships"]
    assert ("direct_key",) in found["conversations"]


async def test_a_fresh_sqlite_database_migrates_down_and_up(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    import asyncio

    await asyncio.to_thread(upgrade, url)
    await asyncio.to_thread(upgrade, url, "head")  # idempotent
    from alembic import command

    from parley.db.migrate import alembic_config

    await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert {"users", "conversations", "messages", "messages_fts"} <= tables
    finally:
        await db.dispose()
