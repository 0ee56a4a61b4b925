"""Password hashing and token primitives. No I/O except the hashing thread."""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio.to_thread
import jwt
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from parley.errors import TokenExpired, Unauthorized

JWT_ALGORITHM = "HS256"
ACCESS_TOKEN_TYPE = "access"  # noqa: S105 (a claim value, not a secret)
TICKET_TTL_SECONDS = 30
# 32 random bytes: refresh tokens and tickets are bearer secrets, stored only as SHA-256.
OPAQUE_TOKEN_BYTES = 32


class PasswordHasher:
    """Argon2id, run in a worker thread: one hash takes tens of milliseconds of CPU and
    would stall every other request if it ran on the event loop."""

    def __init__(self, *, time_cost: int, memory_cost: int) -> None:
        self._hash = PasswordHash((Argon2Hasher(time_cost=time_cost, memory_cost=memory_cost),))
        # Verified against when the user does not exist, so that an unknown user costs
        # the same work as a wrong password.
        self._dummy = self._hash.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._hash.hash, password)

    async def verify(self, password: str, password_hash: str | None) -> bool:
        target = password_hash or self._dummy
        ok = await anyio.to_thread.run_sync(self._hash.verify, password, target)
        return ok and password_hash is not None


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    session_id: uuid.UUID
    expires_at: datetime


def issue_access_token(key: str, *, user_id: uuid.UUID, session_id: uuid.UUID, ttl: int) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "sid": str(session_id),
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
        "jti": secrets.token_urlsafe(12),
        "type": ACCESS_TOKEN_TYPE,
    }
    return jwt.encode(claims, key, algorithm=JWT_ALGORITHM)


# Access tokens verified lately, by (key, token). A client presents the same token on
# every request for its whole lifetime, and checking the signature and claims again
# costs more CPU than the rest of the authentication. Only the token's own, immutable
# content is remembered: the expiry is checked on every use, and whether the session is
# still live is always asked of the database. A token that fails is never remembered.
# Sized for the tokens in use at once on a busy process; a miss merely decodes again.
VERIFIED_TOKENS = 4096


def decode_access_token(key: str, token: str) -> AccessClaims:
    claims = _verified_claims(key, token)
    if claims.expires_at.timestamp() <= time.time():
        raise TokenExpired("The access token has expired")
    return claims


@functools.lru_cache(maxsize=VERIFIED_TOKENS)
def _verified_claims(key: str, token: str) -> AccessClaims:
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[JWT_ALGORITHM],
            options={"require": ["sub", "sid", "exp", "iat", "jti", "type"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenExpired("The access token has expired") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("The access token is invalid") from exc
    # A refresh token is opaque and never decodes, but a JWT of any other type must not
    # pass as an access token either.
    if claims.get("type") != ACCESS_TOKEN_TYPE:
        raise Unauthorized("The token is not an access token")
    try:
        return AccessClaims(
            user_id=uuid.UUID(claims["sub"]),
            session_id=uuid.UUID(claims["sid"]),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        )
    except (ValueError, TypeError) as exc:
        raise Unauthorized("The access token is invalid") from exc


def new_opaque_token() -> str:
    return secrets.token_urlsafe(OPAQUE_TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
