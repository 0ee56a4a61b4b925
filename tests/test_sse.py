"""Server-Sent Events (§8) against a real uvicorn: the handshake's refusals, the stream
format, isolation, Last-Event-ID resume on both streams, and the end of a stream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest

from parley.db.base import Base
from parley.realtime.connection import Connection
from parley.realtime.sse import MAX_DELTA, EventStream, InvalidLastEventId, Positions
from tests.conftest import AppFactory, LiveFactory, LiveServer, User, assert_problem, send

# Presence comes and goes with every connection of a group member (one's own included);
# no test here is about it.
IGNORED = frozenset({"presence"})


# -- a small SSE client -------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: str
    data: dict[str, Any]
    id: str | None

    @property
    def key(self) -> tuple[str, int]:
        return self.data["conversation_id"], self.data["seq"]


class Stream:
    """One open event stream, parsed line by line as a browser's EventSource would."""

    def __init__(self, client: httpx.AsyncClient, response: httpx.Response) -> None:
        self.client = client
        self.response = response
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.comments = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, str] = {}
        data: list[str] = []
        try:
            async for line in self.response.aiter_lines():
                if not line:
                    if data:
                        event = Event(
                            fields.get("event", "message"),
                            orjson.loads("\n".join(data)),
                            fields.get("id"),
                        )
                        await self.events.put(event)
                    fields, data = {}, []
                elif line.startswith(":"):
                    self.comments += 1
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "data":
                        data.append(value)
                    else:
                        fields[name] = value
        except httpx.HTTPError:
            pass
        finally:
            self.events.put_nowait(None)  # the end of the stream

    async def recv(self, timeout: float = 5.0) -> Event | None:
        """The next event (None once the stream has ended)."""
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event is None:
                self.events.put_nowait(None)
                return None
            if event.type not in IGNORED:
                return event

    async def next(self, timeout: float = 5.0) -> Event:
        event = await self.recv(timeout)
        assert event is not None, "the stream ended"
        return event

    async def ready(self) -> Event:
        event = await self.next()
        assert event.type == "ready", event
        return event

    async def until(self, type_: str, timeout: float = 5.0) -> tuple[Event, list[Event]]:
        """Read until an event of this type; it and everything read before it."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(deadline - time.monotonic(), 0.01))
            if event.type == type_:
                return event, seen
            seen.append(event)

    async def take(self, count: int) -> list[Event]:
        return [await self.next() for _ in range(count)]

    async def quiet(self, seconds: float = 0.5) -> list[Event]:
        """Whatever arrives within `seconds` (expected: nothing)."""
        got: list[Event] = []
        with contextlib.suppress(TimeoutError):
            while (event := await self.recv(seconds)) is not None:
                got.append(event)
        return got

    async def ended(self, timeout: float = 5.0) -> list[Event]:
        """Wait for the server to end the stream; the events that came before the end."""
        got: list[Event] = []
        while (event := await self.recv(timeout)) is not None:
            got.append(event)
        return got

    async def close(self) -> None:
        await self.response.aclose()
        await self.client.aclose()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class Streams:
    """Opens streams on one server, and closes whatever a test left open."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.opened: list[Stream] = []

    async def request(
        self,
        user: User | None,
        *,
        live: LiveServer | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        last_event_id: str | None = None,
    ) -> tuple[httpx.AsyncClient, httpx.Response]:
        server = live or self.live
        sent = dict(headers or {})
        if user is not None:
            sent["Authorization"] = f"Bearer {user.access_token}"
        if last_event_id is not None:
            sent["Last-Event-ID"] = last_event_id
        client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        request = client.build_request(
            "GET", f"http://{server.base}/api/v1/stream", params=params, headers=sent
        )
        return client, await client.send(request, stream=True)

    async def open(self, user: User | None, **kwargs: Any) -> Stream:
        client, response = await self.request(user, **kwargs)
        if response.status_code != 200:
            await response.aread()
            await client.aclose()
            raise AssertionError(f"{response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(client, response)
        self.opened.append(stream)
        return stream

    async def refused(
        self, user: User | None, status: int, code: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        client, response = await self.request(user, **kwargs)
        try:
            await response.aread()
        finally:
            await client.aclose()
        return assert_problem(response, status, code)

    async def close_all(self) -> None:
        for stream in self.opened:
            with contextlib.suppress(Exception):
                await stream.close()


@pytest.fixture
async def streams(live: LiveServer) -> AsyncIterator[Streams]:
    opener = Streams(live)
    yield opener
    await opener.close_all()


async def eventually(check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def keys(messages: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(m["conversation_id"], m["seq"]) for m in messages}


def assert_in_seq_order(events: list[Event]) -> None:
    """Per conversation ascending, and nothing twice."""
    by_conversation: dict[str, list[int]] = {}
    for event in events:
        by_conversation.setdefault(event.data["conversation_id"], []).append(event.data["seq"])
    for seqs in by_conversation.values():
        assert seqs == sorted(set(seqs)), seqs


# -- the stream ---------------------------------------------------------------------------


async def test_ready_first_then_a_rest_send_arrives_with_an_id(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    b = await streams.open(bob)
    ready = await b.ready()
    assert ready.data["user_id"] == bob.id
    assert ready.data["heartbeat"] == 15
    assert ready.data["connection_id"]
    sent = await send(alice, room["id"], "over http")
    event, before = await b.until("message.created")
    assert before == []
    assert event.data["conversation_id"] == room["id"]
    assert event.data["seq"] == sent["seq"]
    assert event.data["message"]["content"] == "over http"
    assert "status" not in event.data["message"]
    assert event.id is not None and event.id != ready.id


async def test_an_open_stream_keeps_no_orm_object_alive(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    """As for a WebSocket (§11): the handshake's database objects go once it is done."""
    b = await streams.open(bob)
    await b.ready()
    one = await streams.open(bob, params={"conversation_id": room["id"]})
    await one.ready()
    gc.collect()
    assert [type(o).__name__ for o in gc.get_objects() if isinstance(o, Base)] == []
    await send(alice, room["id"], "still live")
    for stream in (b, one):
        event, _ = await stream.until("message.created")
        assert event.data["message"]["content"] == "still live"


async def test_ephemeral_events_have_no_id(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    b = await streams.open(bob)
    await b.ready()
    resp = await alice.post(f"/conversations/{room['id']}/typing", json={"is_typing": True})
    assert resp.status_code == 204
    typing, _ = await b.until("typing")
    assert typing.id is None
    assert typing.data == {
        "type": "typing",
        "conversation_id": room["id"],
        "user_id": alice.id,
        "is_typing": True,
    }


async def test_an_outsider_receives_nothing(
    streams: Streams, alice: User, carol: User, room: dict[str, Any]
) -> None:
    c = await streams.open(carol)
    await c.ready()
    await send(alice, room["id"], "members only")
    assert await c.quiet() == []


async def test_kicked_member_stops_receiving_after_member_left(
    streams: Streams, alice: User, carol: User, room: dict[str, Any]
) -> None:
    c = await streams.open(carol)
    await c.ready()
    assert (await carol.post(f"/conversations/{room['id']}/join")).status_code == 200
    joined, _ = await c.until("member.joined")
    assert joined.data["user_id"] == carol.id and joined.id is not None
    await send(alice, room["id"], "welcome")
    welcome, _ = await c.until("message.created")
    assert welcome.data["message"]["content"] == "welcome"
    kicked = await alice.delete(f"/conversations/{room['id']}/members/{carol.id}")
    assert kicked.status_code == 204
    left, _ = await c.until("member.left")
    assert left.data["user_id"] == carol.id and left.data["reason"] == "removed"
    await send(alice, room["id"], "after the kick")
    assert await c.quiet() == []


async def test_one_conversation_stream_uses_seqs_as_ids(
    streams: Streams, alice: User, bob: User, room: dict[str, Any], group: dict[str, Any]
) -> None:
    b = await streams.open(bob, params={"conversation_id": room["id"]})
    ready = await b.ready()
    stood = (await bob.get(f"/conversations/{room['id']}")).json()["last_seq"]
    assert ready.id == str(stood)
    await send(alice, group["id"], "elsewhere")
    sent = await send(alice, room["id"], "here")
    event = await b.next()
    assert (event.type, event.id) == ("message.created", str(sent["seq"]))
    assert await b.quiet() == []


# -- the handshake ------------------------------------------------------------------------


async def test_anonymous_and_bad_credentials_are_401(streams: Streams, live: LiveServer) -> None:
    await streams.refused(None, 401, "unauthorized")
    await streams.refused(None, 401, params={"token": "not-a-jwt"})
    await streams.refused(None, 401, headers={"Authorization": "Bearer not-a-jwt"})
    await streams.refused(None, 401, params={"ticket": "no-such-ticket"})
    assert live.app.state.realtime.connection_count == 0


async def test_query_token_and_ticket(streams: Streams, bob: User) -> None:
    by_token = await streams.open(None, params={"token": bob.access_token})
    assert (await by_token.ready()).data["user_id"] == bob.id
    ticket = (await bob.post("/auth/ticket")).json()["ticket"]
    by_ticket = await streams.open(None, params={"ticket": ticket})
    assert (await by_ticket.ready()).data["user_id"] == bob.id
    # Single use.
    await streams.refused(None, 401, params={"ticket": ticket})


async def test_not_a_member_of_the_conversation_is_404(
    streams: Streams, carol: User, room: dict[str, Any]
) -> None:
    await streams.refused(carol, 404, "not_found", params={"conversation_id": room["id"]})
    await streams.refused(carol, 404, "not_found", params={"conversation_id": str(uuid.uuid4())})
    await streams.refused(carol, 422, params={"conversation_id": "not-a-uuid"})


async def test_origin_not_allowed_is_403(streams: Streams, live: LiveServer, bob: User) -> None:
    await streams.refused(bob, 403, "forbidden", headers={"Origin": "https://evil.example"})
    ok = await streams.open(bob, headers={"Origin": f"http://{live.base}"})
    await ok.ready()


async def test_too_many_connections_is_429_and_closing_gives_one_back(
    app_factory: AppFactory, live_factory: LiveFactory, streams: Streams, bob: User
) -> None:
    live = await live_factory(await app_factory(max_connections_per_user=1))
    first = await streams.open(bob, live=live)
    await first.ready()
    await streams.refused(bob, 429, "too_many_connections", live=live)
    await first.close()
    await eventually(lambda: live.app.state.realtime.connection_count == 0)
    again = await streams.open(bob, live=live)
    await again.ready()


async def test_closing_the_stream_gives_the_connection_back(
    streams: Streams, live: LiveServer, bob: User, room: dict[str, Any]
) -> None:
    realtime = live.app.state.realtime
    b = await streams.open(bob)
    await b.ready()
    assert realtime.connection_count == 1
    await b.close()
    await eventually(lambda: realtime.connection_count == 0)


# -- Last-Event-ID --------------------------------------------------------------------------


async def test_resume_on_stream_is_exact_across_conversations(
    streams: Streams, alice: User, bob: User, room: dict[str, Any], group: dict[str, Any]
) -> None:
    b = await streams.open(bob)
    await b.ready()
    await send(alice, room["id"], "seen in the room")
    await send(alice, group["id"], "seen in the group")
    seen = [(await b.until("message.created"))[0] for _ in range(2)]
    last_id = seen[-1].id
    assert last_id is not None
    await b.close()

    missed = []
    for i in range(3):
        missed.append(await send(alice, room["id"], f"room {i}"))
        missed.append(await send(alice, group["id"], f"group {i}"))
    b = await streams.open(bob, last_event_id=last_id)
    ready = await b.ready()
    assert ready.id == last_id  # nothing sent yet: it still stands there
    replayed = await b.take(len(missed))
    assert all(e.type == "message.created" and e.id for e in replayed)
    assert {e.key for e in replayed} == keys(missed)
    assert_in_seq_order(replayed)
    assert await b.quiet() == []  # no doubles
    # Then live, in both conversations.
    now = await send(alice, group["id"], "live")
    event = await b.next()
    assert event.key == (group["id"], now["seq"])
    last_id = event.id
    assert last_id is not None
    await b.close()

    # The newest id stands exactly at the end: nothing is replayed twice.
    b = await streams.open(bob, last_event_id=last_id)
    await b.ready()
    assert await b.quiet() == []
    # And an older id replays from its own place only.
    await b.close()
    b = await streams.open(bob, last_event_id=replayed[2].id)
    await b.ready()
    rest = await b.take(len(missed) - 3 + 1)
    expected = keys(missed) - {e.key for e in replayed[:3]} | {event.key}
    assert {e.key for e in rest} == expected
    assert await b.quiet() == []


async def test_events_racing_the_handshake_are_neither_lost_nor_doubled(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    async def flood(opened: asyncio.Event) -> list[dict[str, Any]]:
        """Sends from before the stream opens until well after it is ready."""
        sent = [await send(alice, room["id"], "flood first")]
        while not opened.is_set():
            sent.append(await send(alice, room["id"], f"flood {len(sent)}"))
        for i in range(10):
            sent.append(await send(alice, room["id"], f"flood after {i}"))
        return sent

    # A fresh stream opened mid-flood: its ready id stands just below its first event.
    opened = asyncio.Event()
    sending = asyncio.create_task(flood(opened))
    await asyncio.sleep(0.05)
    b = await streams.open(bob)
    ready = await b.ready()
    opened.set()
    sent = await sending
    seen = [e.data["seq"] for e in await b.quiet(1.0)]
    assert seen and seen == list(range(seen[0], sent[-1]["seq"] + 1))
    await b.close()
    b = await streams.open(bob, last_event_id=ready.id)
    await b.ready()
    assert [e.data["seq"] for e in await b.quiet(1.0)] == seen
    await b.close()

    # A resume opened mid-flood: replay and live traffic meet without a hole or a double.
    opened = asyncio.Event()
    sending = asyncio.create_task(flood(opened))
    await asyncio.sleep(0.05)
    b = await streams.open(bob, last_event_id=ready.id)
    await b.ready()
    opened.set()
    more = await sending
    got = [e.data["seq"] for e in await b.quiet(1.0)]
    assert got == seen + [m["seq"] for m in more]


async def test_resume_reaches_conversations_joined_after_the_checkpoint(
    streams: Streams, alice: User, carol: User, room: dict[str, Any]
) -> None:
    c = await streams.open(carol)
    ready = await c.ready()
    await c.close()
    assert (await carol.post(f"/conversations/{room['id']}/join")).status_code == 200
    hello = await send(alice, room["id"], "hello carol")
    c = await streams.open(carol, last_event_id=ready.id)
    await c.ready()
    joined, message = await c.take(2)
    assert (joined.type, joined.data["user_id"]) == ("member.joined", carol.id)
    assert message.key == (room["id"], hello["seq"])
    assert await c.quiet() == []
    # The id now names the new conversation itself, and stays exact.
    await c.close()
    again = await send(alice, room["id"], "again")
    c = await streams.open(carol, last_event_id=message.id)
    await c.ready()
    assert [e.key for e in await c.take(1)] == [(room["id"], again["seq"])]
    assert await c.quiet() == []


async def test_resume_after_removal_answers_member_left_only(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    b = await streams.open(bob)
    ready = await b.ready()
    await b.close()
    assert (await alice.delete(f"/conversations/{room['id']}/members/{bob.id}")).status_code == 204
    await send(alice, room["id"], "secret after removal")
    b = await streams.open(bob, last_event_id=ready.id)
    await b.ready()
    left = await b.next()
    assert (left.type, left.data["user_id"]) == ("member.left", bob.id)
    assert await b.quiet() == []


async def test_resume_on_one_conversation_replays_after_the_seq(
    streams: Streams, alice: User, bob: User, room: dict[str, Any], group: dict[str, Any]
) -> None:
    params = {"conversation_id": room["id"]}
    b = await streams.open(bob, params=params)
    await b.ready()
    first = await send(alice, room["id"], "seen")
    event = await b.next()
    assert event.id == str(first["seq"])
    await b.close()
    missed = [await send(alice, room["id"], f"missed {i}") for i in range(3)]
    await send(alice, group["id"], "not this conversation")
    b = await streams.open(bob, params=params, last_event_id=event.id)
    assert (await b.ready()).id == event.id
    replayed = await b.take(3)
    assert [e.id for e in replayed] == [str(m["seq"]) for m in missed]
    assert await b.quiet() == []
    now = await send(alice, room["id"], "live")
    assert (await b.next()).id == str(now["seq"])


async def test_an_id_is_read_by_any_process(
    app_factory: AppFactory,
    live_factory: LiveFactory,
    streams: Streams,
    alice: User,
    bob: User,
    room: dict[str, Any],
    group: dict[str, Any],
) -> None:
    b = await streams.open(bob)
    await b.ready()
    await send(alice, room["id"], "seen")
    seen, _ = await b.until("message.created")
    await b.close()
    missed = [await send(alice, group["id"], "g"), await send(alice, room["id"], "r")]
    other = await live_factory(await app_factory())
    b = await streams.open(bob, live=other, last_event_id=seen.id)
    await b.ready()
    replayed = await b.take(2)
    assert {e.key for e in replayed} == keys(missed)
    assert await b.quiet() == []


async def test_a_busy_stream_renews_its_checkpoint_and_stays_exact(
    streams: Streams, alice: User, bob: User
) -> None:
    groups = []
    for i in range(MAX_DELTA + 2):
        resp = await alice.post(
            "/conversations", json={"kind": "group", "name": f"g{i}", "member_ids": [bob.id]}
        )
        assert resp.status_code == 201
        groups.append(resp.json()["id"])
    b = await streams.open(bob)
    ready = await b.ready()
    assert ready.id is not None
    ids = []
    for conversation_id in groups:
        await send(alice, conversation_id, "one each")
        event, _ = await b.until("message.created")
        ids.append(event.id)
    checkpoints = {i.split(".")[0] for i in ids if i}
    assert len(checkpoints) == 2  # renewed once the delta outgrew MAX_DELTA
    assert max(len(i) for i in ids if i) < 400
    await b.close()
    missed = [await send(alice, groups[0], "first"), await send(alice, groups[-1], "last")]
    b = await streams.open(bob, last_event_id=ids[-1])
    await b.ready()
    assert {e.key for e in await b.take(2)} == keys(missed)
    assert await b.quiet() == []


async def test_a_forged_delta_learns_nothing_about_other_conversations(
    streams: Streams, alice: User, bob: User, carol: User
) -> None:
    resp = await alice.post(
        "/conversations", json={"kind": "group", "name": "private", "member_ids": [carol.id]}
    )
    secret = uuid.UUID(resp.json()["id"])
    assert (await alice.delete(f"/conversations/{secret}")).status_code == 204
    b = await streams.open(bob)
    ready = (await b.ready()).id
    assert ready is not None
    await b.close()
    # A delta naming the deleted group as "joined after the checkpoint, at seq 1".
    raw = bytes([1, 0]) + secret.bytes + bytes([1])
    forged = ready.split(".")[0] + "." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    b = await streams.open(bob, last_event_id=forged)
    await b.ready()
    assert await b.quiet() == []


async def test_a_foreign_or_garbled_last_event_id_is_400(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    a = await streams.open(alice)
    alices = (await a.ready()).id
    assert alices is not None
    await streams.refused(bob, 400, "invalid_last_event_id", last_event_id=alices)
    checkpoint = alices.split(".")[0]
    for garbled in (
        "nonsense",
        "42",
        f"{uuid.uuid4().hex}.AQ",  # no such checkpoint
        f"{checkpoint}.!!",
        f"{checkpoint}.AgE",  # unknown version
        f"{checkpoint}.AX8",  # index past the checkpoint
        f"{checkpoint}.AQA",  # truncated
        "x" * 5000,
    ):
        await streams.refused(alice, 400, "invalid_last_event_id", last_event_id=garbled)
    params = {"conversation_id": room["id"]}
    await streams.refused(bob, 400, "invalid_last_event_id", params=params, last_event_id=alices)
    await streams.refused(bob, 400, "invalid_last_event_id", params=params, last_event_id="-1")


# -- the end of a stream ----------------------------------------------------------------------


async def test_logout_ends_the_stream_within_5_s(
    streams: Streams, live: LiveServer, bob: User, room: dict[str, Any]
) -> None:
    b = await streams.open(bob)
    await b.ready()
    started = time.monotonic()
    resp = await bob.post("/auth/logout", json={"refresh_token": bob.refresh_token})
    assert resp.status_code == 204
    last = await b.ended(timeout=5.0)
    assert time.monotonic() - started < 5.0
    assert [e.type for e in last] == ["error"]
    assert last[0].data["code"] == "session_ended"
    await eventually(lambda: live.app.state.realtime.connection_count == 0)
    # And its credentials open nothing any more.
    await streams.refused(bob, 401)


async def test_a_one_conversation_stream_ends_when_its_member_is_removed(
    streams: Streams, alice: User, bob: User, room: dict[str, Any]
) -> None:
    b = await streams.open(bob, params={"conversation_id": room["id"]})
    await b.ready()
    assert (await alice.delete(f"/conversations/{room['id']}/members/{bob.id}")).status_code == 204
    last = await b.ended()
    assert last[-1].type == "error" and last[-1].data["code"] == "forbidden"


# -- the id codec ----------------------------------------------------------------------------


def test_ids_round_trip_and_stay_compact() -> None:
    known = [uuid.uuid4() for _ in range(100)]
    positions = Positions(uuid.uuid4(), {c: 1000 + i for i, c in enumerate(known)}, renew_at=0)
    joined_later = uuid.uuid4()
    positions.moved.update({known[3]: 70_000, known[99]: 5, joined_later: 12})
    event_id = positions.event_id()
    checkpoint, delta = event_id.split(".")
    assert checkpoint == positions.checkpoint_id.hex
    assert len(delta) < 40
    read = Positions(positions.checkpoint_id, dict(positions.base), renew_at=0)
    read.read_delta(delta)
    assert read.moved == positions.moved
    assert read.current() == positions.current()


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # no version
        b"\x00",  # unknown version
        b"\x01\x02\x05",  # index past the checkpoint
        b"\x01\x00\x01",  # a uuid cut short
        b"\x01\x01",  # an index without a seq
        b"\x01\x01" + b"\x80" * 9 + b"\x01",  # a varint past 2**53
    ],
)
def test_garbled_deltas_are_refused(raw: bytes) -> None:
    positions = Positions(uuid.uuid4(), {uuid.uuid4(): 1}, renew_at=0)
    delta = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    with pytest.raises(InvalidLastEventId):
        positions.read_delta(delta)


# -- opening a stream while events arrive --------------------------------------------------
# The windows these guard are a few microseconds wide on a live server, so they are
# driven by hand here: a connection with frames already queued when the stream opens.


def _opening(conn: Connection, hub: Any) -> EventStream:
    realtime: Any = SimpleNamespace(hub=hub)
    settings: Any = None
    return EventStream(realtime, settings, conn, transport="sse")


def _queued(conn: Connection) -> list[tuple[uuid.UUID | None, int | None]]:
    frames = []
    while not conn.queue.empty():
        frame = conn.queue.get_nowait()
        assert frame is not None
        frames.append((frame.conversation_id, frame.seq))
    return frames


def test_a_fresh_stream_stands_below_what_is_already_queued() -> None:
    conn = Connection(id="c1", user_id=uuid.uuid4(), session_id=uuid.uuid4())
    busy, quiet, joined = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for conversation_id, floor in ((busy, 0), (quiet, 0), (joined, 11)):
        conn.floor(conversation_id, floor)
    # The hub routed seq 8 and 9 of `busy` to the connection while it was subscribing.
    conn.deliver(busy, 8, b"{}", "message.created")
    conn.deliver(busy, 9, b"{}", "message.created")
    hub = SimpleNamespace(
        member_of={"c1": {busy, quiet, joined}},
        streams={
            busy: SimpleNamespace(ready=True, last_seq=9),
            quiet: SimpleNamespace(ready=True, last_seq=7),
            joined: SimpleNamespace(ready=True, last_seq=10),  # behind the join's floor
        },
    )
    stood = _opening(conn, hub)._stood_at()
    assert stood == {busy: 7, quiet: 7, joined: 11}
    assert _queued(conn) == [(busy, 8), (busy, 9)]  # untouched, still to be written


def test_a_resume_takes_back_what_was_queued_and_sends_it_once() -> None:
    conn = Connection(id="c1", user_id=uuid.uuid4(), session_id=uuid.uuid4())
    resumed, other = uuid.uuid4(), uuid.uuid4()
    conn.deliver(resumed, 8, b"{}", "message.created")  # live, before the resume began
    conn.send(b'{"type":"typing"}')
    conn.deliver(other, 3, b"{}", "message.created")
    _opening(conn, SimpleNamespace())._take_back({resumed: 5})
    conn.deliver(resumed, 9, b"{}", "message.created")  # live, during the replay
    for seq in (6, 7, 8):  # what the replay loads from the database
        conn.replay(resumed, seq, b"{}", "message.created")
    conn.floor(resumed, 8)
    conn.release(resumed)
    assert _queued(conn) == [
        (None, None),
        (other, 3),
        (resumed, 6),
        (resumed, 7),
        (resumed, 8),
        (resumed, 9),
    ]
