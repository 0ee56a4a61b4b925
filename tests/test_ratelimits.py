"""§10 per-user limits: message sends (REST and WebSocket share one budget) and requests."""

from __future__ import annotations

from typing import Any

from tests.conftest import AppFactory, Client, LiveFactory, User, assert_problem


async def test_sends_per_user_are_limited_and_the_refused_one_writes_nothing(
    app_factory: AppFactory, alice: User, bob: User, room: dict[str, Any]
) -> None:
    limited = await app_factory(rate_limits="on", send_rate="3/minute")
    as_alice = Client(limited, alice.access_token)
    for i in range(3):
        resp = await as_alice.post(
            f"/conversations/{room['id']}/messages", json={"content": f"{i}"}
        )
        assert resp.status_code == 201, resp.text
    before = (await as_alice.get(f"/conversations/{room['id']}")).json()["last_seq"]
    refused = await as_alice.post(f"/conversations/{room['id']}/messages", json={"content": "4"})
    assert_problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    after = (await as_alice.get(f"/conversations/{room['id']}")).json()["last_seq"]
    assert after == before
    # Another user has a budget of their own.
    as_bob = Client(limited, bob.access_token)
    ok = await as_bob.post(f"/conversations/{room['id']}/messages", json={"content": "mine"})
    assert ok.status_code == 201


async def test_requests_per_user_are_limited(
    app_factory: AppFactory, alice: User, bob: User
) -> None:
    limited = await app_factory(rate_limits="on", request_rate="5/minute")
    as_alice = Client(limited, alice.access_token)
    for _ in range(5):
        assert (await as_alice.get("/auth/me")).status_code == 200
    assert_problem(await as_alice.get("/auth/me"), 429, "rate_limited")
    assert (await Client(limited, bob.access_token).get("/auth/me")).status_code == 200


async def test_websocket_sends_share_the_rest_budget(
    app_factory: AppFactory,
    live_factory: LiveFactory,
    alice: User,
    room: dict[str, Any],
) -> None:
    limited = await app_factory(rate_limits="on", send_rate="2/minute")
    live = await live_factory(limited)
    sent = await Client(limited, alice.access_token).post(
        f"/conversations/{room['id']}/messages", json={"content": "over REST"}
    )
    assert sent.status_code == 201
    ws = await live.connect(alice)
    await ws.ready()
    await ws.send(op="send", ref=1, conversation_id=room["id"], content="over the socket")
    ack, _ = await ws.until("ack")
    assert ack["ref"] == 1
    await ws.send(op="send", ref=2, conversation_id=room["id"], content="one too many")
    error, _ = await ws.until("error")
    assert error["ref"] == 2
    assert error["code"] == "rate_limited"
    assert error["retry_after"] >= 1
    await ws.send(op="ping", ref="still open")
    pong, _ = await ws.until("pong")
    assert pong["ref"] == "still open"
