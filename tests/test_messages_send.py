"""The send path (§6) where it is built for speed: on PostgreSQL one statement checks,
stores and answers what the sender's view needs. These pin what that must not change:
who may send, what the response says, and that a refused send leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import User, assert_problem, send

Conversation = dict[str, Any]


async def last_seq(user: User, conversation_id: str) -> int:
    resp = await user.get(f"/conversations/{conversation_id}")
    assert resp.status_code == 200, resp.text
    seq: int = resp.json()["last_seq"]
    return seq


async def contents(user: User, conversation_id: str) -> list[str]:
    resp = await user.get(f"/conversations/{conversation_id}/messages")
    assert resp.status_code == 200, resp.text
    return [m["content"] for m in resp.json()["messages"]]


async def as_read_by(user: User, message: dict[str, Any]) -> dict[str, Any]:
    resp = await user.get(f"/messages/{message['id']}")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_a_send_with_an_ended_session_is_refused_and_writes_nothing(
    alice: User, bob: User, group: Conversation
) -> None:
    cid = group["id"]
    url = f"/conversations/{cid}/messages"
    first = await send(alice, cid, "before logout", client_msg_id="c-1")
    seq = await last_seq(bob, cid)
    resp = await alice.post("/auth/logout", json={"refresh_token": alice.refresh_token})
    assert resp.status_code == 204, resp.text

    # The access token is still well within its lifetime: only the session has ended.
    for body in (
        {"content": "after logout"},
        {"content": "after logout", "client_msg_id": "c-2"},
        {"content": "a retry", "client_msg_id": "c-1"},  # must not reveal the original
        {"content": "a reply", "reply_to_id": first["id"]},
    ):
        assert_problem(await alice.post(url, json=body), 401, "unauthorized")
    assert await last_seq(bob, cid) == seq
    assert await contents(bob, cid) == ["before logout"]


async def test_a_send_by_a_deactivated_sender_is_refused_and_writes_nothing(
    admin: User, alice: User, bob: User, group: Conversation
) -> None:
    cid = group["id"]
    await send(bob, cid, "before")
    seq = await last_seq(alice, cid)
    resp = await admin.patch(f"/admin/users/{bob.id}", json={"is_active": False})
    assert resp.status_code == 200, resp.text
    resp = await bob.post(f"/conversations/{cid}/messages", json={"content": "after"})
    assert_problem(resp, 401, "unauthorized")
    assert await last_seq(alice, cid) == seq
    assert await contents(alice, cid) == ["before"]


async def test_the_send_response_is_the_senders_view_of_the_stored_message(
    alice: User, bob: User, room: Conversation, group: Conversation, direct: Conversation
) -> None:
    for conversation, status in ((room, None), (group, "sent"), (direct, "sent")):
        for fields in ({}, {"client_msg_id": f"view-{conversation['id']}"}):
            message = await send(alice, conversation["id"], "what do I see?", **fields)
            assert message["status"] == status
            assert await as_read_by(alice, message) == message
            # Status is the sender's alone; everything else is the same for everyone.
            assert await as_read_by(bob, message) == {**message, "status": None}


async def test_a_send_where_no_one_else_is_left_to_read_it_is_read(
    alice: User, bob: User, group: Conversation
) -> None:
    assert (await bob.post(f"/conversations/{group['id']}/leave")).status_code == 204
    message = await send(alice, group["id"], "anyone?")
    assert message["status"] == "read"
    assert await as_read_by(alice, message) == message


async def test_the_mentions_of_a_send_come_in_the_order_a_read_gives(
    alice: User, bob: User, dave: User, group: Conversation
) -> None:
    resp = await alice.put(f"/conversations/{group['id']}/members/{dave.id}")
    assert resp.status_code in (200, 201), resp.text
    for content in ("@bob and @dave", "@dave and @bob", "@bob alone"):
        message = await send(alice, group["id"], content)
        assert sorted(message["mentions"]) == sorted(
            u.id for u in (bob, dave) if f"@{u.username}" in content
        )
        assert await as_read_by(alice, message) == message


async def test_a_retry_answers_the_original_as_the_sender_sees_it_now(
    alice: User, bob: User, group: Conversation
) -> None:
    cid = group["id"]
    first = await send(bob, cid, "once", client_msg_id="r-1")
    assert first["status"] == "sent"
    resp = await alice.post(f"/conversations/{cid}/read", json={"seq": first["seq"]})
    assert resp.status_code == 204, resp.text

    retry = await bob.post(
        f"/conversations/{cid}/messages", json={"content": "once more", "client_msg_id": "r-1"}
    )
    assert retry.status_code == 200, retry.text
    assert retry.json() == {**first, "status": "read"}
    assert retry.headers["content-type"] == "application/json"


async def test_a_retry_after_removal_is_not_found(
    alice: User, bob: User, group: Conversation
) -> None:
    cid = group["id"]
    await send(bob, cid, "once", client_msg_id="r-1")
    resp = await alice.delete(f"/conversations/{cid}/members/{bob.id}")
    assert resp.status_code == 204, resp.text
    seq = await last_seq(alice, cid)
    resp = await bob.post(
        f"/conversations/{cid}/messages", json={"content": "once", "client_msg_id": "r-1"}
    )
    assert_problem(resp, 404, "not_found")
    assert await last_seq(alice, cid) == seq


# -- PostgreSQL: a send that waited for the conversation's lock ---------------------------
