"""§4 Users: search, profiles, one's own account, and the global admin's endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import PASSWORD, Client, User, UserFactory, assert_problem, send

PUBLIC_KEYS = {"id", "username", "display_name", "role", "created_at", "updated_at"}
OWN_KEYS = PUBLIC_KEYS | {"email"}
ADMIN_KEYS = OWN_KEYS | {"is_active"}


# -- helpers ----------------------------------------------------------------------------


async def usernames(user: Client, path: str = "/users", **params: Any) -> list[str]:
    resp = await user.get(path, params=params)
    assert resp.status_code == 200, resp.text
    return [u["username"] for u in resp.json()["users"]]


async def walk(user: Client, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every item of a cursor-paginated user list, page by page."""
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        query: dict[str, Any] = {"limit": limit, **params}
        if cursor:
            query["cursor"] = cursor
        resp = await user.get(path, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"users", "next_cursor"}
        assert len(body["users"]) <= limit
        seen.extend(body["users"])
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("the cursor never ran out")


async def login(client: Client, username: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/auth/login", json={"username": username, "password": password})


async def second_session(user: User) -> Client:
    resp = await login(Client(user.app), user.username, user.password)
    assert resp.status_code == 200, resp.text
    return Client(user.app, resp.json()["access_token"])


async def deactivate_self(user: User) -> None:
    resp = await user.delete("/users/me")
    assert resp.status_code == 204, resp.text


# -- GET /users -------------------------------------------------------------------------


async def test_list_users_shows_email_only_on_the_callers_own_entry(
    alice: User, bob: User, carol: User
) -> None:
    resp = await alice.get("/users")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"users", "next_cursor"}
    assert body["next_cursor"] is None
    by_name = {u["username"]: u for u in body["users"]}
    assert list(by_name) == ["alice", "bob", "carol"]
    assert set(by_name["alice"]) == OWN_KEYS
    assert set(by_name["bob"]) == PUBLIC_KEYS
    assert set(by_name["carol"]) == PUBLIC_KEYS
    assert by_name["bob"]["id"] == bob.id
    assert by_name["bob"]["display_name"] == "Bob"
    assert by_name["bob"]["role"] == "user"


async def test_search_is_a_case_insensitive_prefix_of_username_or_display_name(
    alice: User, bob: User, make_user: UserFactory
) -> None:
    await make_user("zed", display_name="Alistair")
    await make_user("lidia")
    assert await usernames(alice, q="ali") == ["alice", "zed"]
    assert await usernames(alice, q="ALI") == ["alice", "zed"]
    assert await usernames(alice, q="alis") == ["zed"]
    assert await usernames(alice, q="Alice L") == ["alice"]
    assert await usernames(alice, q="b") == ["bob"]
    # A prefix, not a substring: "Liddell" is inside alice's display name, not at its start.
    assert await usernames(alice, q="lid") == ["lidia"]
    assert await usernames(alice, q="nobody") == []
    assert await usernames(alice, q="") == ["alice", "bob", "lidia", "zed"]


async def test_search_treats_like_wildcards_as_plain_characters(
    alice: User, make_user: UserFactory
) -> None:
    await make_user("a_b")
    await make_user("axb")
    assert await usernames(alice, q="a_") == ["a_b"]
    assert await usernames(alice, q="%") == []
    assert await usernames(alice, q="_") == []


async def test_pagination_walks_every_user_once(alice: User, make_user: UserFactory) -> None:
    for n in range(5):
        await make_user(f"member{n}", display_name=f"Member {n}")
    everyone = ["alice"] + [f"member{n}" for n in range(5)]
    for limit in (1, 2, 4, 6, 100):
        seen = await walk(alice, "/users", limit)
        names = [u["username"] for u in seen]
        assert names == everyone, limit
        assert len({u["id"] for u in seen}) == len(seen)


async def test_pagination_of_a_search(alice: User, make_user: UserFactory) -> None:
    for name in ("member1", "member2", "member3", "other"):
        await make_user(name)
    seen = await walk(alice, "/users", 1, q="mem")
    assert [u["username"] for u in seen] == ["member1", "member2", "member3"]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 0}, id="limit-0"),
        pytest.param({"limit": 101}, id="limit-101"),
        pytest.param({"limit": "ten"}, id="limit-not-int"),
        pytest.param({"q": "x" * 65}, id="q-too-long"),
    ],
)
async def test_list_users_rejects_bad_parameters(alice: User, params: dict[str, Any]) -> None:
    assert_problem(await alice.get("/users", params=params), 422, "validation_error")


async def test_list_users_rejects_a_foreign_cursor(alice: User) -> None:
    for cursor in ("not-a-cursor!", "W10"):  # garbage; the empty list encoded
        resp = await alice.get("/users", params={"cursor": cursor})
        assert_problem(resp, 422)


async def test_deactivated_users_are_hidden_from_the_list(
    alice: User, bob: User, carol: User
) -> None:
    await deactivate_self(bob)
    assert await usernames(alice) == ["alice", "carol"]
    assert await usernames(alice, q="bo") == []


async def test_list_users_needs_auth(anon: Client, alice: User) -> None:
    assert_problem(await anon.get("/users"), 401, "unauthorized")


# -- GET /users/{id} --------------------------------------------------------------------


async def test_get_another_user_has_no_email(alice: User, make_user: UserFactory) -> None:
    dinah = await make_user("dinah", email="dinah@example.com", display_name="Dinah")
    resp = await alice.get(f"/users/{dinah.id}")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == PUBLIC_KEYS
    assert body == {k: v for k, v in dinah.body["user"].items() if k != "email"}
    assert "dinah@example.com" not in resp.text


async def test_get_own_user_has_email(make_user: UserFactory) -> None:
    dinah = await make_user("dinah", email="dinah@example.com")
    resp = await dinah.get(f"/users/{dinah.id}")
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == OWN_KEYS
    assert resp.json()["email"] == "dinah@example.com"


async def test_get_unknown_or_deactivated_user_is_404(alice: User, bob: User) -> None:
    assert_problem(await alice.get(f"/users/{uuid.uuid4()}"), 404, "not_found")
    await deactivate_self(bob)
    assert_problem(await alice.get(f"/users/{bob.id}"), 404, "not_found")


async def test_get_user_with_a_malformed_id_is_422(alice: User) -> None:
    assert_problem(await alice.get("/users/not-a-uuid"), 422, "validation_error")


async def test_get_user_needs_auth(anon: Client, alice: User) -> None:
    assert_problem(await anon.get(f"/users/{alice.id}"), 401, "unauthorized")


# -- PATCH /users/me --------------------------------------------------------------------


async def test_update_me_changes_display_name_and_email(alice: User, bob: User) -> None:
    before = (await alice.get("/auth/me")).json()
    resp = await alice.patch(
        "/users/me", json={"display_name": "Alice in Wonderland", "email": "Alice@Example.COM"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == OWN_KEYS
    assert body["display_name"] == "Alice in Wonderland"
    assert body["email"] == "alice@example.com"
    assert body["username"] == "alice"
    assert body["created_at"] == before["created_at"]
    assert datetime.fromisoformat(body["updated_at"]) > datetime.fromisoformat(before["updated_at"])
    assert (await alice.get("/auth/me")).json() == body
    # Others see the new name, never the email.
    seen_by_bob = (await bob.get(f"/users/{alice.id}")).json()
    assert seen_by_bob["display_name"] == "Alice in Wonderland"
    assert "email" not in seen_by_bob


async def test_update_me_changes_only_the_fields_given(make_user: UserFactory) -> None:
    dinah = await make_user("dinah", email="dinah@example.com", display_name="Dinah")
    resp = await dinah.patch("/users/me", json={"display_name": "Dinah the Cat"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["email"] == "dinah@example.com"
    resp = await dinah.patch("/users/me", json={"email": "cat@example.com"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["display_name"] == "Dinah the Cat"
    resp = await dinah.patch("/users/me", json={})
    assert resp.status_code == 200, resp.text
    assert resp.json()["display_name"] == "Dinah the Cat"
    assert resp.json()["email"] == "cat@example.com"


async def test_update_me_clears_fields_with_null(make_user: UserFactory) -> None:
    dinah = await make_user("dinah", email="dinah@example.com", display_name="Dinah")
    resp = await dinah.patch("/users/me", json={"display_name": None, "email": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["display_name"] is None
    assert resp.json()["email"] is None
    # A blank display name is no name.
    resp = await dinah.patch("/users/me", json={"display_name": "   "})
    assert resp.json()["display_name"] is None


async def test_update_me_with_an_email_already_registered_is_409(
    alice: User, make_user: UserFactory
) -> None:
    await make_user("dinah", email="dinah@example.com")
    resp = await alice.patch(
        "/users/me", json={"display_name": "Not Saved", "email": "DINAH@example.com"}
    )
    assert_problem(resp, 409, "conflict")
    # Nothing half-written: the display name in the same request was not kept either.
    me = (await alice.get("/auth/me")).json()
    assert me["display_name"] == "Alice Liddell"
    assert me["email"] is None


async def test_an_email_is_free_again_once_its_owner_changes_it(
    alice: User, make_user: UserFactory
) -> None:
    dinah = await make_user("dinah", email="dinah@example.com")
    # Keeping one's own email is no conflict.
    assert (await dinah.patch("/users/me", json={"email": "dinah@example.com"})).status_code == 200
    assert (await dinah.patch("/users/me", json={"email": "cat@example.com"})).status_code == 200
    resp = await alice.patch("/users/me", json={"email": "dinah@example.com"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"username": "queen"}, id="unknown-field-username"),
        pytest.param({"role": "admin"}, id="unknown-field-role"),
        pytest.param({"display_name": "x", "is_active": False}, id="unknown-field-is_active"),
        pytest.param({"display_name": "d" * 65}, id="display-name-too-long"),
        pytest.param({"display_name": "x", "email": "not-an-email"}, id="bad-email"),
        pytest.param({"display_name": 42}, id="display-name-not-a-string"),
    ],
)
async def test_update_me_rejects_bad_input_and_changes_nothing(
    alice: User, body: dict[str, Any]
) -> None:
    before = (await alice.get("/auth/me")).json()
    assert_problem(await alice.patch("/users/me", json=body), 422, "validation_error")
    assert (await alice.get("/auth/me")).json() == before


async def test_update_me_accepts_a_64_character_display_name(alice: User) -> None:
    resp = await alice.patch("/users/me", json={"display_name": "d" * 64})
    assert resp.status_code == 200, resp.text


async def test_update_me_needs_auth(anon: Client) -> None:
    resp = await anon.patch("/users/me", json={"display_name": "Ghost"})
    assert_problem(resp, 401, "unauthorized")


# -- DELETE /users/me -------------------------------------------------------------------


async def test_delete_me_ends_sessions_and_refuses_login(alice: User, bob: User) -> None:
    other = await second_session(alice)
    resp = await alice.delete("/users/me")
    assert resp.status_code == 204, resp.text
    assert resp.content == b""

    assert_problem(await alice.get("/auth/me"), 401)
    assert_problem(await other.get("/auth/me"), 401)
    resp = await alice.post("/auth/refresh", json={"refresh_token": alice.refresh_token})
    assert_problem(resp, 401)
    assert_problem(await login(Client(alice.app), "alice"), 401, "invalid_credentials")
    assert_problem(await bob.get(f"/users/{alice.id}"), 404, "not_found")


async def test_delete_me_keeps_messages_shown_as_a_deleted_user(
    alice: User, bob: User, room: dict[str, Any]
) -> None:
    message = await send(alice, room["id"], "hi")
    await deactivate_self(alice)

    resp = await bob.get(f"/conversations/{room['id']}/messages")
    assert resp.status_code == 200, resp.text
    [kept] = resp.json()["messages"]
    assert kept["id"] == message["id"]
    assert kept["content"] == "hi"
    assert kept["sender"]["id"] == alice.id
    assert kept["sender"]["username"] == "deleted-user"
    assert kept["sender"]["display_name"] != "Alice Liddell"

    single = await bob.get(f"/messages/{message['id']}")
    assert single.status_code == 200, single.text
    assert single.json()["sender"]["username"] == "deleted-user"


async def test_delete_me_needs_auth(anon: Client, alice: User) -> None:
    assert_problem(await anon.delete("/users/me"), 401, "unauthorized")
    assert (await alice.get("/auth/me")).status_code == 200


# -- GET /admin/users -------------------------------------------------------------------


async def test_admin_lists_every_user_with_is_active_and_email(
    admin: User, alice: User, bob: User, make_user: UserFactory
) -> None:
    await make_user("dinah", email="dinah@example.com")
    await deactivate_self(bob)
    resp = await admin.get("/admin/users")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"users", "next_cursor"}
    by_name = {u["username"]: u for u in body["users"]}
    assert list(by_name) == ["alice", "bob", "dinah", "root"]
    for user in by_name.values():
        assert set(user) == ADMIN_KEYS
    assert by_name["bob"]["is_active"] is False
    assert by_name["alice"]["is_active"] is True
    assert by_name["dinah"]["email"] == "dinah@example.com"
    assert by_name["root"]["role"] == "admin"


async def test_admin_list_pages_and_searches_inactive_users_too(
    admin: User, alice: User, bob: User, carol: User
) -> None:
    await deactivate_self(bob)
    seen = await walk(admin, "/admin/users", 1)
    assert [u["username"] for u in seen] == ["alice", "bob", "carol", "root"]
    assert await usernames(admin, "/admin/users", q="B") == ["bob"]


async def test_admin_list_rejects_bad_parameters(admin: User) -> None:
    assert_problem(await admin.get("/admin/users", params={"limit": 0}), 422, "validation_error")


async def test_admin_list_is_for_admins_only(anon: Client, alice: User) -> None:
    assert_problem(await alice.get("/admin/users"), 403, "forbidden")
    assert_problem(await anon.get("/admin/users"), 401, "unauthorized")


# -- PATCH /admin/users/{id} ------------------------------------------------------------


async def test_admin_promotes_and_demotes(admin: User, bob: User) -> None:
    resp = await admin.patch(f"/admin/users/{bob.id}", json={"role": "admin"})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == ADMIN_KEYS
    assert resp.json()["role"] == "admin"
    # The role counts from bob's next request, with the token he already holds.
    assert (await bob.get("/admin/stats")).status_code == 200
    assert (await bob.get("/auth/me")).json()["role"] == "admin"

    resp = await admin.patch(f"/admin/users/{bob.id}", json={"role": "user"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["role"] == "user"
    assert_problem(await bob.get("/admin/stats"), 403, "forbidden")


async def test_admin_deactivation_ends_the_users_sessions(
    admin: User, alice: User, bob: User
) -> None:
    other = await second_session(bob)
    resp = await admin.patch(f"/admin/users/{bob.id}", json={"is_active": False})
    assert resp.status_code == 200, resp.text
    assert resp.json()["is_active"] is False

    assert_problem(await bob.get("/auth/me"), 401)
    assert_problem(await other.get("/auth/me"), 401)
    assert_problem(await login(Client(bob.app), "bob"), 401, "invalid_credentials")
    assert_problem(await alice.get(f"/users/{bob.id}"), 404)
    # Nobody else's session is touched.
    assert (await alice.get("/auth/me")).status_code == 200
    assert (await admin.get("/auth/me")).status_code == 200

    # Reactivated, bob can log in again; the ended sessions stay ended.
    resp = await admin.patch(f"/admin/users/{bob.id}", json={"is_active": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["is_active"] is True
    assert (await login(Client(bob.app), "bob")).status_code == 200
    assert_problem(await bob.get("/auth/me"), 401)
    assert (await alice.get(f"/users/{bob.id}")).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"role": "user"}, id="demote"),
        pytest.param({"is_active": False}, id="deactivate"),
        pytest.param({"role": "user", "is_active": True}, id="demote-with-other"),
    ],
)
async def test_admin_cannot_demote_or_deactivate_self(admin: User, body: dict[str, Any]) -> None:
    assert_problem(await admin.patch(f"/admin/users/{admin.id}", json=body), 409, "conflict")
    me = await admin.get("/auth/me")
    assert me.status_code == 200
    assert me.json()["role"] == "admin"


async def test_admin_may_patch_self_harmlessly(admin: User) -> None:
    resp = await admin.patch(f"/admin/users/{admin.id}", json={"role": "admin", "is_active": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["role"] == "admin"
    assert resp.json()["is_active"] is True


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"role": "admin", "username": "boss"}, id="unknown-field-username"),
        pytest.param({"password": "hijacked password"}, id="unknown-field-password"),
        pytest.param({"role": "superuser"}, id="bad-role"),
        pytest.param({"role": "admin", "is_active": "maybe"}, id="bad-is_active"),
    ],
)
async def test_admin_update_rejects_bad_input_and_changes_nothing(
    admin: User, bob: User, body: dict[str, Any]
) -> None:
    assert_problem(await admin.patch(f"/admin/users/{bob.id}", json=body), 422, "validation_error")
    me = (await bob.get("/auth/me")).json()
    assert me["role"] == "user"
    assert me["username"] == "bob"


async def test_admin_update_of_unknown_user_is_404(admin: User) -> None:
    resp = await admin.patch(f"/admin/users/{uuid.uuid4()}", json={"role": "admin"})
    assert_problem(resp, 404, "not_found")
    resp = await admin.patch("/admin/users/not-a-uuid", json={"role": "admin"})
    assert_problem(resp, 422, "validation_error")


async def test_admin_update_is_for_admins_only(anon: Client, alice: User, bob: User) -> None:
    resp = await alice.patch(f"/admin/users/{alice.id}", json={"role": "admin"})
    assert_problem(resp, 403, "forbidden")
    resp = await alice.patch(f"/admin/users/{bob.id}", json={"is_active": False})
    assert_problem(resp, 403, "forbidden")
    resp = await anon.patch(f"/admin/users/{bob.id}", json={"is_active": False})
    assert_problem(resp, 401, "unauthorized")
    assert (await alice.get("/auth/me")).json()["role"] == "user"
    assert (await bob.get("/auth/me")).status_code == 200


# -- GET /admin/stats -------------------------------------------------------------------


async def test_admin_stats_counts(
    admin: User, alice: User, bob: User, carol: User, room: dict[str, Any]
) -> None:
    await send(alice, room["id"], "one")
    await send(bob, room["id"], "two")
    resp = await carol.post("/conversations", json={"kind": "room", "name": "x"})
    assert resp.status_code == 201, resp.text
    await deactivate_self(carol)

    resp = await admin.get("/admin/stats")
    assert resp.status_code == 200, resp.text
    stats = resp.json()
    assert set(stats) == {"users", "active_users", "conversations", "messages", "connections"}
    assert stats["users"] == 4
    assert stats["active_users"] == 3
    assert stats["conversations"] == 2
    assert stats["messages"] == 2
    assert stats["connections"]
    assert all(isinstance(n, int) and n >= 0 for n in stats["connections"].values())


async def test_admin_stats_is_for_admins_only(anon: Client, alice: User) -> None:
    assert_problem(await alice.get("/admin/stats"), 403, "forbidden")
    assert_problem(await anon.get("/admin/stats"), 401, "unauthorized")
