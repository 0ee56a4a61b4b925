"""The database handle and the request-scoped transaction.

One transaction per request, owned by the dependency: it commits when the endpoint
returns and rolls back when it raises. Events emitted during the transaction (the
outbox, parley.realtime.envelope.emit) are published only once the commit has succeeded,
so an event for a rolled-back write cannot be published.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.util import greenlet_spawn

from parley.db.engine import WRITE_OPTION, create_engine
from parley.realtime.envelope import drop_outbox, take_outbox

log = structlog.get_logger("parley.db")

Publisher = Callable[[list[Any]], Awaitable[None]]
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Database:
    def __init__(self, url: str, *, pool_size: int = 20) -> None:
        self.url = url
        self.engine: AsyncEngine = create_engine(url, pool_size=pool_size)
        self.dialect = self.engine.dialect.name
        # Set by the real-time layer: receives the events a transaction emitted, after
        # its commit.
        self.publisher: Publisher | None = None
        self._read = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._write = async_sessionmaker(
            self.engine.execution_options(**{WRITE_OPTION: True}),
            expire_on_commit=False,
            autoflush=False,
        )

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[AsyncSession]:
        """A unit of work: commit on success, roll back on error, then publish its events."""
        maker = self._write if write else self._read
        async with maker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                drop_outbox(session)
                raise
        outbox = take_outbox(session)
        if outbox:
            await self.publish(outbox)

    async def publish(self, events: list[Any]) -> None:
        """Publish the events of a committed write."""
        if self.publisher is None:
            return
        try:
            await self.publisher(events)
        except Exception:
            # Committed is committed: a lost publish leaves a hole in the seq that every
            # hub fills from the database (§9.3).
            log.exception("publish_failed", events=len(events))

    @asynccontextmanager
    async def driver_connection(self) -> AsyncIterator[Any]:
        """A pooled connection of the driver itself (asyncpg), outside any transaction,
        for a statement that is its own transaction (parley.messages.service.do_send)."""
        raw = await self.engine.raw_connection()
        try:
            yield raw.driver_connection
        finally:
            # Back to the pool; its reset runs in SQLAlchemy's greenlet bridge. asyncpg
            # itself makes a connection whose statement was cancelled usable again, and
            # one the server closed is replaced at its next checkout (parley.db.engine).
            await greenlet_spawn(raw.close)

    async def dispose(self) -> None:
        await self.engine.dispose()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    db: Database = request.app.state.db
    async with db.transaction(write=request.method not in _SAFE_METHODS) as session:
        yield session


# scope="function": the commit happens when the endpoint returns, before the response is
# sent, so a 2xx is only ever sent for a durable write (§9.1).
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
