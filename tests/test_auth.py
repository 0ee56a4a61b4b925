"""§3 Accounts and auth: register, login, tokens, sessions, tickets, passwords, limits."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from pwdlib import PasswordHash
from sqlalchemy import select, update

from parley.auth.service import access_principal_by_ticket
from parley.errors import Unauthorized
from parley.models import AuthSession, Ticket
from tests.conftest import PASSWORD, AppFactory, Client, User, UserFactory, assert_problem

TOKEN_KEYS = {"user", "access_token", "refresh_token", "token_type", "expires_in"}
OWN_USER_KEYS = {"id", "username", "display_name", "role", "created_at", "updated_at", "email"}
NEW_PASSWORD = "a whole new passphrase"


# -- helpers ----------------------------------------------------------------------------


def assert_token_body(body: dict[str, Any], username: str) -> None:
    assert set(body) == TOKEN_KEYS, body
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900  # PARLEY_ACCESS_TOKEN_TTL default
    assert body["access_token"] and body["refresh_token"]
    assert body["access_token"] != body["refresh_token"]
    assert set(body["user"]) == OWN_USER_KEYS, body["user"]
    assert body["user"]["username"] == username


async def login(client: Client, username: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/auth/login", json={"username": username, "password": password})


async def new_session(anon: Client, user: User, password: str = PASSWORD) -> Client:
    """Log `user` in again: a second session beside the one registration started."""
    resp = await login(anon, user.username, password)
    assert resp.status_code == 200, resp.text
    return Client(anon.app, resp.json()["access_token"])


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def forge(app: FastAPI, claims: dict[str, Any], key: str | None = None) -> str:
    """A JWT signed like the server's own (or with another key)."""
    return jwt.encode(claims, key or app.state.settings.signing_key, algorithm="HS256")


async def is_accepted(app: FastAPI, token: str) -> bool:
    resp = await Client(app, token).get("/auth/me")
    if resp.status_code == 401:
        assert_problem(resp, 401)
        return False
    assert resp.status_code == 200, resp.text
    return True


async def refresh(client: Client, refresh_token: str) -> httpx.Response:
    return await client.post("/auth/refresh", json={"refresh_token": refresh_token})


# -- register ---------------------------------------------------------------------------


async def test_register_answers_201_with_user_and_token_pair(anon: Client) -> None:
    resp = await anon.post(
        "/auth/register",
        json={
            "username": "dinah",
            "password": PASSWORD,
            "email": "dinah@example.com",
            "display_name": "Dinah",
        },
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert_token_body(body, "dinah")
    user = body["user"]
    uuid.UUID(user["id"])
    assert user["display_name"] == "Dinah"
    assert user["email"] == "dinah@example.com"
    assert user["role"] == "user"
    for stamp in ("created_at", "updated_at"):
        assert datetime.fromisoformat(user[stamp]).utcoffset() == timedelta(0)

    me = await Client(anon.app, body["access_token"]).get("/auth/me")
    assert me.status_code == 200, me.text
    assert me.json() == user


async def test_register_with_only_username_and_password(anon: Client) -> None:
    resp = await anon.post("/auth/register", json={"username": "plain", "password": PASSWORD})
    assert resp.status_code == 201, resp.text
    user = resp.json()["user"]
    assert user["display_name"] is None
    assert user["email"] is None


async def test_username_is_lowercased_so_upper_and_lower_case_are_one_name(anon: Client) -> None:
    resp = await anon.post("/auth/register", json={"username": "ALICE", "password": PASSWORD})
    assert resp.status_code == 201, resp.text
    assert resp.json()["user"]["username"] == "alice"

    resp = await login(anon, "Alice")
    assert resp.status_code == 200, resp.text
    assert resp.json()["user"]["username"] == "alice"

    for taken in ("alice", "Alice"):
        resp = await anon.post("/auth/register", json={"username": taken, "password": PASSWORD})
        assert_problem(resp, 409, "conflict")


async def test_email_must_be_unique_ignoring_case(anon: Client, make_user: UserFactory) -> None:
    await make_user("dinah", email="dinah@example.com")
    resp = await anon.post(
        "/auth/register",
        json={"username": "imposter", "password": PASSWORD, "email": "DINAH@example.com"},
    )
    assert_problem(resp, 409, "conflict")
    # Nothing half-written: the name of the refused registration is still free.
    resp = await anon.post("/auth/register", json={"username": "imposter", "password": PASSWORD})
    assert resp.status_code == 201, resp.text


VALID_REGISTRATION = {"username": "newbie", "password": PASSWORD}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"role": "admin"}, id="unknown-field-role"),
        pytest.param({"is_active": True}, id="unknown-field-is_active"),
        pytest.param({"username": "ab"}, id="username-too-short"),
        pytest.param({"username": "x" * 33}, id="username-too-long"),
        pytest.param({"username": "new bie"}, id="username-space"),
        pytest.param({"username": "newbie!"}, id="username-punctuation"),
        pytest.param({"username": "néwbie"}, id="username-not-ascii"),
        pytest.param({"username": 12345}, id="username-not-a-string"),
        pytest.param({"password": "short12"}, id="password-7-chars"),
        pytest.param({"password": "p" * 257}, id="password-257-chars"),
        pytest.param({"display_name": "d" * 65}, id="display-name-65-chars"),
        pytest.param({"email": "not-an-email"}, id="bad-email"),
        pytest.param({"password": None}, id="password-null"),
    ],
)
async def test_register_rejects_bad_input_and_writes_nothing(
    anon: Client, change: dict[str, Any]
) -> None:
    resp = await anon.post("/auth/register", json={**VALID_REGISTRATION, **change})
    body = assert_problem(resp, 422, "validation_error")
    assert body["errors"], body
    # No password is ever echoed back in an error.
    assert PASSWORD not in resp.text

    resp = await anon.post("/auth/register", json=VALID_REGISTRATION)
    assert resp.status_code == 201, resp.text
    assert resp.json()["user"]["role"] == "user"


@pytest.mark.parametrize("missing", ["username", "password"])
async def test_register_requires_username_and_password(anon: Client, missing: str) -> None:
    body = {k: v for k, v in VALID_REGISTRATION.items() if k != missing}
    assert_problem(await anon.post("/auth/register", json=body), 422, "validation_error")


async def test_register_limits_are_inclusive(anon: Client) -> None:
    resp = await anon.post(
        "/auth/register",
        json={"username": "abc", "password": "p" * 8, "display_name": "d" * 64},
    )
    assert resp.status_code == 201, resp.text
    resp = await anon.post("/auth/register", json={"username": "z" * 32, "password": "p" * 256})
    assert resp.status_code == 201, resp.text
    resp = await anon.post("/auth/register", json={"username": "a_b.c-1", "password": PASSWORD})
    assert resp.status_code == 201, resp.text


async def test_concurrent_registrations_of_one_name_make_one_account(anon: Client) -> None:
    body = {"username": "twin", "password": PASSWORD}
    responses = await asyncio.gather(*(anon.post("/auth/register", json=body) for _ in range(3)))
    assert sorted(r.status_code for r in responses) == [201, 409, 409]
    for resp in responses:
        if resp.status_code == 409:
            assert_problem(resp, 409, "conflict")


async def test_register_with_malformed_json_is_400(anon: Client) -> None:
    resp = await anon.post(
        "/auth/register", content=b'{"username": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, 400, "malformed_json")


# -- login ------------------------------------------------------------------------------


async def test_login_with_json_starts_a_new_session(anon: Client, alice: User) -> None:
    resp = await login(anon, "alice")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert_token_body(body, "alice")
    assert body["user"]["id"] == alice.id
    assert body["user"]["display_name"] == "Alice Liddell"
    assert claims_of(body["access_token"])["sid"] != claims_of(alice.access_token)["sid"]
    assert await is_accepted(anon.app, body["access_token"])


async def test_login_username_is_case_insensitive(anon: Client, alice: User) -> None:
    for spelling in ("ALICE", "Alice", " alice "):
        resp = await login(anon, spelling)
        assert resp.status_code == 200, (spelling, resp.text)
        assert resp.json()["user"]["id"] == alice.id


@pytest.mark.parametrize("grant_type", ["password", None])
async def test_login_with_oauth2_password_form(
    anon: Client, alice: User, grant_type: str | None
) -> None:
    form = {"username": "Alice", "password": PASSWORD}
    if grant_type:
        form["grant_type"] = grant_type
    # What the Authorize button of /docs sends, scope included.
    resp = await anon.post("/auth/login", data={**form, "scope": ""})
    assert resp.status_code == 200, resp.text
    assert_token_body(resp.json(), "alice")
    assert await is_accepted(anon.app, resp.json()["access_token"])


async def test_login_form_with_wrong_password_or_other_grant(anon: Client, alice: User) -> None:
    resp = await anon.post(
        "/auth/login", data={"grant_type": "password", "username": "alice", "password": "nope1234"}
    )
    assert_problem(resp, 401, "invalid_credentials")
    resp = await anon.post(
        "/auth/login",
        data={"grant_type": "client_credentials", "username": "alice", "password": PASSWORD},
    )
    assert_problem(resp, 422, "validation_error")
    resp = await anon.post("/auth/login", data={"username": "alice"})
    assert_problem(resp, 422, "validation_error")


async def test_wrong_password_and_unknown_user_answer_the_same(anon: Client, alice: User) -> None:
    wrong = await login(anon, "alice", "not the password")
    unknown = await login(anon, "nobody", "not the password")
    for resp in (wrong, unknown):
        assert_problem(resp, 401, "invalid_credentials")
        assert resp.headers["www-authenticate"] == "Bearer"

    def without_request_id(resp: httpx.Response) -> dict[str, Any]:
        return {k: v for k, v in resp.json().items() if k != "request_id"}

    assert without_request_id(wrong) == without_request_id(unknown)
    assert wrong.json()["request_id"] != unknown.json()["request_id"]


async def test_unknown_user_costs_one_password_verification_too(
    anon: Client, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """About the same time: an unknown name is verified against a dummy hash, so it does
    the same Argon2 work as a wrong password instead of answering early."""
    calls: list[str] = []
    real_verify = PasswordHash.verify

    def counting_verify(self: PasswordHash, password: str, hash: str) -> bool:
        calls.append(password)
        return real_verify(self, password, hash)

    monkeypatch.setattr(PasswordHash, "verify", counting_verify)
    await login(anon, "alice", "wrong password 1")
    await login(anon, "nobody", "wrong password 2")
    assert calls == ["wrong password 1", "wrong password 2"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"username": "alice", "password": PASSWORD, "remember": True}, id="unknown"),
        pytest.param({"username": "alice"}, id="no-password"),
        pytest.param({"password": PASSWORD}, id="no-username"),
        pytest.param(["alice", PASSWORD], id="not-an-object"),
    ],
)
async def test_login_rejects_bad_input(anon: Client, alice: User, body: Any) -> None:
    assert_problem(await anon.post("/auth/login", json=body), 422, "validation_error")


async def test_login_with_malformed_json_is_400(anon: Client) -> None:
    resp = await anon.post(
        "/auth/login", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, 400, "malformed_json")


# -- access tokens ----------------------------------------------------------------------


async def test_access_token_claims(alice: User) -> None:
    claims = claims_of(alice.access_token)
    assert {"sub", "sid", "exp", "iat", "jti", "type"} <= set(claims)
    assert claims["type"] == "access"
    assert claims["sub"] == alice.id
    uuid.UUID(claims["sid"])
    assert claims["exp"] - claims["iat"] == 900
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(alice.access_token)["alg"] == "HS256"


async def test_each_token_has_its_own_jti(anon: Client, alice: User) -> None:
    first = (await login(anon, "alice")).json()["access_token"]
    second = (await login(anon, "alice")).json()["access_token"]
    assert claims_of(first)["jti"] != claims_of(second)["jti"]


async def test_anonymous_or_malformed_authorization_is_401(
    anon: Client, alice: User, app: FastAPI
) -> None:
    resp = await anon.get("/auth/me")
    assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"] == "Bearer"
    for header in (f"Basic {alice.access_token}", "Bearer", "Bearer not.a.jwt", "garbage"):
        resp = await anon.get("/auth/me", headers={"Authorization": header})
        assert_problem(resp, 401)


async def test_refresh_token_is_never_an_access_token(app: FastAPI, alice: User) -> None:
    assert not await is_accepted(app, alice.refresh_token)


async def test_jwt_of_another_type_is_refused(app: FastAPI, alice: User) -> None:
    claims = claims_of(alice.access_token)
    # The forgery is right in every other way: as "access" it passes.
    assert await is_accepted(app, forge(app, claims))
    for other_type in ("refresh", "ticket", "", None):
        assert not await is_accepted(app, forge(app, {**claims, "type": other_type}))
    without_type = {k: v for k, v in claims.items() if k != "type"}
    assert not await is_accepted(app, forge(app, without_type))


async def test_jwt_signed_with_another_key_or_algorithm_is_refused(
    app: FastAPI, alice: User
) -> None:
    claims = claims_of(alice.access_token)
    assert not await is_accepted(app, forge(app, claims, key="another-key-" + "y" * 40))
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert not await is_accepted(app, unsigned)


async def test_jwt_naming_another_users_session_is_refused(
    app: FastAPI, alice: User, bob: User
) -> None:
    claims = {**claims_of(alice.access_token), "sub": bob.id}
    assert not await is_accepted(app, forge(app, claims))


async def test_expired_access_token_is_401_token_expired(app: FastAPI, alice: User) -> None:
    past = datetime.now(UTC) - timedelta(minutes=20)
    claims = {**claims_of(alice.access_token), "iat": past, "exp": past + timedelta(minutes=15)}
    resp = await Client(app, forge(app, claims)).get("/auth/me")
    assert_problem(resp, 401, "token_expired")
    assert resp.headers["www-authenticate"] == "Bearer"


# -- refresh ----------------------------------------------------------------------------


async def test_refresh_rotates_the_pair(anon: Client, alice: User) -> None:
    resp = await refresh(anon, alice.refresh_token)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert_token_body(body, "alice")
    assert body["refresh_token"] != alice.refresh_token
    assert body["access_token"] != alice.access_token
    # Same session: the new access token carries the same sid.
    assert claims_of(body["access_token"])["sid"] == claims_of(alice.access_token)["sid"]
    assert await is_accepted(anon.app, body["access_token"])
    # The pair goes on rotating.
    again = await refresh(anon, body["refresh_token"])
    assert again.status_code == 200, again.text


async def test_spent_refresh_token_presented_again_ends_the_session(
    anon: Client, alice: User
) -> None:
    other = await new_session(anon, alice)
    rotated = (await refresh(anon, alice.refresh_token)).json()

    # Theft detection: the old token comes back.
    resp = await refresh(anon, alice.refresh_token)
    assert_problem(resp, 401)

    # Neither the thief nor the owner can go on with that session ...
    assert not await is_accepted(anon.app, rotated["access_token"])
    assert_problem(await refresh(anon, rotated["refresh_token"]), 401)
    # ... while the user's other session is untouched.
    assert (await other.get("/auth/me")).status_code == 200


async def test_refresh_with_unknown_token_is_401(anon: Client) -> None:
    assert_problem(await refresh(anon, "no-such-token"), 401)


async def test_access_token_is_not_a_refresh_token(anon: Client, alice: User) -> None:
    # A JWT is longer than any refresh token (256 characters at most): refused as input.
    assert_problem(await refresh(anon, alice.access_token), 422, "validation_error")
    assert (await refresh(anon, alice.refresh_token)).status_code == 200


async def set_session_expiry(app: FastAPI, user: User, expires_at: datetime) -> None:
    sid = uuid.UUID(claims_of(user.access_token)["sid"])
    async with app.state.db.transaction() as session:
        await session.execute(
            update(AuthSession).where(AuthSession.id == sid).values(expires_at=expires_at)
        )


async def session_expiry(app: FastAPI, user: User) -> datetime:
    sid = uuid.UUID(claims_of(user.access_token)["sid"])
    async with app.state.db.transaction(write=False) as session:
        expires_at: datetime = await session.scalar(
            select(AuthSession.expires_at).where(AuthSession.id == sid)
        )
    return expires_at


async def test_an_expired_session_refuses_its_tokens(
    app: FastAPI, anon: Client, alice: User
) -> None:
    await set_session_expiry(app, alice, datetime.now(UTC) - timedelta(seconds=1))
    assert not await is_accepted(app, alice.access_token)
    assert_problem(await refresh(anon, alice.refresh_token), 401)


async def test_each_refresh_token_lives_the_full_refresh_ttl(
    app: FastAPI, anon: Client, alice: User
) -> None:
    """PARLEY_REFRESH_TOKEN_TTL is each refresh token's lifetime: a session near its end
    gets the whole TTL again when it rotates."""
    await set_session_expiry(app, alice, datetime.now(UTC) + timedelta(minutes=1))
    resp = await refresh(anon, alice.refresh_token)
    assert resp.status_code == 200, resp.text
    ttl = app.state.settings.refresh_token_ttl
    assert await session_expiry(app, alice) > datetime.now(UTC) + timedelta(seconds=ttl - 60)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing"),
        pytest.param({"refresh_token": ""}, id="empty"),
        pytest.param({"refresh_token": "x", "user_id": "y"}, id="unknown-field"),
        pytest.param({"refresh_token": 5}, id="not-a-string"),
    ],
)
async def test_refresh_rejects_bad_input(anon: Client, alice: User, body: Any) -> None:
    assert_problem(await anon.post("/auth/refresh", json=body), 422, "validation_error")
    # The refusal spent nothing.
    assert (await refresh(anon, alice.refresh_token)).status_code == 200


# -- logout -----------------------------------------------------------------------------


async def test_logout_ends_that_session_only(anon: Client, alice: User) -> None:
    other = await new_session(anon, alice)
    resp = await alice.post("/auth/logout", json={"refresh_token": alice.refresh_token})
    assert resp.status_code == 204, resp.text
    assert resp.content == b""

    assert_problem(await alice.get("/auth/me"), 401)
    assert_problem(await refresh(anon, alice.refresh_token), 401)
    assert (await other.get("/auth/me")).status_code == 200


async def test_logout_needs_only_the_refresh_token(anon: Client, alice: User) -> None:
    resp = await anon.post("/auth/logout", json={"refresh_token": alice.refresh_token})
    assert resp.status_code == 204, resp.text
    assert not await is_accepted(anon.app, alice.access_token)


async def test_logout_with_unknown_token_is_401(anon: Client, alice: User) -> None:
    assert_problem(await anon.post("/auth/logout", json={"refresh_token": "nope"}), 401)
    assert await is_accepted(anon.app, alice.access_token)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing"),
        pytest.param({"refresh_token": "x", "everywhere": True}, id="unknown-field"),
    ],
)
async def test_logout_rejects_bad_input(alice: User, body: Any) -> None:
    assert_problem(await alice.post("/auth/logout", json=body), 422, "validation_error")
    assert (await alice.get("/auth/me")).status_code == 200


# -- tickets ----------------------------------------------------------------------------


async def test_ticket_is_issued_to_a_signed_in_user(alice: User) -> None:
    resp = await alice.post("/auth/ticket")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"ticket", "expires_in"}
    assert body["expires_in"] == 30
    assert len(body["ticket"]) >= 32


async def test_ticket_needs_auth(anon: Client) -> None:
    assert_problem(await anon.post("/auth/ticket"), 401, "unauthorized")


async def test_ticket_is_not_an_access_token(app: FastAPI, alice: User) -> None:
    ticket = (await alice.post("/auth/ticket")).json()["ticket"]
    assert not await is_accepted(app, ticket)


async def test_ticket_is_single_use(app: FastAPI, alice: User) -> None:
    ticket = (await alice.post("/auth/ticket")).json()["ticket"]
    async with app.state.db.transaction() as session:
        principal = await access_principal_by_ticket(session, ticket)
    assert str(principal.id) == alice.id
    assert str(principal.session_id) == claims_of(alice.access_token)["sid"]

    with pytest.raises(Unauthorized):
        async with app.state.db.transaction() as session:
            await access_principal_by_ticket(session, ticket)


async def test_ticket_of_an_ended_session_is_refused(app: FastAPI, alice: User) -> None:
    ticket = (await alice.post("/auth/ticket")).json()["ticket"]
    await alice.post("/auth/logout", json={"refresh_token": alice.refresh_token})
    with pytest.raises(Unauthorized):
        async with app.state.db.transaction() as session:
            await access_principal_by_ticket(session, ticket)


async def test_expired_ticket_is_refused(app: FastAPI, alice: User) -> None:
    ticket = (await alice.post("/auth/ticket")).json()["ticket"]
    async with app.state.db.transaction() as session:
        await session.execute(
            update(Ticket).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with pytest.raises(Unauthorized):
        async with app.state.db.transaction() as session:
            await access_principal_by_ticket(session, ticket)


async def test_unknown_ticket_is_refused(app: FastAPI) -> None:
    with pytest.raises(Unauthorized):
        async with app.state.db.transaction() as session:
            await access_principal_by_ticket(session, "no-such-ticket")


# -- me ---------------------------------------------------------------------------------


async def test_me_is_the_callers_own_user_with_email(make_user: UserFactory) -> None:
    dinah = await make_user("dinah", email="dinah@example.com", display_name="Dinah")
    resp = await dinah.get("/auth/me")
    assert resp.status_code == 200, resp.text
    assert resp.json() == dinah.body["user"]
    assert resp.json()["email"] == "dinah@example.com"


async def test_me_needs_auth(anon: Client) -> None:
    assert_problem(await anon.get("/auth/me"), 401, "unauthorized")


# -- password change --------------------------------------------------------------------


async def change_password(user: Client, current: str, new: str) -> httpx.Response:
    return await user.post(
        "/auth/password", json={"current_password": current, "new_password": new}
    )


async def test_password_change_ends_every_other_session(anon: Client, alice: User) -> None:
    other = await new_session(anon, alice)
    other_refresh = (await login(anon, "alice")).json()["refresh_token"]

    resp = await change_password(alice, PASSWORD, NEW_PASSWORD)
    assert resp.status_code == 204, resp.text
    assert resp.content == b""

    # The session that changed it goes on, refresh included.
    assert (await alice.get("/auth/me")).status_code == 200
    assert (await refresh(anon, alice.refresh_token)).status_code == 200
    # Every other session has ended.
    assert_problem(await other.get("/auth/me"), 401)
    assert_problem(await refresh(anon, other_refresh), 401)
    # Only the new password logs in.
    assert_problem(await login(anon, "alice", PASSWORD), 401, "invalid_credentials")
    assert (await login(anon, "alice", NEW_PASSWORD)).status_code == 200


async def test_password_change_with_wrong_current_password(anon: Client, alice: User) -> None:
    other = await new_session(anon, alice)
    resp = await change_password(alice, "not my password", NEW_PASSWORD)
    assert_problem(resp, 401, "invalid_credentials")
    # Nothing changed.
    assert (await alice.get("/auth/me")).status_code == 200
    assert (await other.get("/auth/me")).status_code == 200
    assert (await login(anon, "alice", PASSWORD)).status_code == 200
    assert_problem(await login(anon, "alice", NEW_PASSWORD), 401, "invalid_credentials")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"current_password": PASSWORD, "new_password": "short12"}, id="short"),
        pytest.param({"current_password": PASSWORD, "new_password": "p" * 257}, id="long"),
        pytest.param({"current_password": PASSWORD}, id="missing-new"),
        pytest.param({"new_password": NEW_PASSWORD}, id="missing-current"),
        pytest.param(
            {"current_password": PASSWORD, "new_password": NEW_PASSWORD, "user_id": "x"},
            id="unknown-field",
        ),
    ],
)
async def test_password_change_rejects_bad_input(
    anon: Client, alice: User, body: dict[str, Any]
) -> None:
    other = await new_session(anon, alice)
    assert_problem(await alice.post("/auth/password", json=body), 422, "validation_error")
    assert (await other.get("/auth/me")).status_code == 200
    assert (await login(anon, "alice", PASSWORD)).status_code == 200


async def test_password_change_needs_auth(anon: Client, alice: User) -> None:
    resp = await change_password(anon, PASSWORD, NEW_PASSWORD)
    assert_problem(resp, 401, "unauthorized")
    assert (await login(anon, "alice", PASSWORD)).status_code == 200


# -- rate limits ------------------------------------------------------------------------


def client_from(app: FastAPI, ip: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(ip, 50000)),
        base_url="http://test/api/v1/",
    )


@pytest.fixture
async def limited_app(app: FastAPI, app_factory: AppFactory) -> AsyncIterator[FastAPI]:
    """An app with limits on; `app` is requested first so the database starts empty."""
    limited = await app_factory(rate_limits="on", login_rate="3/minute", register_rate="2/minute")
    yield limited


async def test_login_is_rate_limited_per_ip(limited_app: FastAPI) -> None:
    anon = Client(limited_app)
    assert (
        await anon.post("/auth/register", json={"username": "alice", "password": PASSWORD})
    ).status_code == 201
    for _ in range(3):
        assert_problem(await login(anon, "alice", "wrong password"), 401, "invalid_credentials")
    # The fourth attempt is refused, even with the right password.
    resp = await login(anon, "alice")
    body = assert_problem(resp, 429, "rate_limited")
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert body["detail"]


async def test_login_is_rate_limited_per_account(limited_app: FastAPI) -> None:
    anon = Client(limited_app)
    for name in ("alice", "bob"):
        resp = await anon.post("/auth/register", json={"username": name, "password": PASSWORD})
        assert resp.status_code == 201, resp.text
    body = {"username": "alice", "password": "wrong password"}
    for n in range(3):
        async with client_from(limited_app, f"10.0.0.{n + 1}") as client:
            assert (await client.post("/auth/login", json=body)).status_code == 401
    # A fresh address gets no further with alice ...
    async with client_from(limited_app, "10.0.1.1") as client:
        resp = await client.post("/auth/login", json={"username": "ALICE", "password": PASSWORD})
        assert_problem(resp, 429, "rate_limited")
        assert "retry-after" in resp.headers
        # ... but bob, from that address, is not held up by alice's limit.
        resp = await client.post("/auth/login", json={"username": "bob", "password": PASSWORD})
        assert resp.status_code == 200, resp.text


async def test_register_is_rate_limited_per_ip(limited_app: FastAPI) -> None:
    anon = Client(limited_app)
    for name in ("first", "second"):
        resp = await anon.post("/auth/register", json={"username": name, "password": PASSWORD})
        assert resp.status_code == 201, resp.text
    resp = await anon.post("/auth/register", json={"username": "third", "password": PASSWORD})
    assert_problem(resp, 429, "rate_limited")
    assert int(resp.headers["retry-after"]) >= 1
    # The refused registration wrote nothing.
    assert_problem(await login(anon, "third"), 401, "invalid_credentials")


async def test_limits_are_off_when_configured_off(anon: Client, alice: User) -> None:
    # The suite's default app runs with PARLEY_RATE_LIMITS=off.
    for _ in range(12):
        assert (await login(anon, "alice", "wrong password")).status_code == 401


# -- hashing stays off the event loop ---------------------------------------------------


async def test_password_hashing_does_not_block_other_requests(
    anon: Client, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow (blocking) Argon2 verification must not stall the event loop: /health
    answers while a login is still hashing."""
    started = threading.Event()
    finished_at: list[float] = []
    real_verify = PasswordHash.verify

    def slow_verify(self: PasswordHash, password: str, hash: str) -> bool:
        started.set()
        time.sleep(0.5)  # stands in for the CPU work of a real-cost hash
        finished_at.append(time.perf_counter())
        return real_verify(self, password, hash)

    monkeypatch.setattr(PasswordHash, "verify", slow_verify)
    login_task = asyncio.create_task(login(anon, "alice"))
    for _ in range(200):
        if started.is_set():
            break
        await asyncio.sleep(0.01)
    assert started.is_set()

    health = await anon.get("/health")
    health_done = time.perf_counter()
    assert health.status_code == 200
    resp = await login_task
    assert resp.status_code == 200, resp.text
    # On the loop, the hash would have finished before /health could even start.
    assert health_done < finished_at[0]
