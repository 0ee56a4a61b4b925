"""Engine construction with the dialect details kept in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# SQLite allows one writer at a time. A deferred transaction that reads and then writes
# can fail at once with SQLITE_BUSY when another writer got there first, and busy_timeout
# does not help it. Write transactions therefore begin IMMEDIATE (take the write lock up
# front, waiting up to this long for it); read-only ones stay deferred so reads run in
# parallel under WAL.
SQLITE_BUSY_TIMEOUT_MS = 15_000
WRITE_OPTION = "parley_write"


def create_engine(url: str, *, pool_size: int = 20, echo: bool = False) -> AsyncEngine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    # The pool size is the cap, with no overflow: SQLAlchemy closes an overflow
    # connection as soon as it is returned to a full pool, so a load just above the pool
    # size connects afresh for most requests (a new server process each time). That
    # halved persisted sends/s in bench/. Connections open on demand and stay open.
    kwargs.update(pool_size=pool_size, max_overflow=0)
    engine = create_async_engine(url, **kwargs)
    _configure_postgres(engine)
    return engine


def _configure_postgres(engine: AsyncEngine) -> None:
    # No pool_pre_ping: with asyncpg it costs three round trips per checkout (BEGIN, a
    # ping, ROLLBACK), as much as the rest of a message send. A connection the server
    # closed (a restart, an idle timeout, pg_terminate_backend) is noticed by asyncpg as
    # soon as the event loop reads the EOF, so a local check catches it at checkout and
    # the pool connects afresh. What no check before use can catch (a connection lost
    # mid-request, or silently half-open) fails that one request, and SQLAlchemy then
    # discards the connection; a ping would hang on a half-open one just the same.
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the server closed this pooled connection")


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
