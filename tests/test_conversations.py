"""§5 Conversations, as a user sees them through the REST API.

Each test is a small story told with the named fixtures: `alice` owns the public room
`room` (bob joined) and the private group `group` (bob added); `carol` is the outsider;
`admin` is a global admin. Membership changes are checked against the conversation's
one sequence (§6): every join, leave, kick, ban and role change takes exactly one seq.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson
from fastapi import FastAPI

from tests.conftest import AppFactory, Client, User, UserFactory, assert_problem, send

CONVERSATION_FIELDS = {
    "id",
    "kind",
    "name",
    "topic",
    "created_at",
    "updated_at",
    "member_count",
    "last_seq",
    "last_message",
    "my_role",
    "last_read_seq",
    "unread_count",
    "mention_count",
}
MEMBER_FIELDS = {"conversation_id", "user_id", "role", "joined_at", "username", "display_name"}
MEMBERSHIP_FIELDS = {"conversation_id", "user_id", "role", "joined_at"}
NOWHERE = "00000000-0000-4000-8000-000000000000"  # a well-formed id that names nothing


# -- helpers ----------------------------------------------------------------------------


async def get_conv(user: Client, conversation_id: str) -> dict[str, Any]:
    resp = await user.get(f"/conversations/{conversation_id}")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def create(
    user: User, kind: str = "group", name: str = "team", **fields: Any
) -> dict[str, Any]:
    resp = await user.post("/conversations", json={"kind": kind, "name": name, **fields})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def put_member(
    owner: User, conversation_id: str, user_id: str, role: str | None = None
) -> dict[str, Any]:
    body = {"role": role} if role else None
    resp = await owner.put(f"/conversations/{conversation_id}/members/{user_id}", json=body)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def member_roles(user: Client, conversation_id: str) -> dict[str, str]:
    resp = await user.get(f"/conversations/{conversation_id}/members")
    assert resp.status_code == 200, resp.text
    return {m["username"]: m["role"] for m in resp.json()["members"]}


async def my_ids(user: Client, **params: Any) -> list[str]:
    resp = await user.get("/conversations", params=params)
    assert resp.status_code == 200, resp.text
    return [c["id"] for c in resp.json()["conversations"]]


async def walk(user: Client, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a cursor-paginated list, page by page."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        resp = await user.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {key, "next_cursor"}
        items.extend(body[key])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the cursor never ran out")


def forged_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).rstrip(b"=").decode()


async def send_raw_json(user: Client, method: str, path: str, raw: str) -> httpx.Response:
    """A body httpx would refuse to encode, such as a lone surrogate escape."""
    headers = {"Content-Type": "application/json"}
    return await user.request(method, path, content=raw.encode(), headers=headers)


def assert_utc(timestamp: str) -> None:
    assert datetime.fromisoformat(timestamp.replace("Z", "+00:00")).utcoffset() == timedelta(0)


def per_conversation_endpoints(cid: str, uid: str) -> list[tuple[str, str, Any]]:
    """Every §5 endpoint that names one conversation, with a body that would be valid."""
    return [
        ("GET", f"/conversations/{cid}", None),
        ("PATCH", f"/conversations/{cid}", {"name": "renamed"}),
        ("DELETE", f"/conversations/{cid}", None),
        ("POST", f"/conversations/{cid}/join", None),
        ("POST", f"/conversations/{cid}/leave", None),
        ("GET", f"/conversations/{cid}/members", None),
        ("PUT", f"/conversations/{cid}/members/{uid}", {"role": "member"}),
        ("DELETE", f"/conversations/{cid}/members/{uid}", None),
        ("POST", f"/conversations/{cid}/bans/{uid}", None),
        ("DELETE", f"/conversations/{cid}/bans/{uid}", None),
    ]


async def call(user: Client, method: str, path: str, body: Any) -> httpx.Response:
    kwargs = {"json": body} if body is not None else {}
    return await user.request(method, path, **kwargs)


# -- every endpoint: anonymous, outsider, malformed ids ---------------------------------


async def test_anonymous_caller_gets_401_everywhere_and_nothing_changes(
    anon: Client, alice: User, bob: User, room: dict[str, Any]
) -> None:
    before = await get_conv(alice, room["id"])
    endpoints = [
        ("POST", "/conversations", {"kind": "room", "name": "x"}),
        ("POST", "/conversations/direct", {"user_id": alice.id}),
        ("GET", "/conversations", None),
        ("GET", "/conversations/public", None),
        *per_conversation_endpoints(room["id"], bob.id),
    ]
    forged = Client(anon.app, token="not-a-token")
    for method, path, body in endpoints:
        for caller in (anon, forged):
            resp = await call(caller, method, path, body)
            assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].lower().startswith("bearer")
    after = await get_conv(alice, room["id"])
    assert after == before
    assert await member_roles(alice, room["id"]) == {"alice": "owner", "bob": "member"}
    assert await my_ids(alice) == [room["id"]]


async def test_outsider_gets_404_exactly_as_for_a_missing_conversation(
    alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    direct = (await alice.post("/conversations/direct", json={"user_id": bob.id})).json()
    before = {c: await get_conv(alice, c) for c in (group["id"], direct["id"])}
    for cid in (group["id"], direct["id"], NOWHERE):
        for method, path, body in per_conversation_endpoints(cid, bob.id):
            resp = await call(carol, method, path, body)
            problem = assert_problem(resp, 404, "not_found")
            missing = await call(carol, method, path.replace(cid, NOWHERE), body)
            assert problem["detail"] == missing.json()["detail"], (method, path)
    # Nothing was written by any of those attempts.
    for cid, view in before.items():
        assert await get_conv(alice, cid) == view
    assert await member_roles(alice, group["id"]) == {"alice": "owner", "bob": "member"}
    assert await my_ids(carol) == []


async def test_malformed_ids_in_the_path_get_422(
    alice: User, bob: User, group: dict[str, Any]
) -> None:
    before = await get_conv(alice, group["id"])
    for bad in ("not-a-uuid", "1234", "' OR 1=1 --"):
        for method, path, body in per_conversation_endpoints(bad, bob.id):
            problem = assert_problem(await call(alice, method, path, body), 422, "validation_error")
            assert problem["errors"], path
        for method, path, body in per_conversation_endpoints(group["id"], bad)[6:]:
            assert_problem(await call(alice, method, path, body), 422, "validation_error")
    assert await get_conv(alice, group["id"]) == before


# -- POST /conversations ----------------------------------------------------------------


async def test_create_group_makes_the_creator_owner_and_each_member_takes_a_seq(
    alice: User, bob: User, carol: User
) -> None:
    resp = await alice.post(
        "/conversations",
        json={
            "kind": "group",
            "name": "  launch  ",
            "topic": "ship it",
            # Duplicates and the creator herself are folded away.
            "member_ids": [bob.id, carol.id, bob.id, alice.id],
        },
    )
    assert resp.status_code == 201, resp.text
    group = resp.json()
    assert set(group) == CONVERSATION_FIELDS
    assert group["kind"] == "group"
    assert group["name"] == "launch"
    assert group["topic"] == "ship it"
    assert group["my_role"] == "owner"
    assert group["member_count"] == 3
    assert group["last_seq"] == 3  # alice, bob and carol joined: one seq each
    assert group["last_message"] is None
    assert group["unread_count"] == 0
    assert group["mention_count"] == 0
    assert group["last_read_seq"] == 1
    assert_utc(group["created_at"])
    assert_utc(group["updated_at"])
    uuid.UUID(group["id"])

    seen_by_bob = await get_conv(bob, group["id"])
    assert seen_by_bob["my_role"] == "member"
    assert seen_by_bob["last_read_seq"] == 2
    assert await member_roles(alice, group["id"]) == {
        "alice": "owner",
        "bob": "member",
        "carol": "member",
    }
    # The next seq goes to the first message: the sequence is shared.
    assert (await send(bob, group["id"], "hi"))["seq"] == 4


async def test_create_room_alone(alice: User) -> None:
    room = await create(alice, "room", "lobby", topic="   ")
    assert room["kind"] == "room"
    assert room["topic"] is None  # a blank topic is no topic
    assert room["member_count"] == 1
    assert room["last_seq"] == 1
    assert room["my_role"] == "owner"


async def test_create_rejects_bad_input_and_writes_nothing(
    alice: User, bob: User, make_user: UserFactory
) -> None:
    bad_bodies: list[Any] = [
        {"kind": "room", "name": "x", "seq": 5},
        {"kind": "room", "name": "x", "role": "admin"},
        {"kind": "room", "name": "x", "created_at": "2020-01-01T00:00:00Z"},
        {"kind": "direct", "name": "x"},
        {"kind": "channel", "name": "x"},
        {"name": "x"},
        {"kind": "room"},
        {"kind": "room", "name": ""},
        {"kind": "room", "name": "   "},
        {"kind": "room", "name": None},
        {"kind": "room", "name": "n" * 101},
        {"kind": "room", "name": "x", "topic": "t" * 501},
        {"kind": "room", "name": "nul\x00byte"},
        {"kind": "room", "name": "x", "topic": "nul\x00byte"},
        {"kind": "group", "name": "x", "member_ids": "everyone"},
        {"kind": "group", "name": "x", "member_ids": ["not-a-uuid"]},
        {"kind": "group", "name": "x", "member_ids": [str(uuid.uuid4()) for _ in range(101)]},
        {"kind": "group", "name": "x", "member_ids": [bob.id, NOWHERE]},
        [],
    ]
    for body in bad_bodies:
        problem = assert_problem(await alice.post("/conversations", json=body), 422)
        assert problem["code"] == "validation_error", body
        assert problem["errors"], body
    for raw in (
        r'{"kind": "room", "name": "lone \ud800 surrogate"}',
        r'{"kind": "room", "name": "x", "topic": "\udfff"}',
    ):
        resp = await send_raw_json(alice, "POST", "/conversations", raw)
        assert_problem(resp, 422, "validation_error")
    # The bounds themselves are allowed.
    users = [await make_user() for _ in range(2)]
    ok = await create(alice, "group", "n" * 100, topic="t" * 500, member_ids=[u.id for u in users])
    assert ok["member_count"] == 3
    # No conversation was half-made by the rejected requests: bob is in none of them.
    assert await my_ids(alice) == [ok["id"]]
    assert await my_ids(bob) == []
    public = (await alice.get("/conversations/public")).json()
    assert public == {"conversations": [], "next_cursor": None}


# -- POST /conversations/direct ---------------------------------------------------------


async def test_direct_is_one_per_pair_and_named_after_the_other_person(
    alice: User, bob: User, carol: User
) -> None:
    first = await alice.post("/conversations/direct", json={"user_id": bob.id})
    assert first.status_code == 201, first.text
    direct = first.json()
    assert set(direct) == CONVERSATION_FIELDS
    assert direct["kind"] == "direct"
    assert direct["member_count"] == 2
    assert direct["last_seq"] == 2
    assert direct["my_role"] == "member"
    assert direct["name"] == "Bob"  # bob's display name

    again = await alice.post("/conversations/direct", json={"user_id": bob.id})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == direct["id"]
    other_side = await bob.post("/conversations/direct", json={"user_id": alice.id})
    assert other_side.status_code == 200, other_side.text
    assert other_side.json()["id"] == direct["id"]
    assert other_side.json()["name"] == "Alice Liddell"
    assert other_side.json()["last_seq"] == 2  # nothing new was taken

    # carol has no display name: her username stands in.
    with_carol = await alice.post("/conversations/direct", json={"user_id": carol.id})
    assert with_carol.status_code == 201
    assert with_carol.json()["name"] == "carol"
    assert with_carol.json()["id"] != direct["id"]
    listed = {
        c["id"]: c["name"] for c in (await alice.get("/conversations")).json()["conversations"]
    }
    assert listed == {direct["id"]: "Bob", with_carol.json()["id"]: "carol"}
    assert (await get_conv(carol, with_carol.json()["id"]))["name"] == "Alice Liddell"
    assert await my_ids(bob) == [direct["id"]]


async def test_direct_rejects_yourself_unknown_users_and_bad_bodies(alice: User, bob: User) -> None:
    assert_problem(await alice.post("/conversations/direct", json={"user_id": alice.id}), 422)
    assert_problem(
        await alice.post("/conversations/direct", json={"user_id": NOWHERE}), 404, "not_found"
    )
    for body in (
        {},
        {"user_id": "bob"},
        {"user_id": bob.id, "name": "us"},
        {"user_id": bob.id, "kind": "group"},
        {"user_ids": [bob.id]},
    ):
        assert_problem(
            await alice.post("/conversations/direct", json=body), 422, "validation_error"
        )
    assert await my_ids(alice) == []
    assert await my_ids(bob) == []


async def test_direct_cannot_be_renamed_deleted_left_joined_or_managed(
    alice: User, bob: User, carol: User, admin: User
) -> None:
    direct = (await alice.post("/conversations/direct", json={"user_id": bob.id})).json()
    cid = direct["id"]
    for method, path, body in (
        ("PATCH", f"/conversations/{cid}", {"name": "ours"}),
        ("DELETE", f"/conversations/{cid}", None),
        ("POST", f"/conversations/{cid}/leave", None),
        ("POST", f"/conversations/{cid}/join", None),
        ("PUT", f"/conversations/{cid}/members/{carol.id}", None),
        ("PUT", f"/conversations/{cid}/members/{bob.id}", {"role": "admin"}),
        ("DELETE", f"/conversations/{cid}/members/{bob.id}", None),
        ("POST", f"/conversations/{cid}/bans/{bob.id}", None),
        ("DELETE", f"/conversations/{cid}/bans/{bob.id}", None),
    ):
        assert_problem(await call(alice, method, path, body), 403, "forbidden")
    # Not even a global admin deletes a direct conversation.
    assert_problem(await admin.delete(f"/conversations/{cid}"), 403, "forbidden")
    after = await get_conv(alice, cid)
    assert after["last_seq"] == 2
    assert after["member_count"] == 2
    assert after["name"] == "Bob"
    assert await member_roles(bob, cid) == {"alice": "member", "bob": "member"}


async def test_direct_get_or_create_races_make_one_conversation(alice: User, bob: User) -> None:
    responses = await asyncio.gather(
        alice.post("/conversations/direct", json={"user_id": bob.id}),
        bob.post("/conversations/direct", json={"user_id": alice.id}),
        alice.post("/conversations/direct", json={"user_id": bob.id}),
        bob.post("/conversations/direct", json={"user_id": alice.id}),
    )
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert {r.json()["last_seq"] for r in responses} == {2}
    assert await my_ids(alice) == await my_ids(bob) == [responses[0].json()["id"]]


# -- GET /conversations -----------------------------------------------------------------


async def test_list_puts_the_most_recent_activity_first_with_a_preview(
    alice: User, bob: User
) -> None:
    first = await create(alice, "group", "first", member_ids=[bob.id])
    second = await create(alice, "room", "second")
    third = await create(alice, "group", "third")
    assert await my_ids(alice) == [third["id"], second["id"], first["id"]]

    await send(bob, first["id"], "first " + "x" * 300)
    body = (await alice.get("/conversations")).json()
    assert set(body) == {"conversations", "next_cursor"}
    assert body["next_cursor"] is None
    assert [c["id"] for c in body["conversations"]] == [first["id"], third["id"], second["id"]]
    top = body["conversations"][0]
    assert set(top) == CONVERSATION_FIELDS
    preview = top["last_message"]
    assert preview["content"].startswith("first xxx")
    assert len(preview["content"]) < 306  # a preview, not the whole message
    assert preview["sender"]["username"] == "bob"
    assert preview["seq"] == top["last_seq"] == 3
    assert body["conversations"][1]["last_message"] is None

    await send(alice, second["id"], "now second")
    assert await my_ids(alice) == [second["id"], first["id"], third["id"]]
    assert await my_ids(bob) == [first["id"]]


async def test_list_pages_with_a_cursor_that_never_skips_or_repeats(alice: User, bob: User) -> None:
    ids = [(await create(alice, "group", f"c{i}", member_ids=[bob.id]))["id"] for i in range(5)]
    await send(bob, ids[2], "bump")
    expected = [ids[2], ids[4], ids[3], ids[1], ids[0]]
    walked = await walk(alice, "/conversations", "conversations", limit=1)
    assert [c["id"] for c in walked] == expected
    assert await my_ids(alice, limit=100) == expected

    # The order changes mid-walk: a conversation on a later page becomes the most
    # recent. The rest are still each seen once.
    page = (await alice.get("/conversations", params={"limit": 2})).json()
    assert [c["id"] for c in page["conversations"]] == expected[:2]
    await send(bob, ids[0], "bump the oldest")
    rest = await walk(alice, "/conversations", "conversations", limit=2, cursor=page["next_cursor"])
    assert [c["id"] for c in rest] == [ids[3], ids[1]]


async def test_list_rejects_bad_limits_and_cursors(alice: User, group: dict[str, Any]) -> None:
    for params in (
        {"limit": 0},
        {"limit": 101},
        {"limit": -1},
        {"limit": "ten"},
        {"cursor": "c" * 513},
    ):
        assert_problem(await alice.get("/conversations", params=params), 422, "validation_error")
    for cursor in (
        "garbage!",
        forged_cursor(1),
        forged_cursor("yesterday", group["id"]),
        forged_cursor("2024-01-01T00:00:00+00:00", "not-a-uuid"),
        forged_cursor("2024-01-01T00:00:00", group["id"]),  # no time zone
        forged_cursor("0001-01-01T00:00:00+01:00", group["id"]),  # before year 1 in UTC
        forged_cursor(["nested"], {"a": 1}),
    ):
        assert_problem(
            await alice.get("/conversations", params={"cursor": cursor}), 422, "invalid_cursor"
        )
    assert (await alice.get("/conversations", params={"limit": 100})).status_code == 200


# -- unread_count, last_read_seq, mention_count -----------------------------------------


async def test_unread_counts_others_live_messages_after_the_read_marker(
    alice: User, bob: User, carol: User, room: dict[str, Any]
) -> None:
    joined_seq = (await get_conv(bob, room["id"]))["last_read_seq"]
    assert joined_seq == 2  # alice's creation took 1, bob's join 2

    m1 = await send(alice, room["id"], "one")
    await send(alice, room["id"], "two")
    await send(alice, room["id"], "@bob have a look, and @carol too")  # carol is no member
    seen = await get_conv(bob, room["id"])
    assert seen["unread_count"] == 3
    assert seen["mention_count"] == 1
    assert seen["last_read_seq"] == joined_seq
    # Her own messages are never unread for alice; sending moved her marker along.
    mine = await get_conv(alice, room["id"])
    assert mine["unread_count"] == 0
    assert mine["last_read_seq"] == mine["last_seq"] == 5

    assert (await alice.delete(f"/messages/{m1['id']}")).status_code == 204
    assert (await get_conv(bob, room["id"]))["unread_count"] == 2

    # Sending moves bob's own marker to his message: nothing before it is unread.
    reply = await send(bob, room["id"], "read it all")
    seen = await get_conv(bob, room["id"])
    assert seen["unread_count"] == 0
    assert seen["mention_count"] == 0
    assert seen["last_read_seq"] == reply["seq"]
    assert (await get_conv(alice, room["id"]))["unread_count"] == 1

    # A newcomer sees the whole history, but none of it counts as unread.
    assert (await carol.post(f"/conversations/{room['id']}/join")).status_code == 200
    fresh = await get_conv(carol, room["id"])
    assert fresh["unread_count"] == 0
    assert fresh["mention_count"] == 0
    assert fresh["last_read_seq"] == fresh["last_seq"]
    history = (await carol.get(f"/conversations/{room['id']}/messages")).json()["messages"]
    assert len(history) == 4  # three of alice's (one deleted) and bob's

    await send(alice, room["id"], "welcome @carol")
    fresh = await get_conv(carol, room["id"])
    assert (fresh["unread_count"], fresh["mention_count"]) == (1, 1)
    listed = (await carol.get("/conversations")).json()["conversations"][0]
    assert (listed["unread_count"], listed["mention_count"]) == (1, 1)
    resp = await carol.post(f"/conversations/{room['id']}/read", json={"seq": fresh["last_seq"]})
    assert resp.status_code == 204
    fresh = await get_conv(carol, room["id"])
    assert (fresh["unread_count"], fresh["mention_count"]) == (0, 0)


# -- GET /conversations/public ----------------------------------------------------------


async def test_public_lists_only_rooms_filtered_and_paged(
    alice: User, bob: User, carol: User
) -> None:
    names = ["alpha", "Beta", "gamma team", "100%", "Éb", "éa", "Ölraum", "zeta"]
    rooms = {name: await create(alice, "room", name) for name in names}
    await send(alice, rooms["alpha"]["id"], "secret for members")
    await create(alice, "group", "alpha group", member_ids=[carol.id])
    await alice.post("/conversations/direct", json={"user_id": carol.id})

    everything = (await carol.get("/conversations/public", params={"limit": 100})).json()
    assert everything["next_cursor"] is None
    listed = everything["conversations"]
    assert sorted(c["name"] for c in listed) == sorted(names)
    assert {c["kind"] for c in listed} == {"room"}
    for view in listed:
        assert set(view) == CONVERSATION_FIELDS
        assert view["my_role"] is None  # carol has joined none of them
        assert view["last_message"] is None  # only members read messages
        assert view["member_count"] == 1
    # By name, case-insensitively: "Beta" sits between "alpha" and "gamma team".
    ascii_names = [c["name"] for c in listed if c["name"].isascii()]
    assert ascii_names == ["100%", "alpha", "Beta", "gamma team", "zeta"]

    walked = await walk(carol, "/conversations/public", "conversations", limit=1)
    assert [c["id"] for c in walked] == [c["id"] for c in listed]

    async def search(q: str) -> list[str]:
        resp = await carol.get("/conversations/public", params={"q": q})
        assert resp.status_code == 200, resp.text
        return [c["name"] for c in resp.json()["conversations"]]

    assert await search("alp") == ["alpha"]  # the group named "alpha group" stays hidden
    assert await search("GAMMA") == ["gamma team"]
    assert await search("eta") == ["Beta", "zeta"]
    assert await search("%") == ["100%"]  # a wildcard character is matched literally
    assert await search("_") == []
    assert await search("nothing like it") == []
    walked = await walk(carol, "/conversations/public", "conversations", limit=1, q="eta")
    assert [c["name"] for c in walked] == ["Beta", "zeta"]

    # Joined rooms still show, now with the caller's role.
    assert (await bob.post(f"/conversations/{rooms['zeta']['id']}/join")).status_code == 200
    seen = (await bob.get("/conversations/public", params={"q": "zeta"})).json()["conversations"]
    assert [(c["name"], c["my_role"], c["member_count"]) for c in seen] == [("zeta", "member", 2)]


async def test_public_rejects_bad_input(alice: User, room: dict[str, Any]) -> None:
    for params in (
        {"limit": 0},
        {"limit": 101},
        {"q": "q" * 101},
        {"q": "nul\x00byte"},
    ):
        assert_problem(
            await alice.get("/conversations/public", params=params), 422, "validation_error"
        )
    for cursor in ("%%%", forged_cursor("general"), forged_cursor("general", "nope")):
        resp = await alice.get("/conversations/public", params={"cursor": cursor})
        assert_problem(resp, 422, "invalid_cursor")


# -- GET /conversations/{id} ------------------------------------------------------------


async def test_get_one_for_members_and_any_user_for_a_room(
    alice: User, bob: User, carol: User, room: dict[str, Any], group: dict[str, Any]
) -> None:
    await send(alice, room["id"], "hello room")
    for user in (alice, bob):
        seen = await get_conv(user, group["id"])
        assert set(seen) == CONVERSATION_FIELDS
        assert seen["id"] == group["id"]
        assert seen["name"] == "team"
    assert (await get_conv(bob, room["id"]))["last_message"]["content"] == "hello room"
    # Anyone may look at a room before joining, but not read its messages.
    outside = await get_conv(carol, room["id"])
    assert outside["my_role"] is None
    assert outside["member_count"] == 2
    assert outside["last_seq"] == 3
    assert outside["last_message"] is None
    assert outside["unread_count"] == 0
    assert_problem(await carol.get(f"/conversations/{room['id']}/messages"), 404, "not_found")
    assert_problem(await carol.get(f"/conversations/{group['id']}"), 404, "not_found")


# -- PATCH /conversations/{id} ----------------------------------------------------------


async def test_owner_and_admins_rename_members_cannot(
    alice: User, bob: User, group: dict[str, Any]
) -> None:
    path = f"/conversations/{group['id']}"
    assert_problem(await bob.patch(path, json={"name": "bob's now"}), 403, "forbidden")

    resp = await alice.patch(path, json={"name": "  Team A  ", "topic": "planning"})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == CONVERSATION_FIELDS
    assert (resp.json()["name"], resp.json()["topic"], resp.json()["my_role"]) == (
        "Team A",
        "planning",
        "owner",
    )
    seen = await get_conv(bob, group["id"])
    assert (seen["name"], seen["topic"]) == ("Team A", "planning")

    await put_member(alice, group["id"], bob.id, "admin")
    resp = await bob.patch(path, json={"topic": None})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["name"], resp.json()["topic"]) == ("Team A", None)  # name untouched
    assert resp.json()["my_role"] == "admin"


async def test_patch_rejects_bad_input_and_changes_nothing(
    alice: User, group: dict[str, Any]
) -> None:
    path = f"/conversations/{group['id']}"
    await alice.patch(path, json={"topic": "kept"})
    before = await get_conv(alice, group["id"])
    for body in (
        {"name": None},
        {"name": ""},
        {"name": "  "},
        {"name": "n" * 101},
        {"topic": "t" * 501},
        {"name": "nul\x00byte"},
        {"kind": "room"},
        {"name": "ok", "last_seq": 99},
        {"name": "ok", "member_count": 0},
        ["name"],
    ):
        assert_problem(await alice.patch(path, json=body), 422, "validation_error")
    resp = await send_raw_json(alice, "PATCH", path, r'{"name": "\ud83d"}')
    assert_problem(resp, 422, "validation_error")
    assert await get_conv(alice, group["id"]) == before


# -- DELETE /conversations/{id} ---------------------------------------------------------


async def test_owner_deletes_and_then_it_is_gone_for_everyone(
    alice: User, bob: User, carol: User, room: dict[str, Any]
) -> None:
    message = await send(bob, room["id"], "soon gone")
    await put_member(alice, room["id"], bob.id, "admin")
    assert_problem(await bob.delete(f"/conversations/{room['id']}"), 403, "forbidden")
    assert (await get_conv(bob, room["id"]))["member_count"] == 2

    assert (await alice.delete(f"/conversations/{room['id']}")).status_code == 204
    for user in (alice, bob, carol):
        assert_problem(await user.get(f"/conversations/{room['id']}"), 404, "not_found")
        assert_problem(await user.post(f"/conversations/{room['id']}/join"), 404, "not_found")
        assert await my_ids(user) == []
        assert (await user.get("/conversations/public")).json()["conversations"] == []
    assert_problem(await bob.get(f"/conversations/{room['id']}/messages"), 404, "not_found")
    assert_problem(await bob.get(f"/messages/{message['id']}"), 404, "not_found")
    assert_problem(await bob.get(f"/conversations/{room['id']}/members"), 404, "not_found")
    assert_problem(await alice.delete(f"/conversations/{room['id']}"), 404, "not_found")


async def test_only_the_owner_or_a_global_admin_deletes(
    alice: User, bob: User, admin: User, group: dict[str, Any]
) -> None:
    assert_problem(await bob.delete(f"/conversations/{group['id']}"), 403, "forbidden")
    assert (await get_conv(alice, group["id"]))["member_count"] == 2
    # The global admin is no member, yet may delete it.
    assert (await admin.delete(f"/conversations/{group['id']}")).status_code == 204
    assert_problem(await alice.get(f"/conversations/{group['id']}"), 404, "not_found")
    assert_problem(await admin.delete(f"/conversations/{NOWHERE}"), 404, "not_found")


# -- POST /conversations/{id}/join ------------------------------------------------------


async def test_join_a_room_is_idempotent(alice: User, carol: User, room: dict[str, Any]) -> None:
    path = f"/conversations/{room['id']}/join"
    before = await get_conv(alice, room["id"])
    resp = await carol.post(path)
    assert resp.status_code == 200, resp.text
    membership = resp.json()
    assert set(membership) == MEMBERSHIP_FIELDS
    assert membership["conversation_id"] == room["id"]
    assert membership["user_id"] == carol.id
    assert membership["role"] == "member"
    assert_utc(membership["joined_at"])
    after = await get_conv(alice, room["id"])
    assert after["last_seq"] == before["last_seq"] + 1
    assert after["member_count"] == before["member_count"] + 1

    again = await carol.post(path)
    assert again.status_code == 200
    assert again.json() == membership  # same joined_at: nothing new happened
    assert await get_conv(alice, room["id"]) == after
    assert (await get_conv(carol, room["id"]))["my_role"] == "member"
    assert carol.id in {
        m["user_id"]
        for m in (await carol.get(f"/conversations/{room['id']}/members")).json()["members"]
    }
    # The owner "joining" her own room changes nothing either.
    assert (await alice.post(path)).json()["role"] == "owner"
    assert await get_conv(alice, room["id"]) == after


async def test_join_is_for_rooms_only(
    alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    assert_problem(await carol.post(f"/conversations/{group['id']}/join"), 404, "not_found")
    # A member of a group cannot "join" it either: groups are joined by being added.
    assert_problem(await bob.post(f"/conversations/{group['id']}/join"), 403, "forbidden")
    assert_problem(await carol.post(f"/conversations/{NOWHERE}/join"), 404, "not_found")
    seen = await get_conv(alice, group["id"])
    assert (seen["member_count"], seen["last_seq"]) == (2, 2)
    assert_problem(
        await carol.post(f"/conversations/{group['id']}/join", json={"role": "owner"}), 404
    )


async def test_concurrent_joins_add_the_member_once(
    alice: User, carol: User, room: dict[str, Any]
) -> None:
    before = await get_conv(alice, room["id"])
    responses = await asyncio.gather(
        *(carol.post(f"/conversations/{room['id']}/join") for _ in range(4))
    )
    assert [r.status_code for r in responses] == [200] * 4
    assert len({r.json()["joined_at"] for r in responses}) == 1
    after = await get_conv(alice, room["id"])
    assert after["last_seq"] == before["last_seq"] + 1
    assert after["member_count"] == before["member_count"] + 1


async def test_member_limit_refuses_more_members_and_writes_nothing(
    app: FastAPI, app_factory: AppFactory
) -> None:
    # A second app on the same (freshly emptied) database, with room for two members.
    small = await app_factory(max_members=2)
    anon = Client(small)
    users, ids = [], []
    for name in ("ann", "ben", "cat"):
        resp = await anon.post(
            "/auth/register", json={"username": name, "password": "correct horse battery"}
        )
        assert resp.status_code == 201, resp.text
        users.append(Client(small, token=resp.json()["access_token"]))
        ids.append(resp.json()["user"]["id"])
    ann, ben, cat = users
    resp = await ann.post("/conversations", json={"kind": "group", "name": "g", "member_ids": ids})
    assert_problem(resp, 409, "conversation_full")
    assert (await ann.get("/conversations")).json()["conversations"] == []

    room = (await ann.post("/conversations", json={"kind": "room", "name": "r"})).json()
    assert (await ben.post(f"/conversations/{room['id']}/join")).status_code == 200
    assert_problem(await cat.post(f"/conversations/{room['id']}/join"), 409, "conversation_full")
    resp = await ann.put(f"/conversations/{room['id']}/members/{ids[2]}")
    assert_problem(resp, 409, "conversation_full")
    seen = (await ann.get(f"/conversations/{room['id']}")).json()
    assert (seen["member_count"], seen["last_seq"]) == (2, 2)


# -- POST /conversations/{id}/leave -----------------------------------------------------


async def test_leave_takes_one_seq_and_ends_access(
    alice: User, bob: User, room: dict[str, Any], group: dict[str, Any]
) -> None:
    for conversation in (room, group):
        path = f"/conversations/{conversation['id']}"
        before = await get_conv(alice, conversation["id"])
        assert (await bob.post(f"{path}/leave")).status_code == 204
        after = await get_conv(alice, conversation["id"])
        assert after["last_seq"] == before["last_seq"] + 1
        assert after["member_count"] == before["member_count"] - 1
        assert await member_roles(alice, conversation["id"]) == {"alice": "owner"}
        assert_problem(await bob.get(f"{path}/messages"), 404, "not_found")
        assert_problem(await bob.post(f"{path}/leave"), 404, "not_found")  # no longer a member
    # A room stays visible to anyone; the group is gone for bob.
    assert (await get_conv(bob, room["id"]))["my_role"] is None
    assert_problem(await bob.get(f"/conversations/{group['id']}"), 404, "not_found")
    assert await my_ids(bob) == []


async def test_owner_leaving_hands_ownership_to_the_longest_standing_admin(
    alice: User, bob: User, carol: User, make_user: UserFactory
) -> None:
    dave = await make_user("dave")
    group = await create(alice, "group", "crew", member_ids=[bob.id, carol.id, dave.id])
    # dave is made admin before carol, but carol joined earlier: joining decides.
    await put_member(alice, group["id"], dave.id, "admin")
    await put_member(alice, group["id"], carol.id, "admin")
    seq = (await get_conv(alice, group["id"]))["last_seq"]

    assert (await alice.post(f"/conversations/{group['id']}/leave")).status_code == 204
    assert await member_roles(bob, group["id"]) == {
        "bob": "member",
        "carol": "owner",
        "dave": "admin",
    }
    # Two changes: carol's new role and alice's leaving, one seq each.
    assert (await get_conv(bob, group["id"]))["last_seq"] == seq + 2

    assert (await carol.post(f"/conversations/{group['id']}/leave")).status_code == 204
    assert await member_roles(bob, group["id"]) == {"bob": "member", "dave": "owner"}


async def test_owner_leaving_without_admins_hands_ownership_to_the_longest_standing_member(
    alice: User, bob: User, carol: User, room: dict[str, Any]
) -> None:
    assert (await carol.post(f"/conversations/{room['id']}/join")).status_code == 200
    assert (await alice.post(f"/conversations/{room['id']}/leave")).status_code == 204
    assert await member_roles(carol, room["id"]) == {"bob": "owner", "carol": "member"}
    assert (await get_conv(bob, room["id"]))["my_role"] == "owner"
    # The new owner has the owner's powers.
    resp = await bob.patch(f"/conversations/{room['id']}", json={"name": "bob's"})
    assert resp.status_code == 200


async def test_the_last_member_leaving_deletes_the_conversation(
    alice: User, bob: User, group: dict[str, Any]
) -> None:
    room = await create(alice, "room", "solo")
    assert (await alice.post(f"/conversations/{room['id']}/leave")).status_code == 204
    assert_problem(await alice.get(f"/conversations/{room['id']}"), 404, "not_found")
    assert_problem(await bob.post(f"/conversations/{room['id']}/join"), 404, "not_found")
    assert (await bob.get("/conversations/public")).json()["conversations"] == []

    assert (await alice.post(f"/conversations/{group['id']}/leave")).status_code == 204
    assert (await get_conv(bob, group["id"]))["my_role"] == "owner"
    assert (await bob.post(f"/conversations/{group['id']}/leave")).status_code == 204
    assert_problem(await bob.get(f"/conversations/{group['id']}"), 404, "not_found")
    assert await my_ids(alice) == await my_ids(bob) == []


# -- GET /conversations/{id}/members ----------------------------------------------------


async def test_members_list_roles_and_pages_in_joining_order(
    alice: User, bob: User, carol: User, room: dict[str, Any]
) -> None:
    await put_member(alice, room["id"], bob.id, "admin")
    assert (await carol.post(f"/conversations/{room['id']}/join")).status_code == 200
    body = (await carol.get(f"/conversations/{room['id']}/members")).json()
    assert set(body) == {"members", "next_cursor"}
    assert body["next_cursor"] is None
    members = body["members"]
    assert [(m["username"], m["role"]) for m in members] == [
        ("alice", "owner"),
        ("bob", "admin"),
        ("carol", "member"),
    ]
    for member in members:
        assert set(member) == MEMBER_FIELDS
        assert member["conversation_id"] == room["id"]
        assert_utc(member["joined_at"])
    assert members[0]["display_name"] == "Alice Liddell"
    assert members[0]["user_id"] == alice.id
    assert members[0]["joined_at"] <= members[1]["joined_at"] <= members[2]["joined_at"]

    walked = await walk(carol, f"/conversations/{room['id']}/members", "members", limit=1)
    assert walked == members
    page = (await carol.get(f"/conversations/{room['id']}/members", params={"limit": 2})).json()
    assert [m["username"] for m in page["members"]] == ["alice", "bob"]
    assert page["next_cursor"] is not None

    path = f"/conversations/{room['id']}/members"
    for params in ({"limit": 0}, {"limit": 101}):
        assert_problem(await carol.get(path, params=params), 422, "validation_error")
    for cursor in (
        "@@",
        forged_cursor("abc"),
        forged_cursor(None),
        forged_cursor(2**40),
        forged_cursor(1, 2),
    ):
        assert_problem(await carol.get(path, params={"cursor": cursor}), 422, "invalid_cursor")


# -- PUT /conversations/{id}/members/{user_id} ------------------------------------------


async def test_owner_adds_members_and_grants_admin(
    alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    cid = group["id"]
    added = await put_member(alice, cid, carol.id)
    assert set(added) == MEMBERSHIP_FIELDS
    assert (added["user_id"], added["role"], added["conversation_id"]) == (carol.id, "member", cid)
    seen = await get_conv(carol, cid)
    assert (seen["last_seq"], seen["member_count"], seen["my_role"]) == (3, 3, "member")
    assert seen["unread_count"] == 0

    # The same request again is a no-op: same membership, no new seq.
    assert await put_member(alice, cid, carol.id) == added
    assert await put_member(alice, cid, carol.id, "member") == added
    assert (await get_conv(alice, cid))["last_seq"] == 3

    granted = await put_member(alice, cid, bob.id, "admin")
    assert granted["role"] == "admin"
    assert (await get_conv(bob, cid))["my_role"] == "admin"
    assert (await get_conv(alice, cid))["last_seq"] == 4

    revoked = await put_member(alice, cid, bob.id, "member")
    assert revoked["role"] == "member"
    assert (await get_conv(alice, cid))["last_seq"] == 5


async def test_admins_add_members_but_cannot_grant_admin_or_touch_admins(
    alice: User, bob: User, carol: User, make_user: UserFactory, group: dict[str, Any]
) -> None:
    cid = group["id"]
    dave, erin = await make_user("dave"), await make_user("erin")
    await put_member(alice, cid, bob.id, "admin")
    await put_member(alice, cid, dave.id, "admin")
    seq = (await get_conv(alice, cid))["last_seq"]

    # An admin may add a plain member...
    assert (await put_member(bob, cid, carol.id))["role"] == "member"
    seq += 1
    # ...but not grant or take admin, nor touch another admin or the owner.
    for user_id, body in (
        (erin.id, {"role": "admin"}),
        (carol.id, {"role": "admin"}),
        (dave.id, {"role": "member"}),
        (dave.id, None),
        (alice.id, {"role": "member"}),
        (alice.id, None),
        (carol.id, {"role": "owner"}),
    ):
        resp = await call(bob, "PUT", f"/conversations/{cid}/members/{user_id}", body)
        assert_problem(resp, 403, "forbidden")
    assert await member_roles(alice, cid) == {
        "alice": "owner",
        "bob": "admin",
        "dave": "admin",
        "carol": "member",
    }
    assert (await get_conv(alice, cid))["last_seq"] == seq
    assert_problem(await erin.get(f"/conversations/{cid}"), 404, "not_found")
    # A plain member manages nothing.
    assert_problem(await carol.put(f"/conversations/{cid}/members/{erin.id}"), 403, "forbidden")
    assert_problem(
        await carol.put(f"/conversations/{cid}/members/{carol.id}", json={"role": "admin"}),
        403,
        "forbidden",
    )
    assert (await get_conv(alice, cid))["member_count"] == 4


async def test_owner_hands_on_ownership_and_stays_as_admin(
    alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    cid = group["id"]
    seq = (await get_conv(alice, cid))["last_seq"]
    handed = await put_member(alice, cid, bob.id, "owner")
    assert handed["role"] == "owner"
    assert await member_roles(alice, cid) == {"alice": "admin", "bob": "owner"}
    assert (await get_conv(alice, cid))["last_seq"] == seq + 2  # two role changes
    # alice is an admin now: the owner is out of her reach, and so is granting admin.
    resp = await alice.put(f"/conversations/{cid}/members/{bob.id}", json={"role": "member"})
    assert_problem(resp, 403, "forbidden")
    assert_problem(await alice.delete(f"/conversations/{cid}/members/{bob.id}"), 403, "forbidden")
    assert_problem(await alice.delete(f"/conversations/{cid}"), 403, "forbidden")
    await put_member(alice, cid, carol.id)
    resp = await alice.put(f"/conversations/{cid}/members/{carol.id}", json={"role": "admin"})
    assert_problem(resp, 403, "forbidden")
    # The new owner does both.
    assert (await put_member(bob, cid, carol.id, "admin"))["role"] == "admin"
    assert (await put_member(bob, cid, alice.id, "member"))["role"] == "member"


async def test_put_member_rejects_bad_requests_and_writes_nothing(
    alice: User, bob: User, carol: User, group: dict[str, Any], room: dict[str, Any]
) -> None:
    cid = group["id"]
    path = f"/conversations/{cid}/members"
    before = await get_conv(alice, cid)
    assert_problem(await alice.put(f"{path}/{NOWHERE}"), 404, "not_found")
    for body in (
        {"role": "superuser"},
        {"role": "member", "joined_at": "2020-01-01T00:00:00Z"},
        {"user_id": carol.id},
        {"role": 1},
        "admin",
    ):
        assert_problem(await alice.put(f"{path}/{carol.id}", json=body), 422, "validation_error")
    # Ownership goes to someone already inside.
    assert_problem(await alice.put(f"{path}/{carol.id}", json={"role": "owner"}), 422)
    # The owner does not demote herself; she hands on ownership instead.
    assert_problem(await alice.put(f"{path}/{alice.id}", json={"role": "admin"}), 409, "conflict")
    assert await get_conv(alice, cid) == before
    assert await member_roles(alice, cid) == {"alice": "owner", "bob": "member"}
    assert_problem(await carol.get(f"/conversations/{cid}"), 404, "not_found")

    # A banned user is not added back behind the ban.
    assert (await alice.post(f"/conversations/{room['id']}/bans/{carol.id}")).status_code == 204
    room_before = await get_conv(alice, room["id"])
    resp = await alice.put(f"/conversations/{room['id']}/members/{carol.id}")
    assert_problem(resp, 409, "conflict")
    assert await get_conv(alice, room["id"]) == room_before


# -- DELETE /conversations/{id}/members/{user_id} ---------------------------------------


async def test_kick_removes_a_member_and_their_access(
    alice: User, bob: User, carol: User, group: dict[str, Any]
) -> None:
    cid = group["id"]
    message = await send(alice, cid, "before the kick")
    before = await get_conv(alice, cid)
    assert (await alice.delete(f"/conversations/{cid}/members/{bob.id}")).status_code == 204
    after = await get_conv(alice, cid)
    assert after["last_seq"] == before["last_seq"] + 1
    assert after["member_count"] == before["member_count"] - 1
    assert await member_roles(alice, cid) == {"alice": "owner"}
    assert_problem(await bob.get(f"/conversations/{cid}"), 404, "not_found")
    assert_problem(await bob.get(f"/conversations/{cid}/messages"), 404, "not_found")
    assert_problem(await bob.get(f"/messages/{message['id']}"), 404, "not_found")
    resp = await bob.post(f"/conversations/{cid}/messages", json={"content": "let me in"})
    assert_problem(resp, 404, "not_found")
    assert await my_ids(bob) == []
    # Kicking someone who is not (or no longer) a member.
    assert_problem(await alice.delete(f"/conversations/{cid}/members/{bob.id}"), 404, "not_found")
    assert_problem(await alice.delete(f"/conversations/{cid}/members/{carol.id}"), 404, "not_found")
    assert_problem(await alice.delete(f"/conversations/{cid}/members/{NOWHERE}"), 404, "not_found")
    # Kicking yourself is what leave is for.
    assert_problem(await alice.delete(f"/conversations/{cid}/members/{alice.id}"), 409, "conflict")
    assert await get_conv(alice, cid) == after
    # A kicked user may be added again.
    assert (await put_member(alice, cid, bob.id))["role"] == "member"


async def test_kick_rules_for_admins_and_members(
    alice: User, bob: User, carol: User, make_user: UserFactory, room: dict[str, Any]
) -> None:
    cid = room["id"]
    dave = await make_user("dave")
    for user in (carol, dave):
        assert (await user.post(f"/conversations/{cid}/join")).status_code == 200
    await put_member(alice, cid, bob.id, "admin")
    await put_member(alice, cid, dave.id, "admin")
    seq = (await get_conv(alice, cid))["last_seq"]

    assert_problem(await carol.delete(f"/conversations/{cid}/members/{bob.id}"), 403, "forbidden")
    assert_problem(await bob.delete(f"/conversations/{cid}/members/{dave.id}"), 403, "forbidden")
    assert_problem(await bob.delete(f"/conversations/{cid}/members/{alice.id}"), 403, "forbidden")
    assert_problem(await bob.delete(f"/conversations/{cid}/members/{bob.id}"), 409, "conflict")
    assert (await get_conv(alice, cid))["last_seq"] == seq
    assert await member_roles(alice, cid) == {
        "alice": "owner",
        "bob": "admin",
        "carol": "member",
        "dave": "admin",
    }

    # An admin kicks a member; the owner kicks an admin.
    assert (await bob.delete(f"/conversations/{cid}/members/{carol.id}")).status_code == 204
    assert (await alice.delete(f"/conversations/{cid}/members/{dave.id}")).status_code == 204
    assert await member_roles(alice, cid) == {"alice": "owner", "bob": "admin"}
    assert (await get_conv(alice, cid))["last_seq"] == seq + 2
    # Kicked from a room is not banned: carol may come back.
    assert (await carol.post(f"/conversations/{cid}/join")).status_code == 200


# -- POST/DELETE /conversations/{id}/bans/{user_id} -------------------------------------


async def test_ban_removes_and_blocks_rejoining_until_unbanned(
    alice: User, bob: User, carol: User, room: dict[str, Any]
) -> None:
    cid = room["id"]
    before = await get_conv(alice, cid)
    assert (await alice.post(f"/conversations/{cid}/bans/{bob.id}")).status_code == 204
    after = await get_conv(alice, cid)
    assert after["last_seq"] == before["last_seq"] + 1
    assert after["member_count"] == before["member_count"] - 1
    assert await member_roles(alice, cid) == {"alice": "owner"}
    assert_problem(await bob.get(f"/conversations/{cid}/messages"), 404, "not_found")

    assert_problem(await bob.post(f"/conversations/{cid}/join"), 403, "banned")
    assert_problem(await bob.post(f"/conversations/{cid}/join"), 403, "banned")
    assert (await get_conv(bob, cid))["my_role"] is None
    # Banning again is harmless; banning a non-member takes no seq (no membership changed).
    assert (await alice.post(f"/conversations/{cid}/bans/{bob.id}")).status_code == 204
    assert (await alice.post(f"/conversations/{cid}/bans/{carol.id}")).status_code == 204
    assert await get_conv(alice, cid) == after
    assert_problem(await carol.post(f"/conversations/{cid}/join"), 403, "banned")

    assert (await alice.delete(f"/conversations/{cid}/bans/{bob.id}")).status_code == 204
    assert (await alice.delete(f"/conversations/{cid}/bans/{bob.id}")).status_code == 204
    resp = await bob.post(f"/conversations/{cid}/join")
    assert resp.status_code == 200, resp.text
    assert resp.json()["role"] == "member"
    assert (await get_conv(alice, cid))["last_seq"] == after["last_seq"] + 1
    assert_problem(await carol.post(f"/conversations/{cid}/join"), 403, "banned")


async def test_ban_rules(
    alice: User,
    bob: User,
    carol: User,
    make_user: UserFactory,
    room: dict[str, Any],
    group: dict[str, Any],
) -> None:
    cid = room["id"]
    dave = await make_user("dave")
    for user in (carol, dave):
        assert (await user.post(f"/conversations/{cid}/join")).status_code == 200
    # Bans are for rooms.
    assert_problem(
        await alice.post(f"/conversations/{group['id']}/bans/{bob.id}"), 403, "forbidden"
    )
    assert_problem(
        await alice.delete(f"/conversations/{group['id']}/bans/{bob.id}"), 403, "forbidden"
    )
    # A plain member bans and unbans no one.
    assert_problem(await carol.post(f"/conversations/{cid}/bans/{bob.id}"), 403, "forbidden")
    assert_problem(await carol.delete(f"/conversations/{cid}/bans/{bob.id}"), 403, "forbidden")
    await put_member(alice, cid, bob.id, "admin")
    await put_member(alice, cid, dave.id, "admin")
    seq = (await get_conv(alice, cid))["last_seq"]
    # An admin cannot ban another admin or the owner; nobody bans themselves.
    assert_problem(await bob.post(f"/conversations/{cid}/bans/{dave.id}"), 403, "forbidden")
    assert_problem(await bob.post(f"/conversations/{cid}/bans/{alice.id}"), 403, "forbidden")
    assert_problem(await alice.post(f"/conversations/{cid}/bans/{alice.id}"), 409, "conflict")
    assert_problem(await alice.post(f"/conversations/{cid}/bans/{NOWHERE}"), 404, "not_found")
    assert (await get_conv(alice, cid))["last_seq"] == seq
    assert len(await member_roles(alice, cid)) == 4
    # An admin bans a member.
    assert (await bob.post(f"/conversations/{cid}/bans/{carol.id}")).status_code == 204
    assert_problem(await carol.post(f"/conversations/{cid}/join"), 403, "banned")
    assert (await bob.delete(f"/conversations/{cid}/bans/{carol.id}")).status_code == 204
    assert (await carol.post(f"/conversations/{cid}/join")).status_code == 200


# -- the shared sequence ----------------------------------------------------------------


async def test_each_membership_change_takes_exactly_one_seq_shared_with_messages(
    alice: User, bob: User, carol: User, make_user: UserFactory, room: dict[str, Any]
) -> None:
    cid = room["id"]
    dave = await make_user("dave")
    expected = (await get_conv(alice, cid))["last_seq"]
    assert expected == 2

    async def step(change: Any) -> None:
        nonlocal expected
        resp = await change
        assert resp.status_code in (200, 201, 204), resp.text
        expected += 1
        assert (await get_conv(alice, cid))["last_seq"] == expected

    await step(carol.post(f"/conversations/{cid}/join"))
    await step(bob.post(f"/conversations/{cid}/messages", json={"content": "hi"}))
    await step(alice.put(f"/conversations/{cid}/members/{carol.id}", json={"role": "admin"}))
    await step(alice.put(f"/conversations/{cid}/members/{dave.id}"))
    await step(carol.post(f"/conversations/{cid}/messages", json={"content": "hello"}))
    await step(alice.delete(f"/conversations/{cid}/members/{dave.id}"))
    await step(alice.post(f"/conversations/{cid}/bans/{bob.id}"))
    await step(carol.post(f"/conversations/{cid}/leave"))
    await step(alice.post(f"/conversations/{cid}/messages", json={"content": "alone"}))

    # The messages sit in that one sequence: 4, 7 and 11, with the member events between.
    history = (await alice.get(f"/conversations/{cid}/messages")).json()["messages"]
    assert [m["seq"] for m in history] == [4, 7, 11]


async def test_openapi_names_every_conversation_operation(anon: Client) -> None:
    spec = (await anon.get("/openapi.json")).json()
    operations = {op.get("operationId") for path in spec["paths"].values() for op in path.values()}
    assert {
        "create_conversation",
        "get_or_create_direct",
        "list_conversations",
        "list_public_rooms",
        "get_conversation",
        "update_conversation",
        "delete_conversation",
        "join_conversation",
        "leave_conversation",
        "list_members",
        "put_member",
        "remove_member",
        "ban_member",
        "unban_member",
    } <= operations
