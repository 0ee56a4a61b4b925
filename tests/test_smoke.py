from __future__ import annotations

from typing import Any

from tests.conftest import User, send


async def test_alice_posts_in_room_and_bob_reads_it(
    alice: User, bob: User, room: dict[str, Any]
) -> None:
    message = await send(alice, room["id"], "hi bob")
    resp = await bob.get(f"/conversations/{room['id']}/messages")
    assert resp.status_code == 200
    assert [m["content"] for m in resp.json()["messages"]] == ["hi bob"]
    assert resp.json()["messages"][0]["id"] == message["id"]
