"""Hub behaviour that needs precise interleavings, driven directly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from parley.realtime.broker import MemoryBroker
from parley.realtime.connection import Connection
from parley.realtime.hub import Hub


class SlowSessions:
    """A database whose session query takes a while and finds the given sessions live."""

    def __init__(self, live: set[uuid.UUID]) -> None:
        self.live = live
        self.started = asyncio.Event()

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Any]:
        outer = self

        class Session:
            async def scalars(self, _stmt: Any) -> set[uuid.UUID]:
                outer.started.set()
                await asyncio.sleep(0.2)
                return set(outer.live)

        yield Session()


def connection(session_id: uuid.UUID) -> Connection:
    return Connection(id=uuid.uuid4().hex, user_id=uuid.uuid4(), session_id=session_id)


async def test_a_connection_attached_during_the_session_sweep_is_not_closed() -> None:
    live_session = uuid.uuid4()
    db = SlowSessions(live={live_session})
    hub = Hub(db, MemoryBroker())  # type: ignore[arg-type]
    first = connection(live_session)
    hub.connections[first.id] = first
    ended = connection(uuid.uuid4())
    hub.connections[ended.id] = ended

    sweep = asyncio.create_task(hub._close_ended_sessions())
    await db.started.wait()
    # Attached while the sweep's query runs: its session was never looked at.
    newcomer = connection(uuid.uuid4())
    hub.connections[newcomer.id] = newcomer
    await sweep

    assert not first.closed
    assert ended.close_code == 4001
    assert not newcomer.closed
