"""The send path on PostgreSQL where concurrency matters: the send statement waits for
the conversation's lock, and the pool has no ping before use. SQLite runs one writer at
a time and has no server to drop connections, so these run on PostgreSQL only."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from parley.auth.service import Principal
from parley.conversations import service as conversations
from parley.messages import service as messages
from parley.messages.schemas import MessageCreate
from parley.models import User as UserRow
from tests.conftest import PG_URL, User, assert_problem, send
from tests.test_messages_send import Conversation, as_read_by, contents

pytestmark = [
    pytest.mark.skipif(not PG_URL, reason="needs PARLEY_TEST_DATABASE_URL (PostgreSQL)"),
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
]


async def _wait_for_a_lock_wait(app: FastAPI) -> None:
    """Until some statement of the test database waits for a row lock."""
    async with app.state.db.engine.connect() as conn:
        for _ in range(500):
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            # A transaction sees one snapshot of pg_stat_activity: end it to look again.
            await conn.rollback()
            if waiting:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the send never waited for the conversation's lock")


async def _as_principal(session: Any, user: User) -> Principal:
    row = await session.get(UserRow, uuid.UUID(user.id))
    assert row is not None
    return Principal(user=row, session_id=uuid.uuid4())


async def test_a_send_that_waited_behind_its_senders_removal_is_refused(
    app: FastAPI, alice: User, bob: User, group: Conversation
) -> None:
    """The statement's membership check reads a snapshot from before its wait for the
    lock; a removal committed meanwhile must still refuse the send."""
    cid = group["id"]
    async with app.state.db.transaction() as session:
        principal = await _as_principal(session, alice)
        await conversations.do_kick(session, principal, uuid.UUID(cid), uuid.UUID(bob.id))
        pending = asyncio.create_task(
            bob.post(f"/conversations/{cid}/messages", json={"content": "too late"})
        )
        await _wait_for_a_lock_wait(app)
    assert_problem(await pending, 404, "not_found")
    assert await contents(alice, cid) == []
    page = (await alice.get(f"/conversations/{cid}")).json()
    assert page["member_count"] == 1


async def test_a_send_that_waited_behind_another_send_takes_the_next_seq(
    app: FastAPI, alice: User, bob: User, group: Conversation
) -> None:
    cid = group["id"]
    earlier = await send(alice, cid, "earlier")
    async with app.state.db.transaction() as session:
        principal = await _as_principal(session, alice)
        first, _ = await messages.do_send_message(
            session, app.state.settings, principal, uuid.UUID(cid), MessageCreate(content="first")
        )
        # What only refers to the conversation (a read marker) does not wait for a send.
        read = bob.post(f"/conversations/{cid}/read", json={"seq": earlier["seq"]})
        assert (await asyncio.wait_for(read, timeout=5)).status_code == 204
        pending = asyncio.create_task(send(bob, cid, "second"))
        await _wait_for_a_lock_wait(app)
    second = await pending
    assert second["seq"] == first.seq + 1
    assert second["status"] == "sent"
    assert await as_read_by(bob, second) == second
    assert await contents(alice, cid) == ["earlier", "first", "second"]


async def test_pooled_connections_the_server_closed_are_replaced(
    app: FastAPI, alice: User, room: Conversation
) -> None:
    """No ping before each use: a connection PostgreSQL has closed (a restart, an idle
    timeout, an operator) is noticed at checkout and replaced, without a failed request."""
    cid = room["id"]
    # Several connections in the pool, all about to be closed by the server.
    await asyncio.gather(*(send(alice, cid, f"warm {i}") for i in range(6)))
    async with app.state.db.engine.connect() as conn:
        killed = (
            await conn.execute(
                text(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        ).all()
        assert killed
        await conn.commit()
        for _ in range(500):
            left = await conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": [pid for pid, _ in killed]},
            )
            await conn.rollback()
            if not left:
                break
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the event loop reads each closed socket's EOF
    for i in range(3):
        await send(alice, cid, f"after {i}")
    await asyncio.gather(*(send(alice, cid, f"together {i}") for i in range(6)))
    assert (await alice.get("http://test/ready")).status_code == 200
