"""§6 search and §4 GET /users/{id}/messages: message lists across conversations.

Both answer `{messages, next_cursor}`, newest first, and only ever show messages of
conversations the caller is a member of.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from tests.conftest import Client, User, assert_hidden, assert_problem, send

Conversation = dict[str, Any]


# -- helpers ----------------------------------------------------------------------------


async def search(user: Client, q: str, **params: Any) -> dict[str, Any]:
    resp = await user.get("/messages/search", params={"q": q, **params})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"messages", "next_cursor"}
    return body


async def found(user: Client, q: str, **params: Any) -> list[str]:
    """Contents of every hit, newest first."""
    page = await search(user, q, **params)
    assert page["next_cursor"] is None
    return [m["content"] for m in page["messages"]]


async def user_messages(user: Client, user_id: str, **params: Any) -> dict[str, Any]:
    resp = await user.get(f"/users/{user_id}/messages", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"messages", "next_cursor"}
    return body


Fetch = Callable[..., Awaitable[dict[str, Any]]]


async def walk(fetch: Fetch, limit: int) -> tuple[list[str], int]:
    """Follow next_cursor to the end; the ids seen in order, and the number of pages."""
    ids: list[str] = []
    page = await fetch(limit=limit)
    pages = 1
    ids += [m["id"] for m in page["messages"]]
    while page["next_cursor"]:
        page = await fetch(limit=limit, cursor=page["next_cursor"])
        assert page["messages"], "next_cursor promised another page"
        ids += [m["id"] for m in page["messages"]]
        pages += 1
    return ids, pages


def cursor_of(*parts: Any) -> str:
    """A well-formed cursor with content the server never gave out."""
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).rstrip(b"=").decode()


def assert_invalid(resp: httpx.Response) -> None:
    body = assert_problem(resp, 422)
    assert body["code"] in ("validation_error", "invalid_cursor"), body


async def new_group(owner: User, *members: User, name: str = "team") -> str:
    resp = await owner.post(
        "/conversations",
        json={"kind": "group", "name": name, "member_ids": [m.id for m in members]},
    )
    assert resp.status_code == 201, resp.text
    conversation_id: str = resp.json()["id"]
    return conversation_id


# -- search -----------------------------------------------------------------------------


async def test_search_is_case_insensitive_and_matches_parts_of_words(
    alice: User, bob: User, room: Conversation
) -> None:
    cid = room["id"]
    await send(alice, cid, "Hello World")
    await send(bob, cid, "say hello")
    await send(alice, cid, "HELLO!!")
    await send(bob, cid, "goodbye")

    assert await found(bob, "ELLO") == ["HELLO!!", "say hello", "Hello World"]
    assert await found(bob, "hello") == ["HELLO!!", "say hello", "Hello World"]
    assert await found(bob, "hElLo wOrLd") == ["Hello World"]
    assert await found(bob, "orl") == ["Hello World"]
    assert await found(bob, "o w") == ["Hello World"]
    assert await found(bob, "dbye") == ["goodbye"]
    assert await found(bob, "hello there") == []
    assert await found(bob, "zzz") == []
    # Short queries still work, case-insensitively.
    assert await found(bob, "OD") == ["goodbye"]
    assert await found(bob, "!") == ["HELLO!!"]
    assert await found(bob, "w") == ["Hello World"]
    assert await found(bob, "H") == ["HELLO!!", "say hello", "Hello World"]

    # Beyond ASCII too, for long and short queries alike.
    await send(alice, cid, "Über den Fluß, ÉTÉ")
    for q in ("über", "ÜBER", "ü", "Ü", "é", "Ét", "été", "FLUß", "ß"):
        assert await found(bob, q) == ["Über den Fluß, ÉTÉ"], q

    page = await search(bob, "goodbye")
    hit = page["messages"][0]
    assert hit == (await bob.get(f"/messages/{hit['id']}")).json()
    assert hit["sender"]["id"] == bob.id


async def test_search_sees_only_the_callers_conversations(
    alice: User, bob: User, carol: User, room: Conversation, group: Conversation
) -> None:
    await send(alice, room["id"], "room secret")
    await send(bob, group["id"], "group secret")
    mine = await new_group(carol, name="carol's")
    await send(carol, mine, "carol secret")

    assert await found(carol, "secret") == ["carol secret"]
    assert await found(carol, "se") == ["carol secret"]
    assert await found(bob, "secret") == ["group secret", "room secret"]
    assert await found(alice, "SECRET") == ["group secret", "room secret"]

    # A member sees the whole history, also what came before they joined …
    assert (await carol.post(f"/conversations/{room['id']}/join")).status_code == 200
    assert await found(carol, "secret") == ["carol secret", "room secret"]
    # … and nothing more once they have left.
    assert (await bob.post(f"/conversations/{group['id']}/leave")).status_code == 204
    assert await found(bob, "secret") == ["room secret"]
    assert await found(bob, "et") == ["room secret"]
    # A deleted conversation takes its messages out of search.
    assert (await alice.delete(f"/conversations/{room['id']}")).status_code == 204
    assert await found(carol, "secret") == ["carol secret"]


async def test_search_filters_by_conversation(
    alice: User, bob: User, carol: User, room: Conversation, group: Conversation
) -> None:
    await send(alice, room["id"], "status report")
    await send(alice, group["id"], "status update")
    assert await found(bob, "status", conversation_id=room["id"]) == ["status report"]
    assert await found(bob, "status", conversation_id=group["id"]) == ["status update"]
    assert await found(bob, "st", conversation_id=group["id"]) == ["status update"]
    assert await found(bob, "status") == ["status update", "status report"]

    unknown = await carol.get(
        "/messages/search", params={"q": "status", "conversation_id": str(uuid.uuid4())}
    )
    for conversation_id in (room["id"], group["id"]):
        resp = await carol.get(
            "/messages/search", params={"q": "status", "conversation_id": conversation_id}
        )
        assert_hidden(resp, unknown)
    resp = await bob.get("/messages/search", params={"q": "status", "conversation_id": "nope"})
    assert_invalid(resp)


async def test_search_pages_newest_first_without_duplicates(
    alice: User, bob: User, room: Conversation
) -> None:
    sent = [await send(alice, room["id"], f"needle {i}") for i in range(7)]
    newest_first = [m["id"] for m in reversed(sent)]

    async def fetch(**params: Any) -> dict[str, Any]:
        return await search(bob, "needle", **params)

    for limit, pages in ((1, 7), (3, 3), (6, 2), (7, 1), (50, 1)):
        assert await walk(fetch, limit) == (newest_first, pages)

    # A message sent while someone pages lands before their first page, not in a later one.
    first = await search(bob, "needle", limit=3)
    await send(alice, room["id"], "needle late")
    rest = await search(bob, "needle", limit=50, cursor=first["next_cursor"])
    assert [m["id"] for m in rest["messages"]] == newest_first[3:]


async def test_a_message_is_findable_as_soon_as_its_send_returns(
    alice: User, bob: User, room: Conversation
) -> None:
    message = await send(alice, room["id"], "fresh words")
    assert await found(bob, "fresh words") == ["fresh words"]
    assert await found(bob, "fr") == ["fresh words"]

    resp = await alice.patch(f"/messages/{message['id']}", json={"content": "renamed words"})
    assert resp.status_code == 200, resp.text
    assert await found(bob, "fresh") == []
    assert await found(bob, "renamed") == ["renamed words"]

    # Deleted: gone, by long and by short queries alike.
    assert (await alice.delete(f"/messages/{message['id']}")).status_code == 204
    assert await found(bob, "renamed") == []
    assert await found(bob, "words") == []
    assert await found(bob, "wo") == []


async def test_search_takes_the_query_literally(alice: User, room: Conversation) -> None:
    for content in ("100% sure", "100 sure", "a_b", "axb", 'say "hi"', "back\\slash", "x*y"):
        await send(alice, room["id"], content)
    assert await found(alice, "0%") == ["100% sure"]
    assert await found(alice, "%") == ["100% sure"]
    assert await found(alice, "% sure") == ["100% sure"]
    assert await found(alice, "_") == ["a_b"]
    assert await found(alice, "a_b") == ["a_b"]
    assert await found(alice, '"hi"') == ['say "hi"']
    assert await found(alice, '"') == ['say "hi"']
    assert await found(alice, "\\") == ["back\\slash"]
    assert await found(alice, "k\\s") == ["back\\slash"]
    assert await found(alice, "*") == ["x*y"]
    assert await found(alice, "x*y") == ["x*y"]
    assert await found(alice, "OR") == []
    assert await found(alice, "sure OR hi") == []


async def test_search_rejects_bad_input(alice: User, anon: Client, room: Conversation) -> None:
    await send(alice, room["id"], "something")
    url = "/messages/search"
    for params in (
        {},
        {"q": ""},
        {"q": "x" * 101},
        {"q": "nul\x00"},
        {"q": "x", "limit": 0},
        {"q": "x", "limit": 101},
        {"q": "x", "cursor": "garbage"},
        {"q": "x", "cursor": cursor_of("x")},
        {"q": "x", "cursor": cursor_of(1, 2)},
        {"q": "x", "cursor": cursor_of("2024-01-01T00:00:00", str(uuid.uuid4()))},
        {"q": "x", "cursor": cursor_of("2024-01-01T00:00:00+00:00", "not-a-uuid")},
        {"q": "x", "cursor": cursor_of("0001-01-01T00:00:00+01:00", str(uuid.uuid4()))},
        {"q": "x", "cursor": cursor_of("2024-01-01", str(uuid.uuid4()))},
        {"q": "x", "cursor": "x" * 600},
    ):
        assert_invalid(await alice.get(url, params=params))
    assert_problem(await anon.get(url, params={"q": "something"}), 401, "unauthorized")
    # The longest query allowed works.
    assert await found(alice, "s" * 100) == []


# -- GET /users/{id}/messages -----------------------------------------------------------


async def test_user_messages_come_only_from_conversations_the_caller_is_in(
    alice: User, bob: User, carol: User, room: Conversation, group: Conversation
) -> None:
    await send(alice, room["id"], "in the room")
    await send(alice, group["id"], "in the group")
    with_carol = await new_group(alice, carol, name="pair")
    await send(alice, with_carol, "with carol")
    await send(bob, room["id"], "bob speaks")

    async def contents(viewer: Client, user: User) -> list[str]:
        page = await user_messages(viewer, user.id)
        assert page["next_cursor"] is None
        assert {m["sender"]["id"] for m in page["messages"]} <= {user.id}
        return [m["content"] for m in page["messages"]]

    assert await contents(bob, alice) == ["in the group", "in the room"]
    assert await contents(carol, alice) == ["with carol"]
    assert await contents(alice, alice) == ["with carol", "in the group", "in the room"]
    assert await contents(alice, bob) == ["bob speaks"]
    assert await contents(carol, bob) == []

    # Deleted messages are not listed (their content is gone anyway).
    page = await user_messages(bob, alice.id)
    resp = await alice.delete(f"/messages/{page['messages'][0]['id']}")
    assert resp.status_code == 204
    assert await contents(bob, alice) == ["in the room"]


async def test_user_messages_page_without_duplicates(
    alice: User, bob: User, room: Conversation
) -> None:
    sent = [await send(alice, room["id"], f"note {i}") for i in range(5)]
    newest_first = [m["id"] for m in reversed(sent)]

    async def fetch(**params: Any) -> dict[str, Any]:
        return await user_messages(bob, alice.id, **params)

    for limit, pages in ((1, 5), (2, 3), (5, 1)):
        assert await walk(fetch, limit) == (newest_first, pages)


async def test_user_messages_reject_bad_input(
    alice: User, anon: Client, room: Conversation
) -> None:
    await send(alice, room["id"], "hi")
    url = f"/users/{alice.id}/messages"
    assert_problem(await anon.get(url), 401, "unauthorized")
    assert_problem(await alice.get(f"/users/{uuid.uuid4()}/messages"), 404, "not_found")
    assert_invalid(await alice.get("/users/nope/messages"))
    for params in ({"limit": 0}, {"limit": 101}, {"cursor": "garbage"}, {"cursor": cursor_of(1)}):
        assert_invalid(await alice.get(url, params=params))
