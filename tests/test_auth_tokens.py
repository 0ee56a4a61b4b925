"""Access-token checks that are remembered between requests (parley.auth.security): what
is remembered must never let a token through that a fresh check would refuse."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi import FastAPI

from parley.auth.security import decode_access_token, issue_access_token
from parley.errors import TokenExpired, Unauthorized
from tests.conftest import Client, User, assert_problem

KEY = "token-test-key-" + "k" * 40


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    token = issue_access_token(KEY, user_id=user_id, session_id=session_id, ttl=60)
    claims = decode_access_token(KEY, token)
    assert (claims.user_id, claims.session_id) == (user_id, session_id)
    assert decode_access_token(KEY, token) == claims  # remembered, still valid

    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(TokenExpired):
        decode_access_token(KEY, token)


def test_a_token_remembered_under_one_key_is_refused_under_another() -> None:
    token = issue_access_token(KEY, user_id=uuid.uuid4(), session_id=uuid.uuid4(), ttl=60)
    decode_access_token(KEY, token)
    with pytest.raises(Unauthorized):
        decode_access_token("another-key-" + "y" * 40, token)


def test_a_refused_token_is_refused_every_time() -> None:
    token = issue_access_token(KEY, user_id=uuid.uuid4(), session_id=uuid.uuid4(), ttl=60)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            decode_access_token(KEY, tampered)


async def test_a_token_used_before_its_session_ended_is_refused_after(
    app: FastAPI, alice: User
) -> None:
    """Only the token's own content is remembered; the session is asked of the database
    on every request (§3: an ended session's tokens are refused at once)."""
    assert (await alice.get("/auth/me")).status_code == 200
    resp = await alice.post("/auth/logout", json={"refresh_token": alice.refresh_token})
    assert resp.status_code == 204, resp.text
    assert_problem(await Client(app, alice.access_token).get("/auth/me"), 401, "unauthorized")
