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

from parley.conversations import service as conversations
from parley.messages import service as messages
from parley.messages.schemas import MessageCreate
from tests.conftest import PG_URL, User, assert_problem, principal_of, send
from tests.test_messages_send import Conversation, as_read_by, contents, last_seq

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


# A plain send is the statement alone; one with a mention runs it in a transaction with
# more to write. Each must see what changed while it waited for the lock.
Content = pytest.mark.parametrize(
    "content", ["plain", "for @alice"], ids=["statement-alone", "in-a-transaction"]
)


@Content
async def test_a_send_that_waited_behind_its_senders_removal_is_refused(
    app: FastAPI, alice: User, bob: User, group: Conversation, content: str
) -> None:
    """The statement's membership check reads a snapshot from before its wait for the
    lock; a removal committed meanwhile must still refuse the send."""
    cid = group["id"]
    async with app.state.db.transaction() as session:
        principal = await principal_of(session, app, alice)
        await conversations.do_kick(session, principal, uuid.UUID(cid), uuid.UUID(bob.id))
        pending = asyncio.create_task(
            bob.post(f"/conversations/{cid}/messages", json={"content": content})
        )
        await _wait_for_a_lock_wait(app)
    assert_problem(await pending, 404, "not_found")
    assert await contents(alice, cid) == []
    page = (await alice.get(f"/conversations/{cid}")).json()
    assert page["member_count"] == 1


@Content
async def test_a_send_that_waited_behind_a_new_member_counts_them(
    app: FastAPI, alice: User, bob: User, carol: User, group: Conversation, content: str
) -> None:
    """A change of members while a send waits unsettles what its snapshot checked: the
    send is stored after the join, as the members are now."""
    cid = group["id"]
    await send(bob, cid, "earlier")
    joined_at = await last_seq(alice, cid) + 1
    async with app.state.db.transaction() as session:
        principal = await principal_of(session, app, alice)
        await conversations.do_put_member(
            session, app.state.settings, principal, uuid.UUID(cid), uuid.UUID(carol.id), None
        )
        pending = asyncio.create_task(send(bob, cid, content))
        await _wait_for_a_lock_wait(app)
    sent = await pending
    assert sent["seq"] == joined_at + 1
    assert sent["status"] == "sent"
    assert await as_read_by(carol, sent) == {**sent, "status": None}
    assert await contents(carol, cid) == ["earlier", content]


@Content
async def test_a_send_that_waited_behind_another_send_takes_the_next_seq(
    app: FastAPI, alice: User, bob: User, group: Conversation, content: str
) -> None:
    cid = group["id"]
    earlier = await send(alice, cid, "earlier")
    async with app.state.db.transaction() as session:
        principal = await principal_of(session, app, alice)
        first, _ = await messages.send_in_transaction(
            session, principal, uuid.UUID(cid), MessageCreate(content="first")
        )
        # What only refers to the conversation (a read marker) does not wait for a send.
        read = bob.post(f"/conversations/{cid}/read", json={"seq": earlier["seq"]})
        assert (await asyncio.wait_for(read, timeout=5)).status_code == 204
        pending = asyncio.create_task(send(bob, cid, content))
        await _wait_for_a_lock_wait(app)
    second = await pending
    assert second["seq"] == first.seq + 1
    assert second["status"] == "sent"
    assert second["mentions"] == ([alice.id] if "@" in content else [])
    assert await as_read_by(bob, second) == second
    assert await contents(alice, cid) == ["earlier", "first", content]


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


async def test_a_plain_send_is_one_statement_outside_any_transaction(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, alice: User, bob: User, group: Conversation
) -> None:
    """The common send is parley.messages.pgsend's statement; a mention or a reply needs
    the transactional path. Both store and answer alike."""
    db = app.state.db
    opened: list[bool] = []
    transaction = db.transaction

    def counted(*, write: bool = True) -> Any:
        opened.append(write)
        return transaction(write=write)

    monkeypatch.setattr(db, "transaction", counted)
    cid = group["id"]
    plain = await send(alice, cid, "plain", client_msg_id="p-1")
    assert opened == []
    mention = await send(alice, cid, f"hi @{bob.username}")
    assert opened == [True]
    reply = await send(alice, cid, "a reply", reply_to_id=plain["id"])
    assert opened == [True, True]
    monkeypatch.undo()
    assert [mention["seq"], reply["seq"]] == [plain["seq"] + 1, plain["seq"] + 2]
    for message in (plain, mention, reply):
        assert await as_read_by(alice, message) == message


async def test_a_send_cancelled_while_it_waits_leaves_the_pool_sound(
    app: FastAPI, alice: User, bob: User, group: Conversation
) -> None:
    """The statement runs on a driver connection of the pool outside SQLAlchemy's own
    handling: one cancelled half-way must still be fit for the next send."""
    cid = group["id"]
    async with app.state.db.transaction() as session:
        principal = await principal_of(session, app, alice)
        await messages.send_in_transaction(
            session, principal, uuid.UUID(cid), MessageCreate(content="first")
        )
        pending = asyncio.create_task(send(bob, cid, "cancelled"))
        await _wait_for_a_lock_wait(app)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    sent = await asyncio.gather(*(send(bob, cid, f"after {i}") for i in range(8)))
    assert all(message["content"] == f"after {i}" for i, message in enumerate(sent))
    # The cancelled statement may have gone on to commit without its caller: either way
    # each message has a seq of its own and the conversation's last seq is the newest.
    resp = await alice.get(f"/conversations/{cid}/messages")
    seqs = [m["seq"] for m in resp.json()["messages"]]
    assert len(seqs) in (9, 10)
    assert seqs == sorted(set(seqs))
    assert seqs[-1] == await last_seq(alice, cid)
