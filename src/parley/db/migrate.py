"""Applying Alembic migrations from code (CLI, `serve` on SQLite, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Objects that live outside the ORM metadata on purpose (search indexes written by hand
# for one dialect); the models-vs-migrations check must not report them.
EXTERNAL_OBJECTS = frozenset({"messages_fts", "ix_messages_content_trgm"})


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    if name is None:
        return True
    return not (name in EXTERNAL_OBJECTS or name.startswith("messages_fts"))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations. Runs its own event loop: call it from sync code or a thread."""
    command.upgrade(alembic_config(url), revision)


async def pending_revisions(engine: AsyncEngine) -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    heads = set(script.get_heads())
    async with engine.connect() as conn:
        current = await conn.run_sync(
            lambda sync_conn: set(MigrationContext.configure(sync_conn).get_current_heads())
        )
    return sorted(heads - current)
