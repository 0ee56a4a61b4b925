"""Real-time features beyond the basics (§3, §6, §8, §9) against a real uvicorn: typing,
read events, presence, the connection cap, slow consumers, revocation, the
one-conversation WebSocket, resume gaps, ops and message status."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import uuid
from datetime import timedelta
from typing import Any

import orjson
import pytest
import websockets
import websockets.asyncio.client
from fastapi import FastAPI

from parley.db.base import Base, utcnow
from parley.messages.schemas import MessageCreate
from parley.messages.service import send_in_transaction
from parley.realtime import gateway, presence
from parley.realtime import hub as hub_module
from parley.realtime.connection import Connection
from parley.realtime.gateway import OP_BURST
from tests.conftest import (
    PASSWORD,
    WS,
    AppFactory,
    Client,
    LiveFactory,
    LiveServer,
    User,
    assert_problem,
    principal_of,
    send,
)
from tests.test_auth import set_session_expiry

# -- helpers ----------------------------------------------------------------------------


async def connect_token(live: LiveServer, token: str, path: str = "/ws", **kwargs: Any) -> WS:
    ws = await websockets.asyncio.client.connect(
        live.ws_url(path, token=token), open_timeout=5, **kwargs
    )
    return WS(ws)


async def open_ws(live: LiveServer, user: User, path: str = "/ws") -> WS:
    ws = await live.connect(user, path)
    await ws.ready()
    return ws


def scoped(conversation: dict[str, Any]) -> str:
    return f"/ws/conversations/{conversation['id']}"


async def login(app: FastAPI, user: User, password: str = PASSWORD) -> dict[str, Any]:
    """A second session for the user: a new token pair."""
    resp = await Client(app).post(
        "/auth/login", json={"username": user.username, "password": password}
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def create_messages(
    app: FastAPI,
    sender: User,
    conversation_id: str,
    count: int,
    prefix: str = "bulk",
    content: str | None = None,
) -> list[int]:
    """`count` messages in one transaction, through the same service the API uses; their
    seqs."""
    async with app.state.db.transaction() as session:
        principal = await principal_of(session, app, sender)
        seqs = []
        for i in range(count):
            view, _ = await send_in_transaction(
                session,
                principal,
                uuid.UUID(conversation_id),
                MessageCreate(content=content or f"{prefix} {i}"),
            )
            seqs.append(view.seq)
    return seqs


async def last_seq(user: Client, conversation_id: str) -> int:
    resp = await user.get(f"/conversations/{conversation_id}")
    assert resp.status_code == 200, resp.text
    seq: int = resp.json()["last_seq"]
    return seq


async def eventually(check: Any, timeout: float = 5.0) -> None:
    """Poll an async predicate until it holds (for state a disconnect updates later)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def news(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events other than presence, which any connect or disconnect may interleave."""
    return [e for e in events if e["type"] != "presence"]


async def presence_of(user: Client, *ids: str) -> dict[str, str]:
    resp = await user.get("/presence", params={"user_ids": ",".join(ids)})
    assert resp.status_code == 200, resp.text
    answer: dict[str, str] = resp.json()["presence"]
    return answer


# -- typing -------------------------------------------------------------------------------


async def test_typing_reaches_other_members_only(
    live: LiveServer, alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    a1, a2 = await open_ws(live, alice), await open_ws(live, alice)
    b = await open_ws(live, bob)
    c = await open_ws(live, carol)
    await a1.send(op="typing", conversation_id=group["id"], is_typing=True)
    event, before = await b.until("typing")
    assert news(before) == []
    assert event == {
        "type": "typing",
        "conversation_id": group["id"],
        "user_id": alice.id,
        "is_typing": True,
    }
    # Not to the typist's own connections, and not to outsiders.
    assert news(await a1.quiet()) == []
    assert news(await a2.quiet(0.05)) == []
    assert news(await c.quiet(0.05)) == []
    listed = await bob.get(f"/conversations/{group['id']}/typing")
    assert listed.status_code == 200
    assert listed.json() == {"typing": [alice.id]}

    # The REST endpoint does the same.
    resp = await bob.post(f"/conversations/{group['id']}/typing", json={"is_typing": True})
    assert resp.status_code == 204
    for ws in (a1, a2):
        event, _ = await ws.until("typing")
        assert event["user_id"] == bob.id and event["is_typing"] is True
    typists = (await alice.get(f"/conversations/{group['id']}/typing")).json()["typing"]
    assert sorted(typists) == sorted([alice.id, bob.id])
    resp = await bob.post(f"/conversations/{group['id']}/typing", json={"is_typing": False})
    assert resp.status_code == 204
    event, _ = await a1.until("typing")
    assert event["user_id"] == bob.id and event["is_typing"] is False
    assert (await alice.get(f"/conversations/{group['id']}/typing")).json() == {
        "typing": [alice.id]
    }
    assert news(await b.quiet()) == []
    assert news(await c.quiet(0.05)) == []


class Clock:
    """Stands in for the `time` module in parley.realtime.presence."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        import time

        return time.monotonic() + self.offset

    def time(self) -> float:
        import time

        return time.time() + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(presence, "time", fake)
    return fake


async def test_memory_typing_expires_after_six_seconds(clock: Clock) -> None:
    store = presence.MemoryTyping()
    conversation, user, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await store.set(conversation, user, True)
    await store.set(conversation, other, True)
    clock.offset = 3
    await store.set(conversation, other, True)  # re-sent: the 6 s start again
    clock.offset = 5.9
    assert await store.who(conversation) == sorted([user, other], key=str)
    clock.offset = 6
    assert await store.who(conversation) == [other]
    clock.offset = 9
    assert await store.who(conversation) == []
    assert await store.who(uuid.uuid4()) == []
    # Nothing is kept for conversations where everyone stopped or expired.
    await store.set(conversation, user, True)
    clock.offset = 20
    await store.set(uuid.uuid4(), other, False)
    assert store._until == {}


async def test_typing_expires_through_the_api(
    app: FastAPI, alice: User, bob: User, group: dict[str, Any], clock: Clock
) -> None:
    # The app's own store: in memory on SQLite, in Redis with PostgreSQL.
    resp = await alice.post(f"/conversations/{group['id']}/typing", json={"is_typing": True})
    assert resp.status_code == 204
    clock.offset = 5.5
    assert (await bob.get(f"/conversations/{group['id']}/typing")).json() == {"typing": [alice.id]}
    clock.offset = 6.01
    assert (await bob.get(f"/conversations/{group['id']}/typing")).json() == {"typing": []}


async def test_typing_endpoints_refuse_anonymous_outsiders_and_bad_bodies(
    anon: Client, carol: User, bob: User, group: dict[str, Any], room: dict[str, Any]
) -> None:
    path = f"/conversations/{group['id']}/typing"
    assert_problem(await anon.post(path, json={"is_typing": True}), 401)
    assert_problem(await anon.get(path), 401)
    assert_problem(await carol.post(path, json={"is_typing": True}), 404, "not_found")
    assert_problem(await carol.get(path), 404, "not_found")
    # A public room is no different: only members type.
    room_path = f"/conversations/{room['id']}/typing"
    assert_problem(await carol.post(room_path, json={"is_typing": True}), 404, "not_found")
    missing = f"/conversations/{uuid.uuid4()}/typing"
    assert_problem(await bob.post(missing, json={"is_typing": True}), 404, "not_found")
    for body in ({}, {"is_typing": "maybe"}, {"is_typing": True, "user_id": carol.id}):
        assert_problem(await bob.post(path, json=body), 422, "validation_error")
    assert_problem(await bob.post(path, content=b"not json"), 422)
    assert_problem(
        await bob.post("/conversations/not-a-uuid/typing", json={"is_typing": True}), 422
    )


async def test_typing_op_errors(
    live: LiveServer, bob: User, carol: User, group: dict[str, Any]
) -> None:
    c = await open_ws(live, carol)
    await c.send(op="typing", ref="t", conversation_id=group["id"], is_typing=True)
    error = await c.recv()
    assert error["type"] == "error" and error["code"] == "not_found" and error["ref"] == "t"
    b = await open_ws(live, bob)
    await b.send(op="typing", ref="u", is_typing=True)
    error, _ = await b.until("error")
    assert error["code"] == "bad_request" and error["ref"] == "u"


# -- read events --------------------------------------------------------------------------


async def test_read_goes_to_every_member_of_a_group(
    live: LiveServer, alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    a, b, c = [await open_ws(live, u) for u in (alice, bob, carol)]
    first = await send(alice, group["id"], "one")
    second = await send(alice, group["id"], "two")
    await b.until("message.created")
    await b.until("message.created")
    await a.until("message.created")
    await a.until("message.created")

    resp = await bob.post(f"/conversations/{group['id']}/read", json={"seq": first["seq"]})
    assert resp.status_code == 204
    expected = {
        "type": "read",
        "conversation_id": group["id"],
        "user_id": bob.id,
        "seq": first["seq"],
    }
    for ws in (a, b):
        event, before = await ws.until("read")
        assert news(before) == [] and event == expected

    await b.send(op="read", conversation_id=group["id"], seq=second["seq"])
    for ws in (a, b):
        event, _ = await ws.until("read")
        assert event == {**expected, "seq": second["seq"]}
    # Reading again, or backwards, moves nothing and says nothing.
    await b.send(op="read", conversation_id=group["id"], seq=first["seq"])
    assert news(await a.quiet()) == []
    assert news(await c.quiet(0.05)) == []


async def test_read_in_a_room_goes_to_the_readers_own_connections_only(
    live: LiveServer, alice: User, bob: User, room: dict[str, Any]
) -> None:
    a = await open_ws(live, alice)
    b1, b2 = await open_ws(live, bob), await open_ws(live, bob)
    sent = await send(alice, room["id"], "hello room")
    for ws in (a, b1, b2):
        await ws.until("message.created")
    await b1.send(op="read", conversation_id=room["id"], seq=sent["seq"])
    expected = {"type": "read", "conversation_id": room["id"], "user_id": bob.id}
    event, _ = await b2.until("read")
    assert event == {**expected, "seq": sent["seq"]}
    await b1.until("read")
    more = await send(alice, room["id"], "again")
    for ws in (a, b1, b2):
        await ws.until("message.created")
    resp = await bob.post(f"/conversations/{room['id']}/read", json={"seq": more["seq"]})
    assert resp.status_code == 204
    for ws in (b1, b2):
        event, _ = await ws.until("read")
        assert event == {**expected, "seq": more["seq"]}
    assert news(await a.quiet()) == []


# -- presence -----------------------------------------------------------------------------


async def test_presence_answers_for_people_who_share_a_conversation(
    live: LiveServer,
    anon: Client,
    alice: User,
    bob: User,
    carol: User,
    group: dict[str, Any],
) -> None:
    stranger = str(uuid.uuid4())
    assert await presence_of(alice, bob.id, carol.id, stranger) == {bob.id: "offline"}
    b = await open_ws(live, bob)
    assert await presence_of(alice, bob.id, carol.id, alice.id) == {
        bob.id: "online",
        alice.id: "offline",
    }
    # Carol shares nothing with bob: she learns nothing about him.
    assert await presence_of(carol, bob.id) == {}
    await b.close()

    async def offline() -> bool:
        return await presence_of(alice, bob.id) == {bob.id: "offline"}

    await eventually(offline)
    assert_problem(await anon.get("/presence", params={"user_ids": bob.id}), 401)
    for bad in ("nope", f"{bob.id},nope", "", ",", ",".join(str(uuid.uuid4()) for _ in range(101))):
        assert_problem(await alice.get("/presence", params={"user_ids": bad}), 422)
    assert_problem(await alice.get("/presence"), 422)


async def test_presence_ignores_deleted_conversations(
    alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    resp = await alice.post(
        "/conversations", json={"kind": "group", "name": "gone", "member_ids": [carol.id]}
    )
    assert resp.status_code == 201
    assert await presence_of(carol, alice.id) == {alice.id: "offline"}
    assert (await alice.delete(f"/conversations/{resp.json()['id']}")).status_code == 204
    assert await presence_of(carol, alice.id) == {}


async def test_presence_counts_stay_exact_under_concurrency(app: FastAPI) -> None:
    """Many connections of one user opening and closing at once (tabs, a reconnect
    storm): exactly one of them is the first and one the last, and nothing is left."""
    store = app.state.realtime.presence
    user = uuid.uuid4()
    added = await asyncio.gather(*(store.add(user) for _ in range(20)))
    assert sorted(added) == list(range(1, 21))
    assert await store.count(user) == 20
    removed = await asyncio.gather(*(store.remove(user) for _ in range(20)))
    assert sorted(removed) == list(range(20))
    assert await store.count(user) == 0
    assert await store.online([user]) == {user: False}


async def test_presence_events_reach_group_members(
    live: LiveServer, alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    a = await open_ws(live, alice)
    # Her own first connection is announced to her conversations, her socket included.
    event, _ = await a.until("presence")
    assert event == {"type": "presence", "user_id": alice.id, "status": "online"}
    c = await open_ws(live, carol)
    b = await open_ws(live, bob)
    event, before = await a.until("presence")
    assert before == []
    assert event == {"type": "presence", "user_id": bob.id, "status": "online"}
    # A second connection is no news, and neither is closing it.
    b2 = await open_ws(live, bob)
    await b2.close()
    await b.close()
    event, before = await a.until("presence")
    assert before == []
    assert event == {"type": "presence", "user_id": bob.id, "status": "offline"}
    assert await a.quiet() == []
    # Carol shares no group with them.
    assert await c.quiet(0.05) == []


# -- connection cap -----------------------------------------------------------------------


async def test_too_many_connections_close_with_1008(
    app_factory: AppFactory, live_factory: LiveFactory, alice: User
) -> None:
    live = await live_factory(await app_factory(max_connections_per_user=2))
    first = await open_ws(live, alice)
    await open_ws(live, alice)
    third = await live.connect(alice)
    assert await third.closed_with() == 1008
    await first.close()
    realtime = live.app.state.realtime

    async def freed() -> bool:
        return bool(await realtime.presence.count(uuid.UUID(alice.id)) == 1)

    await eventually(freed)
    await open_ws(live, alice)


# -- slow consumers -----------------------------------------------------------------------


def small_socket(live: LiveServer) -> socket.socket:
    """A client socket with a small receive buffer, so that a reader that stops reading
    backs up the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    sock.setblocking(False)
    return sock


def server_connection(app: FastAPI, user: User) -> list[Connection]:
    hub = app.state.realtime.hub
    return [c for c in hub.connections.values() if c.user_id == uuid.UUID(user.id)]


async def test_a_slow_consumer_is_cut_off_without_delaying_others(
    app_factory: AppFactory,
    live_factory: LiveFactory,
    alice: User,
    bob: User,
    room: dict[str, Any],
) -> None:
    # Big messages (60 kB) fill the few MB the kernel buffers for a socket that is not
    # read, before the server's writer has to wait at all, in a few dozen sends.
    app = await app_factory(ws_send_queue=16, max_message_chars=60_000)
    live = await live_factory(app)
    start = await last_seq(alice, room["id"])
    fast = await open_ws(live, alice)
    # max_queue=1: the client library stops reading the socket once one frame waits.
    slow = await connect_token(live, bob.access_token, max_queue=1, sock=small_socket(live))
    await slow.ready()
    (slow_conn,) = server_connection(app, bob)

    sent: list[int] = []
    received: list[int] = []
    done_sending = asyncio.Event()

    async def read_fast() -> None:
        while not (done_sending.is_set() and len(received) == len(sent)):
            event = await fast.recv(10)
            if event["type"] == "message.created":
                received.append(event["seq"])

    reader = asyncio.create_task(read_fast())
    async with asyncio.timeout(60):
        # Small batches: each commit's events reach the hub together, and the reader's
        # queue holds only 16.
        batches = 0
        while not slow_conn.closed and batches < 100:
            sent += await create_messages(app, alice, room["id"], 4, content="x" * 60_000)
            batches += 1
        assert slow_conn.close_code == 4008
        # A little more traffic after the cut.
        sent += await create_messages(app, alice, room["id"], 5)
        done_sending.set()
        await asyncio.wait_for(reader, 15)
    # The reader got everything, in order, with no holes.
    assert sent == list(range(start + 1, start + 1 + len(sent)))
    assert received == sent

    # The slow client, reading at last, finds a prefix of the stream and then 4008.
    got: list[int] = []
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        async with asyncio.timeout(20):
            while True:
                event = await slow.recv(20)
                if event["type"] == "message.created":
                    got.append(event["seq"])
    assert slow.ws.close_code == 4008
    await slow.close()
    assert got == sent[: len(got)]
    # It reconnects and resumes without loss.
    again = await open_ws(live, bob)
    await again.send(op="resume", ref="r", cursors={room["id"]: got[-1] if got else start})
    resumed, replayed = await again.until("resumed", timeout=10)
    seqs = [e["seq"] for e in replayed if e["type"] == "message.created"]
    assert got + seqs == sent
    assert resumed["cursors"] == {room["id"]: sent[-1]}


async def test_a_client_that_stops_reading_is_let_go_even_without_overflow(
    app_factory: AppFactory,
    live_factory: LiveFactory,
    alice: User,
    bob: User,
    room: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hub's sweep closes a writer blocked longer than WRITE_STALL.
    monkeypatch.setattr(hub_module, "WRITE_STALL", 0.5)
    monkeypatch.setattr(hub_module, "SWEEP_INTERVAL", 0.2)
    monkeypatch.setattr(gateway, "CLOSE_TIMEOUT", 0.5)
    app = await app_factory(max_message_chars=60_000)
    live = await live_factory(app)
    slow = await connect_token(live, bob.access_token, max_queue=1, sock=small_socket(live))
    await slow.ready()
    (slow_conn,) = server_connection(app, bob)
    # Enough to block the writer, far from filling a 512-frame queue.
    created = 0
    async with asyncio.timeout(30):
        while not slow_conn.closed:
            created += len(await create_messages(app, alice, room["id"], 4, content="y" * 60_000))
    assert created < app.state.settings.ws_send_queue
    assert slow_conn.close_code == 4008
    realtime = app.state.realtime

    async def let_go() -> bool:
        return not server_connection(app, bob) and await presence_of(alice, bob.id) == {
            bob.id: "offline"
        }

    await eventually(let_go)
    assert realtime.connection_count == 0
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await slow.recv(10)
    assert slow.ws.close_code in (4008, 1006)


# -- revocation ---------------------------------------------------------------------------


async def test_logout_closes_that_sessions_sockets_with_4001(
    app: FastAPI, live: LiveServer, alice: User
) -> None:
    other = await login(app, alice)
    mine = await open_ws(live, alice)
    theirs = await connect_token(live, other["access_token"])
    await theirs.ready()
    resp = await Client(app, other["access_token"]).post(
        "/auth/logout", json={"refresh_token": other["refresh_token"]}
    )
    assert resp.status_code == 204
    async with asyncio.timeout(5):
        assert await theirs.closed_with(5) == 4001
    await mine.send(op="ping", ref="still")
    assert await mine.recv() == {"type": "pong", "ref": "still"}


async def test_password_change_closes_the_other_sessions_sockets(
    app: FastAPI, live: LiveServer, alice: User
) -> None:
    other = await login(app, alice)
    mine = await open_ws(live, alice)
    theirs = await connect_token(live, other["access_token"])
    await theirs.ready()
    resp = await alice.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": "a brand new secret"},
    )
    assert resp.status_code == 204
    async with asyncio.timeout(5):
        assert await theirs.closed_with(5) == 4001
    await mine.send(op="ping", ref="still")
    assert await mine.recv() == {"type": "pong", "ref": "still"}


async def test_ops_on_a_socket_whose_session_ended_are_refused(
    app: FastAPI, live: LiveServer, alice: User, group: dict[str, Any]
) -> None:
    """Between the session's end and the sweep that closes its sockets, an op that needs
    the caller is refused, not run on the strength of the handshake."""
    sent = await send(alice, group["id"], "mine")
    ws = await open_ws(live, alice)
    # Ended behind the hub's back (expired): no revocation event closes the socket at once.
    await set_session_expiry(app, alice, utcnow() - timedelta(seconds=1))
    cid = group["id"]
    ops: list[dict[str, Any]] = [
        {"op": "typing", "conversation_id": cid, "is_typing": True},
        {"op": "read", "conversation_id": cid, "seq": sent["seq"]},
        {"op": "edit", "message_id": sent["id"], "content": "changed"},
        {"op": "delete", "message_id": sent["id"]},
        {"op": "history", "conversation_id": cid},
        {"op": "send", "conversation_id": cid, "content": "after"},
    ]
    for n, op in enumerate(ops):
        await ws.send(**op, ref=n)
        error, _ = await ws.until("error")
        assert (error["code"], error["ref"]) == ("unauthorized", n), op
    resp = await Client(app, (await login(app, alice))["access_token"]).get(
        f"/conversations/{cid}/messages"
    )
    assert [(m["content"], m["deleted"]) for m in resp.json()["messages"]] == [("mine", False)]


async def test_an_idle_socket_keeps_no_orm_object_alive(
    live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    """Memory per idle socket (§11): what the handshake loaded from the database (the
    caller's user and session) is let go of once the socket is open."""
    await send(bob, group["id"], "unread")
    sockets = [await open_ws(live, alice), await open_ws(live, bob)]
    scoped_ws = await live.connect(alice, scoped(group))
    await scoped_ws.ready()
    assert (await scoped_ws.recv())["type"] == "backlog"
    gc.collect()
    alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, Base)]
    assert alive == []
    for ws in [*sockets, scoped_ws]:
        await ws.send(op="ping", ref="still")
        pong, _ = await ws.until("pong")
        assert pong["ref"] == "still"


# -- the one-conversation WebSocket --------------------------------------------------------


async def test_conversation_socket_opens_with_the_unread_backlog(
    live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    read = await send(alice, group["id"], "already read")
    await bob.post(f"/conversations/{group['id']}/read", json={"seq": read["seq"]})
    unread = [await send(alice, group["id"], f"unread {i}") for i in range(3)]
    ws = await live.connect(bob, scoped(group))
    await ws.ready()
    backlog = await ws.recv()
    assert backlog["type"] == "backlog"
    assert backlog["conversation_id"] == group["id"]
    assert [m["id"] for m in backlog["messages"]] == [m["id"] for m in unread]
    # Then live, without doubles.
    await send(alice, group["id"], "live")
    event, before = await ws.until("message.created")
    assert news(before) == [] and event["message"]["content"] == "live"


async def test_conversation_socket_backlog_is_capped_with_a_gap(
    app: FastAPI, live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    marker = (await bob.get(f"/conversations/{group['id']}")).json()["last_read_seq"]
    await create_messages(app, alice, group["id"], 105)
    ws = await live.connect(bob, scoped(group))
    await ws.ready()
    gap = await ws.recv()
    backlog = await ws.recv()
    assert backlog["type"] == "backlog"
    messages = backlog["messages"]
    assert len(messages) == 100
    assert [m["content"] for m in messages] == [f"bulk {i}" for i in range(5, 105)]
    assert gap == {
        "type": "gap",
        "conversation_id": group["id"],
        "from_seq": marker + 1,
        "to_seq": messages[0]["seq"] - 1,
    }


async def test_conversation_socket_sends_plain_text_and_scoped_ops(
    live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    a = await open_ws(live, alice)
    ws = await live.connect(bob, scoped(group))
    await ws.ready()
    assert (await ws.recv())["type"] == "backlog"
    await ws.ws.send("just words")
    ack, _ = await ws.until("ack")
    assert ack["message"]["content"] == "just words"
    assert ack["message"]["conversation_id"] == group["id"]
    await ws.send(op="send", ref="s", content="an op without conversation_id")
    ack2, _ = await ws.until("ack")
    assert ack2["ref"] == "s" and ack2["message"]["conversation_id"] == group["id"]
    contents = []
    for _ in range(2):
        event, _ = await a.until("message.created")
        contents.append(event["message"]["content"])
    assert contents == ["just words", "an op without conversation_id"]
    # Other conversations are out of reach on this socket.
    other = await alice.post(
        "/conversations", json={"kind": "group", "name": "other", "member_ids": [bob.id]}
    )
    await ws.send(op="send", ref="o", conversation_id=other.json()["id"], content="elsewhere")
    error, _ = await ws.until("error")
    assert error["ref"] == "o" and error["code"] == "bad_request"
    await ws.send(op="history", ref="h", limit=1)
    history, _ = await ws.until("history")
    assert history["conversation_id"] == group["id"]
    assert [m["content"] for m in history["messages"]] == ["an op without conversation_id"]


async def test_conversation_socket_refuses_non_members_with_4003(
    live: LiveServer, carol: User, group: dict[str, Any], room: dict[str, Any]
) -> None:
    for conversation in (group, room, {"id": str(uuid.uuid4())}):
        ws = await live.connect(carol, scoped(conversation))
        assert await ws.closed_with() == 4003
    assert live.app.state.realtime.connection_count == 0


async def test_conversation_socket_hears_nothing_of_other_conversations(
    live: LiveServer,
    alice: User,
    bob: User,
    group: dict[str, Any],
    room: dict[str, Any],
) -> None:
    ws = await live.connect(bob, scoped(group))
    await ws.ready()
    assert (await ws.recv())["type"] == "backlog"
    everything = await open_ws(live, bob)
    # A message, typing and read markers elsewhere (a room's read event goes to the
    # reader's own connections: not this one, which is about another conversation).
    sent = await send(alice, room["id"], "in the room")
    await alice.post(f"/conversations/{room['id']}/typing", json={"is_typing": True})
    await bob.post(f"/conversations/{room['id']}/read", json={"seq": sent["seq"]})
    direct = (await alice.post("/conversations/direct", json={"user_id": bob.id})).json()
    await send(alice, direct["id"], "direct")
    for type_ in ("message.created", "typing", "read", "member.joined", "message.created"):
        await everything.until(type_)
    # The group's own traffic does arrive.
    await send(alice, group["id"], "in the group")
    event, before = await ws.until("message.created")
    assert event["conversation_id"] == group["id"]
    assert news(before) == []
    assert news(await ws.quiet()) == []


async def test_kick_closes_the_conversation_socket_after_member_left(
    live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    ws = await live.connect(bob, scoped(group))
    await ws.ready()
    assert (await ws.recv())["type"] == "backlog"
    resp = await alice.delete(f"/conversations/{group['id']}/members/{bob.id}")
    assert resp.status_code == 204
    left, _ = await ws.until("member.left")
    assert left["user_id"] == bob.id and left["reason"] == "removed"
    assert await ws.closed_with() == 4003


# -- resume -------------------------------------------------------------------------------


async def test_resume_over_1000_missed_events_sends_a_gap_then_the_newest_1000(
    app: FastAPI, live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    cursor = await last_seq(bob, group["id"])
    await create_messages(app, alice, group["id"], 1010)
    newest = await last_seq(bob, group["id"])
    assert newest == cursor + 1010
    b = await open_ws(live, bob)
    await b.send(op="resume", ref="big", cursors={group["id"]: cursor})
    gap, before = await b.until("gap")
    assert news(before) == []
    assert gap == {
        "type": "gap",
        "conversation_id": group["id"],
        "from_seq": cursor + 1,
        "to_seq": newest - 1000,
    }
    resumed, events = await b.until("resumed", timeout=20)
    assert [e["seq"] for e in events] == list(range(newest - 999, newest + 1))
    assert {e["type"] for e in events} == {"message.created"}
    assert resumed == {"type": "resumed", "ref": "big", "cursors": {group["id"]: newest}}
    await send(alice, group["id"], "live again")
    event, extra = await b.until("message.created")
    assert news(extra) == [] and event["seq"] == newest + 1


# -- ops ----------------------------------------------------------------------------------


async def test_history_op(
    live: LiveServer, alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    sent = [await send(alice, group["id"], f"m{i}") for i in range(3)]
    b = await open_ws(live, bob)
    await b.send(op="history", ref="h1", conversation_id=group["id"], limit=2)
    page, _ = await b.until("history")
    assert page["type"] == "history" and page["ref"] == "h1"
    assert page["conversation_id"] == group["id"]
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in sent[1:]]
    assert page["has_more"] is True
    await b.send(
        op="history", ref="h2", conversation_id=group["id"], before=sent[1]["seq"], limit=2
    )
    page, _ = await b.until("history")
    assert [m["id"] for m in page["messages"]] == [sent[0]["id"]]
    assert page["has_more"] is False
    c = await open_ws(live, carol)
    await c.send(op="history", ref="h3", conversation_id=group["id"])
    error = await c.recv()
    assert error["type"] == "error" and error["code"] == "not_found" and error["ref"] == "h3"


async def test_edit_and_delete_ops_ack_and_fan_out(
    live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    a = await open_ws(live, alice)
    b = await open_ws(live, bob)
    await a.send(op="send", ref="s", conversation_id=group["id"], content="first draft")
    ack, _ = await a.until("ack")
    message_id = ack["message"]["id"]
    await b.until("message.created")
    await a.send(op="edit", ref="e", message_id=message_id, content="second draft")
    ack, _ = await a.until("ack")
    assert ack["ref"] == "e" and ack["message"]["content"] == "second draft"
    assert ack["message"]["edited_at"] is not None
    updated, _ = await b.until("message.updated")
    assert updated["message"]["content"] == "second draft"
    assert updated["seq"] == ack["message"]["updated_seq"]
    # Only the author edits.
    await b.send(op="edit", ref="x", message_id=message_id, content="hijack")
    error, _ = await b.until("error")
    assert error["ref"] == "x" and error["code"] in ("forbidden", "not_found")
    await a.send(op="delete", ref="d", message_id=message_id)
    ack, _ = await a.until("ack")
    assert ack["ref"] == "d" and ack["message"]["deleted"] is True
    deleted, _ = await b.until("message.deleted")
    assert deleted["message"]["id"] == message_id
    assert deleted["message"]["deleted"] is True
    assert "draft" not in str(deleted)


@pytest.fixture
async def limited(app: FastAPI, app_factory: AppFactory, live_factory: LiveFactory) -> LiveServer:
    """A server with rate limits on (the suite's default app has them off)."""
    return await live_factory(await app_factory(rate_limits="on"))


async def test_a_flood_of_ops_is_refused_then_closed_with_1008(
    limited: LiveServer, alice: User
) -> None:
    ws = await open_ws(limited, alice)
    burst = int(OP_BURST) + 10
    for i in range(burst):
        await ws.send(op="ping", ref=i)
    replies = [await ws.recv() for _ in range(burst)]
    pongs = [r for r in replies if r["type"] == "pong"]
    errors = [r for r in replies if r["type"] == "error"]
    assert len(pongs) >= OP_BURST and errors
    assert len(pongs) + len(errors) == burst
    assert {e["code"] for e in errors} == {"rate_limited"}
    assert all(e["retry_after"] > 0 for e in errors)
    assert {e["ref"] for e in errors} <= set(range(burst))
    # Keeping on at several times the allowed rate (not in one burst) gets it closed.
    assert await flooded(ws, orjson.dumps({"op": "ping"}).decode()) == 1008


async def test_binary_frames_count_against_the_op_limit(limited: LiveServer, alice: User) -> None:
    ws = await open_ws(limited, alice)
    assert await flooded(ws, b"\x00\x01") == 1008


async def test_ops_are_not_limited_when_rate_limits_are_off(live: LiveServer, alice: User) -> None:
    ws = await open_ws(live, alice)
    burst = int(OP_BURST) * 2
    for i in range(burst):
        await ws.send(op="ping", ref=i)
    replies = [await ws.recv() for _ in range(burst)]
    assert [r["type"] for r in replies] == ["pong"] * burst


async def flooded(ws: WS, frame: str | bytes, rate: float = 200) -> int | None:
    """Send `frame` at `rate` per second while reading, until the server closes."""

    async def flood() -> None:
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                await ws.ws.send(frame)
                await asyncio.sleep(1 / rate)

    flooder = asyncio.create_task(flood())
    try:
        return await ws.closed_with(5)
    finally:
        flooder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooder


async def test_a_binary_first_frame_is_refused_with_4001(live: LiveServer) -> None:
    ws = WS(await websockets.asyncio.client.connect(live.ws_url(), open_timeout=5))
    await ws.ws.send(b'{"op":"auth"}')
    assert await ws.closed_with() == 4001


# -- message status -----------------------------------------------------------------------


async def test_status_goes_sent_delivered_read(
    app: FastAPI, live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    sent = await send(alice, group["id"], "are you there?")
    assert sent["status"] == "sent"
    b = await open_ws(live, bob)
    await app.state.realtime.hub.sweep()
    # Connecting alone delivers nothing: the message came before the socket.
    assert (await alice.get(f"/messages/{sent['id']}")).json()["status"] == "sent"
    live_one = await send(alice, group["id"], "now?")
    event, _ = await b.until("message.created")
    assert event["message"]["id"] == live_one["id"]
    await app.state.realtime.hub.sweep()
    assert (await alice.get(f"/messages/{live_one['id']}")).json()["status"] == "delivered"
    receipts = (await alice.get(f"/messages/{live_one['id']}/receipts")).json()["receipts"]
    assert receipts == [{"user_id": bob.id, "delivered": True, "read": False, "read_at": None}]
    resp = await bob.post(f"/conversations/{group['id']}/read", json={"seq": live_one["seq"]})
    assert resp.status_code == 204
    assert (await alice.get(f"/messages/{live_one['id']}")).json()["status"] == "read"
    (receipt,) = (await alice.get(f"/messages/{live_one['id']}/receipts")).json()["receipts"]
    assert receipt["delivered"] is True and receipt["read"] is True
    assert receipt["read_at"] is not None
    # Reading the later message covers the earlier one too.
    assert (await alice.get(f"/messages/{sent['id']}")).json()["status"] == "read"


async def test_backlog_on_the_conversation_socket_counts_as_delivered(
    app: FastAPI, live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    sent = await send(alice, group["id"], "waiting for you")
    ws = await live.connect(bob, scoped(group))
    await ws.ready()
    backlog = await ws.recv()
    assert [m["id"] for m in backlog["messages"]] == [sent["id"]]
    await app.state.realtime.hub.sweep()
    assert (await alice.get(f"/messages/{sent['id']}")).json()["status"] == "delivered"
