"""Accounts, sessions and tokens. Transport-free: REST, WebSocket and SSE call these."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from parley.auth import repository
from parley.auth.schemas import RegisterIn, TicketOut, TokenOut
from parley.auth.security import (
    TICKET_TTL_SECONDS,
    PasswordHasher,
    decode_access_token,
    issue_access_token,
    new_opaque_token,
    token_hash,
)
from parley.config import Settings
from parley.db.base import utcnow
from parley.errors import Conflict, InvalidCredentials, Unauthorized
from parley.models import AuthSession, RefreshToken, Ticket, User
from parley.users.schemas import MeOut


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: the user and the session the credential belongs to."""

    user: User
    session_id: uuid.UUID

    @property
    def id(self) -> uuid.UUID:
        return self.user.id

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"


async def check_username_free(session: AsyncSession, username: str, email: str | None) -> None:
    if await session.scalar(select(User.id).where(User.username == username)):
        raise Conflict("That username is taken")
    if email and await session.scalar(
        select(User.id).where(func.lower(User.email) == email.lower())
    ):
        raise Conflict("That email is already registered")


async def do_create_user(
    session: AsyncSession,
    hasher: PasswordHasher,
    *,
    username: str,
    password: str,
    email: str | None = None,
    display_name: str | None = None,
    role: str = "user",
) -> User:
    await check_username_free(session, username, email)
    user = User(
        username=username,
        email=email.lower() if email else None,
        display_name=display_name,
        password_hash=await hasher.hash(password),
        role=role,
    )
    try:
        # A savepoint, so that losing a race for the name leaves the transaction usable.
        async with session.begin_nested():
            session.add(user)
    except IntegrityError as exc:
        raise Conflict("That username or email is taken") from exc
    return user


async def do_start_session(session: AsyncSession, settings: Settings, user: User) -> TokenOut:
    auth_session = AuthSession(
        id=uuid.uuid4(),
        user_id=user.id,
        expires_at=utcnow() + timedelta(seconds=settings.refresh_token_ttl),
    )
    session.add(auth_session)
    await session.flush()
    return await _issue_tokens(session, settings, user, auth_session.id)


async def _issue_tokens(
    session: AsyncSession, settings: Settings, user: User, session_id: uuid.UUID
) -> TokenOut:
    refresh = new_opaque_token()
    session.add(RefreshToken(token_hash=token_hash(refresh), session_id=session_id))
    await session.flush()
    access = issue_access_token(
        settings.signing_key,
        user_id=user.id,
        session_id=session_id,
        ttl=settings.access_token_ttl,
    )
    return TokenOut(
        user=MeOut.model_validate(user),
        access_token=access,
        refresh_token=refresh,
        expires_in=settings.access_token_ttl,
    )


async def do_register(
    session: AsyncSession, settings: Settings, hasher: PasswordHasher, data: RegisterIn
) -> TokenOut:
    user = await do_create_user(
        session,
        hasher,
        username=data.username,
        password=data.password,
        email=str(data.email) if data.email else None,
        display_name=data.display_name,
    )
    return await do_start_session(session, settings, user)


async def do_login(
    session: AsyncSession, settings: Settings, hasher: PasswordHasher, username: str, password: str
) -> TokenOut:
    user = await session.scalar(select(User).where(User.username == username.strip().lower()))
    usable = user is not None and user.is_active
    # Always one Argon2 verification, against a dummy hash for unknown users, so both
    # failures take the same time and give the same answer.
    ok = await hasher.verify(password, user.password_hash if usable and user else None)
    if not ok or user is None:
        raise InvalidCredentials("Unknown username or wrong password")
    return await do_start_session(session, settings, user)


async def do_refresh(session: AsyncSession, settings: Settings, refresh_token: str) -> TokenOut:
    digest = token_hash(refresh_token)
    session_id = await repository.spend_refresh_token(session, digest)
    if session_id is None:
        known = await repository.get_refresh_token(session, digest)
        if known is not None:
            # A spent token presented again: someone holds a copy. End the session so
            # that neither the thief nor the owner can go on with it; the owner logs in.
            await repository.end_sessions(session, session_id=known.session_id, reason="reuse")
            await session.commit()
            raise Unauthorized("The refresh token was already used; the session has ended")
        raise Unauthorized("The refresh token is invalid")
    live = await repository.get_live_session(session, session_id)
    user = await session.get(User, live.user_id) if live else None
    if live is None or user is None or not user.is_active:
        raise Unauthorized("The session has ended")
    # PARLEY_REFRESH_TOKEN_TTL is the lifetime of each refresh token, so every rotation
    # gives the session that long again: a client in use stays signed in, one left
    # unused for the whole TTL has to log in again.
    live.expires_at = utcnow() + timedelta(seconds=settings.refresh_token_ttl)
    return await _issue_tokens(session, settings, user, live.id)


async def do_logout(session: AsyncSession, refresh_token: str) -> list[uuid.UUID]:
    known = await repository.get_refresh_token(session, token_hash(refresh_token))
    if known is None:
        raise Unauthorized("The refresh token is invalid")
    return await repository.end_sessions(session, session_id=known.session_id, reason="logout")


async def do_change_password(
    session: AsyncSession,
    hasher: PasswordHasher,
    principal: Principal,
    current_password: str,
    new_password: str,
) -> list[uuid.UUID]:
    if not await hasher.verify(current_password, principal.user.password_hash):
        raise InvalidCredentials("The current password is wrong")
    principal.user.password_hash = await hasher.hash(new_password)
    principal.user.updated_at = utcnow()
    return await repository.end_sessions(
        session,
        user_id=principal.id,
        except_session=principal.session_id,
        reason="password_changed",
    )


async def do_issue_ticket(session: AsyncSession, principal: Principal) -> TicketOut:
    ticket = new_opaque_token()
    now = utcnow()
    await repository.delete_expired_tickets(session, now)
    session.add(
        Ticket(
            token_hash=token_hash(ticket),
            session_id=principal.session_id,
            user_id=principal.id,
            expires_at=now + timedelta(seconds=TICKET_TTL_SECONDS),
        )
    )
    await session.flush()
    return TicketOut(ticket=ticket, expires_in=TICKET_TTL_SECONDS)


async def access_principal_by_token(
    session: AsyncSession, settings: Settings, token: str
) -> Principal:
    claims = decode_access_token(settings.signing_key, token)
    return await access_principal(session, claims.user_id, claims.session_id)


async def access_principal(
    session: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID
) -> Principal:
    """The caller of a live session, whose credential was verified already."""
    user = await repository.get_active_user_for_session(session, user_id, session_id)
    if user is None:
        raise Unauthorized("The session has ended")
    return Principal(user=user, session_id=session_id)


async def access_principal_by_ticket(session: AsyncSession, ticket: str) -> Principal:
    """Spend a handshake ticket (single use) and return whom it was issued to."""
    row = await repository.consume_ticket(session, token_hash(ticket))
    if row is None:
        raise Unauthorized("The ticket is invalid, expired or already used")
    return await access_principal(session, row.user_id, row.session_id)
