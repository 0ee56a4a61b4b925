"""The multiplexed WebSocket (§8) against a real uvicorn: handshake, ops, live events,
isolation and resume."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import websockets
import websockets.asyncio.client

from tests.conftest import WS, LiveServer, User, send


async def test_ready_then_live_message_from_http(
    live: LiveServer, alice: User, bob: User, room: dict[str, Any]
) -> None:
    ws = await live.connect(bob)
    ready = await ws.ready()
    assert ready["user_id"] == bob.id
    assert ready["heartbeat"] == 25
    sent = await send(alice, room["id"], "over http")
    event, before = await ws.until("message.created")
    assert before == []
    assert event["conversation_id"] == room["id"]
    assert event["seq"] == sent["seq"]
    assert event["message"]["content"] == "over http"
    assert "status" not in event["message"]
    await ws.close()


async def test_send_op_is_acked_after_commit_and_fans_out(
    live: LiveServer, alice: User, bob: User, room: dict[str, Any]
) -> None:
    a = await live.connect(alice)
    b = await live.connect(bob)
    await a.ready()
    await b.ready()
    await a.send(op="send", ref="r1", conversation_id=room["id"], content="hi", client_msg_id="c1")
    ack, _ = await a.until("ack")
    assert ack["ref"] == "r1"
    assert ack["message"]["content"] == "hi"
    # Durable before acknowledged: the message is readable over REST now.
    history = (await bob.get(f"/conversations/{room['id']}/messages")).json()["messages"]
    assert [m["id"] for m in history] == [ack["message"]["id"]]
    event, _ = await b.until("message.created")
    assert event["message"]["id"] == ack["message"]["id"]
    # The retry makes no second message.
    await a.send(op="send", ref="r2", conversation_id=room["id"], content="hi", client_msg_id="c1")
    again, _ = await a.until("ack")
    assert again["message"]["id"] == ack["message"]["id"]
    assert await b.quiet() == []


async def test_an_outsider_receives_nothing(
    live: LiveServer, alice: User, carol: User, room: dict[str, Any]
) -> None:
    c = await live.connect(carol)
    await c.ready()
    await send(alice, room["id"], "members only")
    assert await c.quiet() == []


async def test_join_starts_and_kick_stops_delivery(
    live: LiveServer, alice: User, carol: User, room: dict[str, Any]
) -> None:
    c = await live.connect(carol)
    await c.ready()
    joined = await carol.post(f"/conversations/{room['id']}/join")
    assert joined.status_code == 200
    event, _ = await c.until("member.joined")
    assert event["user_id"] == carol.id
    await send(alice, room["id"], "welcome")
    message, _ = await c.until("message.created")
    assert message["message"]["content"] == "welcome"
    kicked = await alice.delete(f"/conversations/{room['id']}/members/{carol.id}")
    assert kicked.status_code == 204
    left, _ = await c.until("member.left")
    assert left["user_id"] == carol.id
    assert left["reason"] == "removed"
    await send(alice, room["id"], "after the kick")
    assert await c.quiet() == []


async def test_ops_errors_keep_the_connection(
    live: LiveServer, alice: User, carol: User, room: dict[str, Any]
) -> None:
    ws = await live.connect(alice)
    await ws.ready()
    await ws.ws.send("not json")
    error = await ws.recv()
    assert error["type"] == "error" and error["code"] == "bad_request"
    await ws.send(op="send", ref=7, conversation_id=room["id"], content="   ")
    error = await ws.recv()
    assert error == {**error, "type": "error", "ref": 7, "code": "validation_error"}
    await ws.send(op="fly", ref="x")
    assert (await ws.recv())["code"] == "validation_error"
    await ws.send(op="send", ref="y", conversation_id=room["id"], content="x", seq=5)
    assert (await ws.recv())["code"] == "validation_error"
    c = await live.connect(carol)
    await c.ready()
    await c.send(op="send", ref="z", conversation_id=room["id"], content="intruder")
    error = await c.recv()
    assert error["code"] == "not_found" and error["ref"] == "z"
    await ws.send(op="ping", ref="p")
    assert await ws.recv() == {"type": "pong", "ref": "p"}


async def test_resume_replays_what_was_missed_exactly_once(
    live: LiveServer, alice: User, bob: User, room: dict[str, Any]
) -> None:
    b = await live.connect(bob)
    await b.ready()
    first = await send(alice, room["id"], "seen")
    await b.until("message.created")
    await b.close()
    missed = [await send(alice, room["id"], f"missed {i}") for i in range(5)]
    edited = await alice.patch(
        f"/messages/{missed[0]['id']}", json={"content": "missed 0 (edited)"}
    )
    assert edited.status_code == 200
    b = await live.connect(bob)
    await b.ready()
    await b.send(op="resume", ref="r", cursors={room["id"]: first["seq"]})
    resumed, events = await b.until("resumed")
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    contents = [e["message"]["content"] for e in events]
    # The edit is folded into one event at the message's latest seq.
    assert contents == ["missed 1", "missed 2", "missed 3", "missed 4", "missed 0 (edited)"]
    assert resumed["ref"] == "r"
    assert resumed["cursors"] == {room["id"]: edited.json()["updated_seq"]}
    # And then it is live again, without doubles.
    await send(alice, room["id"], "live")
    event, extra = await b.until("message.created")
    assert extra == [] and event["message"]["content"] == "live"


async def test_resume_after_removal_answers_member_left(
    live: LiveServer, alice: User, bob: User, room: dict[str, Any]
) -> None:
    last = await send(alice, room["id"], "before")
    assert (await alice.delete(f"/conversations/{room['id']}/members/{bob.id}")).status_code == 204
    await send(alice, room["id"], "secret after removal")
    b = await live.connect(bob)
    await b.ready()
    await b.send(op="resume", cursors={room["id"]: last["seq"]})
    _, events = await b.until("resumed")
    assert [e["type"] for e in events] == ["member.left"]
    assert "secret" not in str(events)


async def test_origin_not_allowed_is_refused_before_accept(live: LiveServer, alice: User) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await live.connect(alice, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    ok = await live.connect(alice, origin=f"http://{live.base}")
    await ok.ready()


@pytest.mark.parametrize(
    "path", ["/ws/conversations/not-a-uuid", "/ws/elsewhere", "/conversations"]
)
async def test_a_websocket_to_no_gateway_path_is_refused(
    live: LiveServer, alice: User, path: str
) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await live.connect(alice, path)
    assert refused.value.response.status_code == 403
    # The gateway's own paths still answer, root and one-conversation alike.
    ok = await live.connect(alice)
    await ok.ready()
    await ok.close()


async def raw(live: LiveServer, **params: str) -> WS:
    return WS(await websockets.asyncio.client.connect(live.ws_url(**params)))


async def test_bad_token_closes_with_4001(live: LiveServer) -> None:
    assert await (await raw(live, token="nope")).closed_with() == 4001


async def test_ticket_is_single_use(live: LiveServer, alice: User) -> None:
    ticket = (await alice.post("/auth/ticket")).json()["ticket"]
    await (await raw(live, ticket=ticket)).ready()
    assert await (await raw(live, ticket=ticket)).closed_with() == 4001


async def test_first_frame_auth(live: LiveServer, alice: User) -> None:
    ws = await raw(live)
    await ws.send(op="auth", token=alice.access_token)
    await ws.ready()


async def test_oversized_frame_closes_with_1009(live: LiveServer, alice: User) -> None:
    ws = await live.connect(alice)
    await ws.ready()
    await ws.ws.send("x" * 70_000)
    assert await ws.closed_with() == 1009


async def test_admin_stats_count_live_connections_per_process(
    live: LiveServer, admin: User, alice: User
) -> None:
    ws = await live.connect(alice)
    await ws.ready()
    stats = (await admin.get("/admin/stats")).json()
    process = live.app.state.process_name
    assert stats["connections"][process] == 1
    await ws.close()
    for _ in range(50):
        stats = (await admin.get("/admin/stats")).json()
        if stats["connections"][process] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["connections"][process] == 0


async def test_the_protocol_schema_names_every_op_and_event(anon: Any) -> None:
    resp = await anon.get("/realtime/schema")
    assert resp.status_code == 200
    schema = resp.json()
    text = str(schema)
    for op in ("send", "edit", "delete", "typing", "read", "history", "resume", "ping", "auth"):
        assert f"'{op}'" in text, op
    for event in (
        "ready", "ack", "history", "resumed", "pong", "backlog", "error", "gap",
        "message.created", "message.updated", "message.deleted",
        "member.joined", "member.left", "member.updated",
        "typing", "read", "presence", "conversation.updated", "conversation.deleted",
    ):  # fmt: skip
        assert f"'{event}'" in text, event
    assert set(schema) >= {"client_op", "server_event"}
