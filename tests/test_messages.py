"""§6 messages over REST, as a client sees them.

Send (seq, idempotency, replies, validation), history paging and `changed_after`, get,
edit and /history, soft delete, read markers and unread counts, receipts and status, and
mentions. Search and the per-user message list are in test_search.py.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import AppFactory, Client, User, assert_hidden, assert_problem, send

Conversation = dict[str, Any]
Message = dict[str, Any]

MESSAGE_FIELDS = {
    "id",
    "conversation_id",
    "seq",
    "updated_seq",
    "sender",
    "content",
    "client_msg_id",
    "reply_to_id",
    "attachments",
    "reactions",
    "mentions",
    "pinned",
    "created_at",
    "edited_at",
    "deleted",
    "status",
}

# Fields a client must never be able to set, each with a plausible value.
FORBIDDEN_FIELDS: dict[str, Any] = {
    "seq": 99,
    "updated_seq": 99,
    "id": str(uuid.uuid4()),
    "sender": {"id": str(uuid.uuid4())},
    "sender_id": str(uuid.uuid4()),
    "conversation_id": str(uuid.uuid4()),
    "created_at": "2020-01-01T00:00:00Z",
    "edited_at": "2020-01-01T00:00:00Z",
    "deleted": True,
    "status": "read",
    "mentions": [],
}


# -- helpers ----------------------------------------------------------------------------


def unknown_id() -> str:
    return str(uuid.uuid4())


def parse_time(value: str) -> datetime:
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert at.utcoffset() == timedelta(0), value
    return at


async def conversation(user: Client, conversation_id: str) -> Conversation:
    resp = await user.get(f"/conversations/{conversation_id}")
    assert resp.status_code == 200, resp.text
    body: Conversation = resp.json()
    return body


async def last_seq(user: Client, conversation_id: str) -> int:
    seq: int = (await conversation(user, conversation_id))["last_seq"]
    return seq


async def history(user: Client, conversation_id: str, **params: Any) -> dict[str, Any]:
    resp = await user.get(f"/conversations/{conversation_id}/messages", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"messages", "has_more"}
    return body


def seqs(page: dict[str, Any]) -> list[int]:
    return [m["seq"] for m in page["messages"]]


async def get_message(user: Client, message_id: str) -> Message:
    resp = await user.get(f"/messages/{message_id}")
    assert resp.status_code == 200, resp.text
    body: Message = resp.json()
    return body


async def edit(user: Client, message_id: str, content: str) -> Message:
    resp = await user.patch(f"/messages/{message_id}", json={"content": content})
    assert resp.status_code == 200, resp.text
    body: Message = resp.json()
    return body


async def delete(user: Client, message_id: str) -> None:
    resp = await user.delete(f"/messages/{message_id}")
    assert resp.status_code == 204, resp.text
    assert resp.content == b""


async def versions(user: Client, message_id: str, **params: Any) -> dict[str, Any]:
    resp = await user.get(f"/messages/{message_id}/history", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def receipts(user: Client, message_id: str, **params: Any) -> dict[str, Any]:
    resp = await user.get(f"/messages/{message_id}/receipts", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def mark_read(user: Client, conversation_id: str, seq: int) -> None:
    resp = await user.post(f"/conversations/{conversation_id}/read", json={"seq": seq})
    assert resp.status_code == 204, resp.text
    assert resp.content == b""


async def fill(user: Client, conversation_id: str, count: int, prefix: str = "m") -> list[Message]:
    return [await send(user, conversation_id, f"{prefix}{i}") for i in range(count)]


async def walk(user: User, cid: str, limit: int, expected: list[int]) -> None:
    """Page backwards from the top with `before`, then forwards from 0 with `after`."""
    pages = math.ceil(len(expected) / limit)
    backwards: list[int] = []
    page = await history(user, cid, limit=limit)
    backwards = seqs(page) + backwards
    walked = 1
    while page["has_more"]:
        page = await history(user, cid, limit=limit, before=page["messages"][0]["seq"])
        assert page["messages"], "has_more promised another page"
        backwards = seqs(page) + backwards
        walked += 1
    assert backwards == expected
    assert walked == pages

    forwards: list[int] = []
    page = await history(user, cid, limit=limit, after=0)
    forwards += seqs(page)
    walked = 1
    while page["has_more"]:
        page = await history(user, cid, limit=limit, after=page["messages"][-1]["seq"])
        assert page["messages"], "has_more promised another page"
        forwards += seqs(page)
        walked += 1
    assert forwards == expected
    assert walked == pages


def assert_invalid(resp: httpx.Response) -> dict[str, Any]:
    body = assert_problem(resp, 422)
    assert body["code"] in ("validation_error", "invalid_cursor"), body
    return body


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
async def trio(alice: User, bob: User, dave: User) -> Conversation:
    """A private group of alice (owner), bob and dave."""
    resp = await alice.post(
        "/conversations", json={"kind": "group", "name": "trio", "member_ids": [bob.id, dave.id]}
    )
    assert resp.status_code == 201, resp.text
    body: Conversation = resp.json()
    return body


# -- send -------------------------------------------------------------------------------


async def test_send_answers_201_with_the_stored_message(
    alice: User, bob: User, room: Conversation
) -> None:
    resp = await alice.post(
        f"/conversations/{room['id']}/messages",
        json={"content": "hello world", "client_msg_id": "c-1"},
    )
    assert resp.status_code == 201, resp.text
    message = resp.json()
    assert set(message) == MESSAGE_FIELDS
    uuid.UUID(message["id"])
    assert message["conversation_id"] == room["id"]
    assert message["sender"] == {
        "id": alice.id,
        "username": "alice",
        "display_name": "Alice Liddell",
    }
    assert message["content"] == "hello world"
    assert message["client_msg_id"] == "c-1"
    assert message["reply_to_id"] is None
    assert message["attachments"] == []
    assert message["reactions"] == []
    assert message["mentions"] == []
    assert message["pinned"] is False
    assert message["edited_at"] is None
    assert message["deleted"] is False
    assert message["status"] is None  # rooms have no delivery status
    parse_time(message["created_at"])
    assert message["seq"] == message["updated_seq"] == await last_seq(alice, room["id"])
    # Durable once acknowledged: another member reads exactly what the sender got back.
    assert await get_message(bob, message["id"]) == message


async def test_content_is_kept_as_sent_and_counted_in_characters(
    alice: User, room: Conversation
) -> None:
    padded = await send(alice, room["id"], "  two  spaces\nand a line  ")
    assert padded["content"] == "  two  spaces\nand a line  "
    # 4000 characters is the limit, whatever their size in bytes.
    assert (await send(alice, room["id"], "é" * 4000))["content"] == "é" * 4000
    assert (await send(alice, room["id"], "😀" * 4000))["content"] == "😀" * 4000
    assert (await send(alice, room["id"], "x"))["content"] == "x"


async def test_the_length_limit_follows_the_configuration(
    app_factory: AppFactory, alice: User, room: Conversation
) -> None:
    # A second app on the same database, with PARLEY_MAX_MESSAGE_CHARS=10.
    small = Client(await app_factory(max_message_chars=10), alice.access_token)
    url = f"/conversations/{room['id']}/messages"
    resp = await small.post(url, json={"content": "x" * 10})
    assert resp.status_code == 201, resp.text
    seq = await last_seq(alice, room["id"])
    assert_problem(await small.post(url, json={"content": "x" * 11}), 422, "validation_error")
    resp = await small.patch(f"/messages/{resp.json()['id']}", json={"content": "y" * 11})
    assert_problem(resp, 422, "validation_error")
    assert await last_seq(alice, room["id"]) == seq


async def test_seq_is_gap_free_and_shared_with_membership_events(
    alice: User, bob: User, carol: User
) -> None:
    resp = await alice.post("/conversations", json={"kind": "room", "name": "seqs"})
    assert resp.status_code == 201, resp.text
    cid = resp.json()["id"]
    assert resp.json()["last_seq"] == 1  # alice joined

    first = await send(alice, cid, "one")
    assert (first["seq"], first["updated_seq"]) == (2, 2)
    assert (await bob.post(f"/conversations/{cid}/join")).status_code == 200  # seq 3
    second = await send(bob, cid, "two")
    assert second["seq"] == 4
    edited = await edit(alice, first["id"], "one, edited")
    assert (edited["seq"], edited["updated_seq"]) == (2, 5)
    assert (await carol.post(f"/conversations/{cid}/join")).status_code == 200  # seq 6
    assert (await carol.post(f"/conversations/{cid}/leave")).status_code == 204  # seq 7
    await delete(bob, second["id"])  # seq 8
    third = await send(alice, cid, "three")
    assert third["seq"] == 9
    assert await last_seq(alice, cid) == 9

    page = await history(alice, cid)
    assert seqs(page) == [2, 4, 9]
    assert [m["updated_seq"] for m in page["messages"]] == [5, 8, 9]

    # Every conversation counts on its own.
    resp = await alice.post("/conversations", json={"kind": "group", "name": "other"})
    other = resp.json()["id"]
    assert (await send(alice, other, "elsewhere"))["seq"] == 2
    assert await last_seq(alice, cid) == 9


async def test_retry_with_the_same_client_msg_id_returns_the_original(
    alice: User, bob: User, room: Conversation, group: Conversation
) -> None:
    url = f"/conversations/{room['id']}/messages"
    first = await alice.post(url, json={"content": "once", "client_msg_id": "abc-1"})
    assert first.status_code == 201, first.text
    seq = await last_seq(alice, room["id"])

    retry = await alice.post(url, json={"content": "once, again", "client_msg_id": "abc-1"})
    assert retry.status_code == 200, retry.text
    assert retry.json() == first.json()
    assert await last_seq(alice, room["id"]) == seq
    assert [m["content"] for m in (await history(bob, room["id"]))["messages"]] == ["once"]

    # Another sender, or another conversation, with the same id is another message.
    theirs = await bob.post(url, json={"content": "mine", "client_msg_id": "abc-1"})
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["id"] != first.json()["id"]
    assert theirs.json()["seq"] == seq + 1
    elsewhere = await alice.post(
        f"/conversations/{group['id']}/messages", json={"content": "x", "client_msg_id": "abc-1"}
    )
    assert elsewhere.status_code == 201, elsewhere.text
    # The ids are case-sensitive strings.
    other = await alice.post(url, json={"content": "new", "client_msg_id": "ABC-1"})
    assert other.status_code == 201, other.text
    assert len((await history(bob, room["id"]))["messages"]) == 3


async def test_concurrent_sends_get_distinct_gap_free_seqs(
    alice: User, bob: User, room: Conversation
) -> None:
    cid = room["id"]
    start = await last_seq(alice, cid)
    url = f"/conversations/{cid}/messages"
    resps = await asyncio.gather(
        *((alice if i % 2 else bob).post(url, json={"content": f"race {i}"}) for i in range(10))
    )
    assert [r.status_code for r in resps] == [201] * 10
    assert sorted(r.json()["seq"] for r in resps) == list(range(start + 1, start + 11))
    assert await last_seq(alice, cid) == start + 10


async def test_concurrent_retries_make_one_message(alice: User, room: Conversation) -> None:
    cid = room["id"]
    start = await last_seq(alice, cid)
    url = f"/conversations/{cid}/messages"
    resps = await asyncio.gather(
        *(alice.post(url, json={"content": "once", "client_msg_id": "retry-1"}) for _ in range(6))
    )
    assert sorted(r.status_code for r in resps) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in resps}) == 1
    assert await last_seq(alice, cid) == start + 1
    assert len((await history(alice, cid))["messages"]) == 1


async def test_reply_to_must_be_a_message_of_the_same_conversation(
    alice: User, bob: User, carol: User, room: Conversation, group: Conversation
) -> None:
    question = await send(alice, room["id"], "question?")
    answer = await send(bob, room["id"], "answer", reply_to_id=question["id"])
    assert answer["reply_to_id"] == question["id"]
    assert (await get_message(alice, answer["id"]))["reply_to_id"] == question["id"]

    resp = await carol.post("/conversations", json={"kind": "group", "name": "carols"})
    carols = await send(carol, resp.json()["id"], "private")
    in_group = await send(alice, group["id"], "in the group")
    seq = await last_seq(alice, room["id"])
    url = f"/conversations/{room['id']}/messages"
    details = []
    for reply_to in (in_group["id"], carols["id"], unknown_id()):
        resp = await bob.post(url, json={"content": "re", "reply_to_id": reply_to})
        body = assert_problem(resp, 422, "validation_error")
        assert body["errors"][0]["loc"] == ["body", "reply_to_id"]
        details.append((body["detail"], body["errors"]))
    # A message elsewhere, one the caller may not see and none at all read the same.
    assert details[0] == details[1] == details[2]
    assert_invalid(await bob.post(url, json={"content": "re", "reply_to_id": "nope"}))
    assert await last_seq(alice, room["id"]) == seq
    assert len((await history(bob, room["id"]))["messages"]) == 2


async def test_attachments_are_rejected_cleanly_until_files_exist(
    alice: User, room: Conversation
) -> None:
    url = f"/conversations/{room['id']}/messages"
    seq = await last_seq(alice, room["id"])
    resp = await alice.post(url, json={"content": "see file", "attachment_ids": [unknown_id()]})
    body = assert_problem(resp, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "attachment_ids"]
    for bad in ("x", ["not-a-uuid"], [unknown_id() for _ in range(11)], None):
        assert_invalid(await alice.post(url, json={"content": "f", "attachment_ids": bad}))
    assert await last_seq(alice, room["id"]) == seq
    assert (await history(alice, room["id"]))["messages"] == []
    # No attachments is fine.
    resp = await alice.post(url, json={"content": "plain", "attachment_ids": []})
    assert resp.status_code == 201, resp.text
    assert resp.json()["attachments"] == []


async def test_send_rejects_bad_input_and_writes_nothing(
    alice: User, bob: User, room: Conversation
) -> None:
    url = f"/conversations/{room['id']}/messages"
    seq = await last_seq(alice, room["id"])
    bodies: list[Any] = [
        *({"content": "hi", name: value} for name, value in FORBIDDEN_FIELDS.items()),
        {"content": "hi", "sender": bob.id},
        {},
        {"content": ""},
        {"content": "   \n\t  "},
        {"content": "\u3000\u00a0"},  # Unicode white space is white space too
        {"content": "x" * 4001},
        {"content": "é" * 4001},
        {"content": None},
        {"content": 42},
        {"content": ["hi"]},
        {"content": "nul \x00 inside"},
        {"content": "hi", "client_msg_id": ""},
        {"content": "hi", "client_msg_id": "x" * 65},
        {"content": "hi", "client_msg_id": "with space"},
        {"content": "hi", "client_msg_id": 7},
        {"content": "hi", "reply_to_id": "not-a-uuid"},
        [],
        "hi",
    ]
    for body in bodies:
        resp = await alice.post(url, json=body)
        problem = assert_problem(resp, 422, "validation_error")
        assert problem["errors"], body
    too_long = assert_problem(await alice.post(url, json={"content": "y" * 4001}), 422)
    assert too_long["errors"][0]["loc"] == ["body", "content"]

    # A lone surrogate escape is valid JSON but no storable text.
    for raw in (b'{"content": "\\ud800"}', b'{"content": "ok", "client_msg_id": "\\udfff"}'):
        resp = await alice.post(url, content=raw, headers={"Content-Type": "application/json"})
        assert_problem(resp, 422, "validation_error")
    resp = await alice.post(
        url, content=b'{"content": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, 400, "malformed_json")

    assert await last_seq(alice, room["id"]) == seq
    assert (await history(bob, room["id"]))["messages"] == []


async def test_send_needs_a_token_and_membership(
    anon: Client, alice: User, carol: User, room: Conversation, group: Conversation
) -> None:
    seq = await last_seq(alice, room["id"])
    resp = await anon.post(f"/conversations/{room['id']}/messages", json={"content": "hi"})
    assert_problem(resp, 401, "unauthorized")
    unknown = await carol.post(f"/conversations/{unknown_id()}/messages", json={"content": "hi"})
    # A public room is readable only by its members, and writable only by them too.
    for conversation_id in (room["id"], group["id"]):
        resp = await carol.post(
            f"/conversations/{conversation_id}/messages", json={"content": "hi"}
        )
        assert_hidden(resp, unknown)
    assert_invalid(await alice.post("/conversations/not-a-uuid/messages", json={"content": "hi"}))
    assert await last_seq(alice, room["id"]) == seq
    assert (await history(alice, room["id"]))["messages"] == []


# -- history ----------------------------------------------------------------------------


async def test_history_without_bounds_is_the_newest_page_in_ascending_seq(
    alice: User, bob: User, room: Conversation, group: Conversation
) -> None:
    assert await history(alice, group["id"]) == {"messages": [], "has_more": False}
    sent = await fill(alice, room["id"], 7)
    expected = [m["seq"] for m in sent]

    page = await history(bob, room["id"], limit=3)
    assert seqs(page) == expected[-3:]
    assert page["has_more"] is True
    assert [m["content"] for m in page["messages"]] == ["m4", "m5", "m6"]
    page = await history(bob, room["id"])
    assert (seqs(page), page["has_more"]) == (expected, False)
    page = await history(bob, room["id"], limit=7)
    assert (seqs(page), page["has_more"]) == (expected, False)
    page = await history(bob, room["id"], limit=6)
    assert (seqs(page), page["has_more"]) == (expected[1:], True)
    assert page["messages"][0] == await get_message(bob, sent[1]["id"])


async def test_history_bounds_are_exclusive(alice: User, room: Conversation) -> None:
    s = [m["seq"] for m in await fill(alice, room["id"], 6)]
    cid = room["id"]

    async def window(**params: Any) -> tuple[list[int], bool]:
        page = await history(alice, cid, **params)
        return seqs(page), page["has_more"]

    assert await window(before=s[4], limit=2) == (s[2:4], True)
    assert await window(before=s[2], limit=2) == (s[0:2], False)
    assert await window(before=s[0], limit=2) == ([], False)
    assert await window(before=s[5] + 100) == (s, False)
    assert await window(after=s[1], limit=2) == (s[2:4], True)
    assert await window(after=s[3], limit=2) == (s[4:6], False)
    assert await window(after=s[5], limit=2) == ([], False)
    assert await window(after=0) == (s, False)
    assert await window(after=0, limit=5) == (s[:5], True)
    # Both bounds (the spec is silent): the window between them, paged from `after`.
    assert await window(after=s[0], before=s[5]) == (s[1:5], False)
    assert await window(after=s[0], before=s[5], limit=2) == (s[1:3], True)


async def test_walking_history_visits_every_message_exactly_once(
    alice: User, bob: User, carol: User, room: Conversation
) -> None:
    cid = room["id"]
    # Membership events in between leave holes in the messages' seqs.
    sent = await fill(alice, cid, 4, "a")
    assert (await carol.post(f"/conversations/{cid}/join")).status_code == 200
    sent += await fill(bob, cid, 3, "b")
    assert (await carol.post(f"/conversations/{cid}/leave")).status_code == 204
    sent += await fill(alice, cid, 4, "c")
    expected = [m["seq"] for m in sent]
    assert expected != list(range(expected[0], expected[0] + len(expected)))
    for limit in (1, 3, 4, 11, 50):
        await walk(bob, cid, limit, expected)

    # A member sees the whole history, also what came before they joined, unread or not.
    assert (await carol.post(f"/conversations/{cid}/join")).status_code == 200
    assert (await conversation(carol, cid))["unread_count"] == 0
    await walk(carol, cid, 5, expected)


async def test_history_rejects_bad_parameters(
    alice: User, anon: Client, carol: User, room: Conversation, group: Conversation
) -> None:
    await fill(alice, room["id"], 2)
    url = f"/conversations/{room['id']}/messages"
    for params in (
        {"limit": 0},
        {"limit": 101},
        {"limit": -1},
        {"limit": "ten"},
        {"before": -1},
        {"before": "x"},
        {"after": -5},
        {"after": "1.5"},
        {"before": 2**53 + 1},
        {"changed_after": -1},
        {"changed_after": "x"},
        {"changed_after": 0, "before": 5},
        {"changed_after": 0, "after": 1},
    ):
        assert_invalid(await alice.get(url, params=params))
    # Large but well-formed bounds are not errors.
    page = await history(alice, room["id"], before=2**53)
    assert len(page["messages"]) == 2
    assert (await history(alice, room["id"], after=2**53))["messages"] == []
    assert (await history(alice, room["id"], changed_after=2**53))["messages"] == []

    assert_problem(await anon.get(url), 401, "unauthorized")
    unknown = await carol.get(f"/conversations/{unknown_id()}/messages")
    assert_hidden(await carol.get(url), unknown)
    assert_hidden(await carol.get(f"/conversations/{group['id']}/messages"), unknown)
    assert_invalid(await alice.get("/conversations/nope/messages"))


async def test_changed_after_lists_changes_by_updated_seq_with_deletions(
    alice: User, bob: User, room: Conversation
) -> None:
    cid = room["id"]
    m = await fill(alice, cid, 5)
    mark = await last_seq(alice, cid)
    await edit(alice, m[3]["id"], "m3 v2")
    await delete(alice, m[1]["id"])
    await edit(alice, m[0]["id"], "m0 v2")
    await edit(alice, m[3]["id"], "m3 v3")

    page = await history(bob, cid, changed_after=mark)
    assert [x["id"] for x in page["messages"]] == [m[1]["id"], m[0]["id"], m[3]["id"]]
    assert [x["updated_seq"] for x in page["messages"]] == [mark + 2, mark + 3, mark + 4]
    assert page["has_more"] is False
    gone = page["messages"][0]
    assert (gone["deleted"], gone["content"], gone["seq"]) == (True, "", m[1]["seq"])
    assert page["messages"][2]["content"] == "m3 v3"

    # Paged by updated_seq.
    first = await history(bob, cid, changed_after=mark, limit=2)
    assert ([x["id"] for x in first["messages"]], first["has_more"]) == (
        [m[1]["id"], m[0]["id"]],
        True,
    )
    rest = await history(bob, cid, changed_after=first["messages"][-1]["updated_seq"], limit=2)
    assert ([x["id"] for x in rest["messages"]], rest["has_more"]) == ([m[3]["id"]], False)

    # From the start: every message once, by its latest change; new messages count too.
    newest = await send(bob, cid, "new")
    page = await history(bob, cid, changed_after=0)
    order = [m[2], m[4], m[1], m[0], m[3], newest]
    assert [x["id"] for x in page["messages"]] == [x["id"] for x in order]
    assert await history(bob, cid, changed_after=await last_seq(bob, cid)) == {
        "messages": [],
        "has_more": False,
    }


# -- get --------------------------------------------------------------------------------


async def test_get_message_is_for_members_only(
    alice: User, bob: User, carol: User, anon: Client, room: Conversation
) -> None:
    message = await send(alice, room["id"], "members only")
    assert await get_message(bob, message["id"]) == message
    assert_problem(await anon.get(f"/messages/{message['id']}"), 401, "unauthorized")
    unknown = await carol.get(f"/messages/{unknown_id()}")
    assert_hidden(await carol.get(f"/messages/{message['id']}"), unknown)
    assert_invalid(await carol.get("/messages/not-a-uuid"))
    # Leaving ends access, including to what one wrote.
    mine = await send(bob, room["id"], "mine")
    assert (await bob.post(f"/conversations/{room['id']}/leave")).status_code == 204
    assert_hidden(await bob.get(f"/messages/{message['id']}"), unknown)
    assert_hidden(await bob.get(f"/messages/{mine['id']}"), unknown)


async def test_messages_of_a_deleted_conversation_are_gone(
    alice: User, bob: User, admin: User, group: Conversation
) -> None:
    message = await send(bob, group["id"], "soon gone")
    assert (await alice.delete(f"/conversations/{group['id']}")).status_code == 204
    unknown = await bob.get(f"/messages/{unknown_id()}")
    assert_hidden(await bob.get(f"/messages/{message['id']}"), unknown)
    for resp in (
        await bob.patch(f"/messages/{message['id']}", json={"content": "x"}),
        await bob.delete(f"/messages/{message['id']}"),
        await admin.delete(f"/messages/{message['id']}"),
        await bob.get(f"/messages/{message['id']}/history"),
        await bob.get(f"/messages/{message['id']}/receipts"),
    ):
        assert_problem(resp, 404, "not_found")


# -- edit -------------------------------------------------------------------------------


async def test_author_edits_and_history_keeps_the_earlier_contents(
    alice: User, bob: User, room: Conversation
) -> None:
    message = await send(alice, room["id"], "first draft")
    seq = await last_seq(alice, room["id"])

    edited = await edit(alice, message["id"], "second draft")
    assert edited["id"] == message["id"]
    assert edited["content"] == "second draft"
    assert edited["seq"] == message["seq"]
    assert edited["updated_seq"] == seq + 1 == await last_seq(alice, room["id"])
    assert edited["edited_at"] is not None
    assert parse_time(edited["edited_at"]) >= parse_time(message["created_at"])
    assert edited["created_at"] == message["created_at"]
    final = await edit(alice, message["id"], "final")
    assert final["updated_seq"] == seq + 2
    assert parse_time(final["edited_at"]) >= parse_time(edited["edited_at"])

    assert await get_message(bob, message["id"]) == final
    assert (await history(bob, room["id"]))["messages"] == [final]

    body = await versions(bob, message["id"])
    assert set(body) == {"versions", "next_cursor"}
    assert [v["content"] for v in body["versions"]] == ["first draft", "second draft"]
    assert body["next_cursor"] is None
    first, second = body["versions"]
    assert set(first) == {"content", "created_at", "replaced_at"}
    assert parse_time(first["created_at"]) == parse_time(message["created_at"])
    assert parse_time(first["replaced_at"]) == parse_time(edited["edited_at"])
    assert parse_time(second["created_at"]) == parse_time(edited["edited_at"])

    # Paged, without repeats.
    page = await versions(bob, message["id"], limit=1)
    assert [v["content"] for v in page["versions"]] == ["first draft"]
    assert page["next_cursor"]
    page = await versions(bob, message["id"], limit=1, cursor=page["next_cursor"])
    assert [v["content"] for v in page["versions"]] == ["second draft"]
    assert page["next_cursor"] is None


async def test_editing_to_the_same_content_changes_nothing(alice: User, room: Conversation) -> None:
    message = await send(alice, room["id"], "same")
    seq = await last_seq(alice, room["id"])
    again = await edit(alice, message["id"], "same")
    assert again == message
    assert await last_seq(alice, room["id"]) == seq
    assert (await versions(alice, message["id"]))["versions"] == []


async def test_only_the_author_edits(
    alice: User, bob: User, carol: User, admin: User, anon: Client, room: Conversation
) -> None:
    message = await send(bob, room["id"], "bob's words")
    seq = await last_seq(alice, room["id"])
    url = f"/messages/{message['id']}"

    # Not even the room's owner may put words in someone's mouth.
    assert_problem(await alice.patch(url, json={"content": "alice's words"}), 403, "forbidden")
    assert_problem(await anon.patch(url, json={"content": "x"}), 401, "unauthorized")
    unknown = await carol.patch(f"/messages/{unknown_id()}", json={"content": "x"})
    assert_hidden(await carol.patch(url, json={"content": "x"}), unknown)
    # A global admin who is not a member cannot see it, so cannot edit it either.
    assert_hidden(await admin.patch(url, json={"content": "x"}), unknown)
    assert_invalid(await bob.patch("/messages/nope", json={"content": "x"}))

    assert await get_message(bob, message["id"]) == message
    assert await last_seq(alice, room["id"]) == seq
    assert (await versions(bob, message["id"]))["versions"] == []


async def test_edit_rejects_bad_input_and_changes_nothing(alice: User, room: Conversation) -> None:
    message = await send(alice, room["id"], "original")
    seq = await last_seq(alice, room["id"])
    url = f"/messages/{message['id']}"
    bodies: list[Any] = [
        *({"content": "new", name: value} for name, value in FORBIDDEN_FIELDS.items()),
        {"content": "new", "client_msg_id": "x"},
        {"content": "new", "reply_to_id": None},
        {},
        {"content": ""},
        {"content": " \n "},
        {"content": "x" * 4001},
        {"content": None},
        {"content": 5},
        {"content": "nul \x00"},
        [],
    ]
    for body in bodies:
        assert_problem(await alice.patch(url, json=body), 422, "validation_error")
    assert await get_message(alice, message["id"]) == message
    assert await last_seq(alice, room["id"]) == seq
    assert (await versions(alice, message["id"]))["versions"] == []


async def test_a_deleted_message_cannot_be_edited(alice: User, room: Conversation) -> None:
    message = await send(alice, room["id"], "short-lived")
    await delete(alice, message["id"])
    seq = await last_seq(alice, room["id"])
    resp = await alice.patch(f"/messages/{message['id']}", json={"content": "back"})
    assert_problem(resp, 409, "conflict")
    after = await get_message(alice, message["id"])
    assert (after["deleted"], after["content"]) == (True, "")
    assert await last_seq(alice, room["id"]) == seq


async def test_message_history_is_for_members_only(
    alice: User, bob: User, carol: User, anon: Client, room: Conversation
) -> None:
    message = await send(alice, room["id"], "v1")
    await edit(alice, message["id"], "v2")
    url = f"/messages/{message['id']}/history"
    assert_problem(await anon.get(url), 401, "unauthorized")
    assert_hidden(await carol.get(url), await carol.get(f"/messages/{unknown_id()}/history"))
    assert_invalid(await bob.get("/messages/nope/history"))
    for params in ({"limit": 0}, {"limit": 101}, {"cursor": "garbage"}, {"cursor": "W10"}):
        assert_invalid(await bob.get(url, params=params))
    # A message never edited has no earlier versions.
    plain = await send(bob, room["id"], "plain")
    assert await versions(alice, plain["id"]) == {"versions": [], "next_cursor": None}


# -- delete -----------------------------------------------------------------------------


async def test_author_deletes_softly_and_it_stays_in_place(
    alice: User, bob: User, room: Conversation
) -> None:
    cid = room["id"]
    before = await send(alice, cid, "before")
    message = await send(alice, cid, "secret plans for @bob")
    after = await send(alice, cid, "after")
    await edit(alice, message["id"], "secret plans v2 for @bob")
    assert (await conversation(bob, cid))["mention_count"] == 1
    seq = await last_seq(alice, cid)

    await delete(alice, message["id"])
    assert await last_seq(alice, cid) == seq + 1
    gone = await get_message(bob, message["id"])
    assert gone["deleted"] is True
    assert gone["content"] == ""
    assert gone["mentions"] == []
    assert gone["attachments"] == []
    assert gone["seq"] == message["seq"]
    assert gone["updated_seq"] == seq + 1
    assert gone["sender"]["id"] == alice.id
    assert await versions(bob, message["id"]) == {"versions": [], "next_cursor": None}

    page = await history(bob, cid)
    assert [m["id"] for m in page["messages"]] == [before["id"], message["id"], after["id"]]
    assert page["messages"][1] == gone
    assert "secret" not in str(page)

    # Deleting twice is fine and changes nothing.
    await delete(alice, message["id"])
    assert await last_seq(alice, cid) == seq + 1
    assert await get_message(bob, message["id"]) == gone

    # Nothing of it is counted or previewed any more.
    bob_view = await conversation(bob, cid)
    assert bob_view["mention_count"] == 0
    assert bob_view["unread_count"] == 2
    await delete(alice, after["id"])
    preview = (await conversation(bob, cid))["last_message"]
    assert preview is not None
    assert preview["id"] == before["id"]


async def test_owner_admins_and_global_admins_delete_others_messages(
    alice: User, bob: User, dave: User, admin: User, room: Conversation
) -> None:
    cid = room["id"]
    assert (await dave.post(f"/conversations/{cid}/join")).status_code == 200
    resp = await alice.put(f"/conversations/{cid}/members/{dave.id}", json={"role": "admin"})
    assert resp.status_code == 200, resp.text
    by_owner, by_admin, by_root, own = await fill(bob, cid, 4)
    seq = await last_seq(alice, cid)

    await delete(alice, by_owner["id"])
    await delete(dave, by_admin["id"])
    # A global admin may delete any message, also in a conversation they are not in.
    await delete(admin, by_root["id"])
    await delete(bob, own["id"])
    assert await last_seq(alice, cid) == seq + 4
    page = await history(bob, cid)
    assert [m["deleted"] for m in page["messages"]] == [True] * 4
    assert_problem(await admin.delete(f"/messages/{unknown_id()}"), 404, "not_found")

    # An admin of the conversation may also remove the owner's message.
    owners = await send(alice, cid, "owner speaks")
    await delete(dave, owners["id"])
    assert (await get_message(alice, owners["id"]))["deleted"] is True


async def test_members_cannot_delete_others_messages(
    alice: User, bob: User, carol: User, anon: Client, room: Conversation
) -> None:
    message = await send(alice, room["id"], "alice's")
    seq = await last_seq(alice, room["id"])
    url = f"/messages/{message['id']}"
    assert_problem(await bob.delete(url), 403, "forbidden")
    assert_problem(await anon.delete(url), 401, "unauthorized")
    assert_hidden(await carol.delete(url), await carol.delete(f"/messages/{unknown_id()}"))
    assert_invalid(await alice.delete("/messages/not-a-uuid"))
    assert await get_message(bob, message["id"]) == message
    assert await last_seq(alice, room["id"]) == seq


# -- read markers -----------------------------------------------------------------------


async def test_read_marker_moves_forward_only_and_stops_at_last_seq(
    alice: User, bob: User, room: Conversation
) -> None:
    cid = room["id"]
    joined = (await conversation(bob, cid))["last_read_seq"]
    assert joined == (await conversation(bob, cid))["last_seq"]  # nothing unread on joining
    m = await fill(alice, cid, 3)
    view = await conversation(bob, cid)
    assert (view["last_read_seq"], view["unread_count"]) == (joined, 3)

    await mark_read(bob, cid, m[1]["seq"])
    view = await conversation(bob, cid)
    assert (view["last_read_seq"], view["unread_count"]) == (m[1]["seq"], 1)
    # Never back.
    for seq in (m[0]["seq"], 0, m[1]["seq"]):
        await mark_read(bob, cid, seq)
        view = await conversation(bob, cid)
        assert (view["last_read_seq"], view["unread_count"]) == (m[1]["seq"], 1)
    # At most to last_seq, however far the client asks.
    await mark_read(bob, cid, 10**9)
    view = await conversation(bob, cid)
    assert view["last_read_seq"] == view["last_seq"] == m[2]["seq"]
    assert view["unread_count"] == 0
    newer = await send(alice, cid, "newer")
    view = await conversation(bob, cid)
    assert (view["last_read_seq"], view["unread_count"]) == (m[2]["seq"], 1)
    await mark_read(bob, cid, newer["seq"])
    assert (await conversation(bob, cid))["unread_count"] == 0
    # Alice's marker is hers alone.
    assert (await conversation(alice, cid))["last_read_seq"] == newer["seq"]


async def test_sending_moves_the_senders_own_marker(
    alice: User, bob: User, room: Conversation
) -> None:
    cid = room["id"]
    await fill(bob, cid, 2)
    assert (await conversation(alice, cid))["unread_count"] == 2
    mine = await send(alice, cid, "caught up")
    view = await conversation(alice, cid)
    assert (view["last_read_seq"], view["unread_count"]) == (mine["seq"], 0)
    # Bob's unread counts only others' messages, and not deleted ones.
    bob_view = await conversation(bob, cid)
    assert bob_view["unread_count"] == 1
    await delete(alice, mine["id"])
    assert (await conversation(bob, cid))["unread_count"] == 0


async def test_mark_read_rejects_bad_input_and_outsiders(
    alice: User, bob: User, carol: User, anon: Client, room: Conversation, group: Conversation
) -> None:
    cid = room["id"]
    await fill(alice, cid, 2)
    marker = (await conversation(bob, cid))["last_read_seq"]
    url = f"/conversations/{cid}/read"
    for body in (
        {},
        {"seq": -1},
        {"seq": "x"},
        {"seq": 1.5},
        {"seq": None},
        {"seq": 2**53 + 1},
        {"seq": 1, "user_id": alice.id},
        {"seq": 1, "read_at": "2020-01-01T00:00:00Z"},
        [],
    ):
        assert_problem(await bob.post(url, json=body), 422, "validation_error")
    assert_problem(await anon.post(url, json={"seq": 1}), 401, "unauthorized")
    unknown = await carol.post(f"/conversations/{unknown_id()}/read", json={"seq": 1})
    assert_hidden(await carol.post(url, json={"seq": 1}), unknown)
    assert_hidden(await carol.post(f"/conversations/{group['id']}/read", json={"seq": 1}), unknown)
    assert_invalid(await bob.post("/conversations/nope/read", json={"seq": 1}))
    assert (await conversation(bob, cid))["last_read_seq"] == marker


# -- receipts and status ----------------------------------------------------------------


async def test_receipts_list_the_other_members(
    alice: User, bob: User, dave: User, trio: Conversation
) -> None:
    cid = trio["id"]
    message = await send(alice, cid, "did you read this?")
    body = await receipts(alice, message["id"])
    assert set(body) == {"receipts", "next_cursor"}
    assert body["next_cursor"] is None
    by_user = {r["user_id"]: r for r in body["receipts"]}
    assert set(by_user) == {bob.id, dave.id}
    for receipt in by_user.values():
        assert receipt == {
            "user_id": receipt["user_id"],
            "delivered": False,
            "read": False,
            "read_at": None,
        }

    await mark_read(bob, cid, message["seq"])
    by_user = {r["user_id"]: r for r in (await receipts(alice, message["id"]))["receipts"]}
    assert by_user[bob.id]["read"] is True
    assert by_user[bob.id]["delivered"] is True
    assert parse_time(by_user[bob.id]["read_at"]) >= parse_time(message["created_at"])
    assert (by_user[dave.id]["read"], by_user[dave.id]["read_at"]) == (False, None)

    # Any member may ask; the sender read their own message by sending it.
    by_user = {r["user_id"]: r for r in (await receipts(dave, message["id"]))["receipts"]}
    assert set(by_user) == {alice.id, bob.id}
    assert by_user[alice.id]["read"] is True
    assert by_user[alice.id]["read_at"] is not None

    # Paged.
    first = await receipts(alice, message["id"], limit=1)
    assert len(first["receipts"]) == 1
    assert first["next_cursor"]
    second = await receipts(alice, message["id"], limit=1, cursor=first["next_cursor"])
    assert len(second["receipts"]) == 1
    assert second["next_cursor"] is None
    assert {first["receipts"][0]["user_id"], second["receipts"][0]["user_id"]} == {bob.id, dave.id}


async def test_receipts_are_for_members_only(
    alice: User, carol: User, anon: Client, bob: User, trio: Conversation
) -> None:
    message = await send(alice, trio["id"], "private")
    url = f"/messages/{message['id']}/receipts"
    assert_problem(await anon.get(url), 401, "unauthorized")
    assert_hidden(await carol.get(url), await carol.get(f"/messages/{unknown_id()}/receipts"))
    assert_invalid(await bob.get("/messages/nope/receipts"))
    for params in ({"limit": 0}, {"limit": 101}, {"cursor": "garbage"}, {"cursor": "WyJ4Il0"}):
        assert_invalid(await bob.get(url, params=params))


async def test_status_in_a_group_is_read_once_every_other_member_read(
    alice: User, bob: User, dave: User, trio: Conversation
) -> None:
    cid = trio["id"]
    message = await send(alice, cid, "status?")
    assert message["status"] == "sent"
    # Status is for the sender only.
    assert (await get_message(bob, message["id"]))["status"] is None
    await mark_read(bob, cid, message["seq"])
    assert (await get_message(alice, message["id"]))["status"] == "sent"
    await mark_read(dave, cid, message["seq"])
    assert (await get_message(alice, message["id"]))["status"] == "read"
    later = await send(alice, cid, "later")
    page = await history(alice, cid)
    assert [m["status"] for m in page["messages"]] == ["read", "sent"]
    assert page["messages"][1]["id"] == later["id"]


async def test_status_in_a_direct_conversation(
    alice: User, bob: User, direct: Conversation
) -> None:
    cid = direct["id"]
    message = await send(alice, cid, "hi bob")
    assert message["status"] == "sent"
    await mark_read(bob, cid, message["seq"])
    assert (await get_message(alice, message["id"]))["status"] == "read"
    reply = await send(bob, cid, "hi alice")
    assert reply["status"] == "sent"
    assert (await get_message(alice, reply["id"]))["status"] is None
    await mark_read(alice, cid, reply["seq"])
    assert (await get_message(bob, reply["id"]))["status"] == "read"


async def test_status_is_null_in_rooms(alice: User, bob: User, room: Conversation) -> None:
    message = await send(alice, room["id"], "broadcast")
    assert message["status"] is None
    await mark_read(bob, room["id"], message["seq"])
    assert (await get_message(alice, message["id"]))["status"] is None


# -- mentions ---------------------------------------------------------------------------


async def test_mentions_name_members_only(
    alice: User, bob: User, carol: User, room: Conversation
) -> None:
    cid = room["id"]

    async def mentions(content: str) -> list[str]:
        message = await send(alice, cid, content)
        assert (await get_message(bob, message["id"]))["mentions"] == message["mentions"]
        return list(message["mentions"])

    # Carol is not a member; alice naming herself is not a mention; an address is not one.
    assert await mentions("hi @bob, @carol and @alice; mail bob@example.com") == [bob.id]
    assert await mentions("@BOB look") == [bob.id]
    assert await mentions("thanks @bob.") == [bob.id]
    assert await mentions("(@bob) and @bob again") == [bob.id]
    assert await mentions("@nobody, @b, bob, me@bob") == []
    view = await conversation(bob, cid)
    assert view["mention_count"] == 4
    await mark_read(bob, cid, view["last_seq"])
    assert (await conversation(bob, cid))["mention_count"] == 0

    # Members who join later can be mentioned from then on.
    assert (await carol.post(f"/conversations/{cid}/join")).status_code == 200
    assert await mentions("welcome @carol and @bob") in ([carol.id, bob.id], [bob.id, carol.id])
    assert (await conversation(carol, cid))["mention_count"] == 1


async def test_editing_changes_mentions(alice: User, bob: User, room: Conversation) -> None:
    message = await send(alice, room["id"], "no one")
    assert message["mentions"] == []
    assert (await edit(alice, message["id"], "now @bob"))["mentions"] == [bob.id]
    assert (await get_message(bob, message["id"]))["mentions"] == [bob.id]
    assert (await edit(alice, message["id"], "no one again"))["mentions"] == []
    assert (await get_message(bob, message["id"]))["mentions"] == []
