"""SQL for sessions, refresh tokens and tickets."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from parley.db.base import utcnow
from parley.models import AuthSession, RefreshToken, Ticket, User

# Built once with bind parameters: it runs on every authenticated request, and putting
# the select together costs more CPU than running it.
_ACTIVE_USER_FOR_SESSION = (
    select(User)
    .join(AuthSession, AuthSession.user_id == User.id)
    .where(
        AuthSession.id == bindparam("session_id"),
        User.id == bindparam("user_id"),
        AuthSession.ended_at.is_(None),
        AuthSession.expires_at > bindparam("now"),
        User.is_active.is_(True),
    )
)


async def get_active_user_for_session(
    session: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID
) -> User | None:
    """The user of a live session: one query, checked on every authenticated request so
    that an ended session's access tokens are refused at once."""
    params = {"session_id": session_id, "user_id": user_id, "now": utcnow()}
    return (await session.execute(_ACTIVE_USER_FOR_SESSION, params)).scalar_one_or_none()


async def spend_refresh_token(session: AsyncSession, token_hash: str) -> uuid.UUID | None:
    """Mark a refresh token spent; the session id if it was live, else None.

    A single conditional UPDATE, so two concurrent refreshes with one token cannot both
    succeed."""
    stmt = (
        update(RefreshToken)
        .where(RefreshToken.token_hash == token_hash, RefreshToken.spent_at.is_(None))
        .values(spent_at=utcnow())
        .returning(RefreshToken.session_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_refresh_token(session: AsyncSession, token_hash: str) -> RefreshToken | None:
    return await session.get(RefreshToken, token_hash)


async def get_live_session(session: AsyncSession, session_id: uuid.UUID) -> AuthSession | None:
    stmt = select(AuthSession).where(
        AuthSession.id == session_id,
        AuthSession.ended_at.is_(None),
        AuthSession.expires_at > utcnow(),
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def end_sessions(
    session: AsyncSession,
    *,
    user_id: uuid.UUID | None = None,
    session_id: uuid.UUID | None = None,
    except_session: uuid.UUID | None = None,
    reason: str,
) -> list[uuid.UUID]:
    """End live sessions by user or id; the ids that were ended."""
    stmt = update(AuthSession).where(AuthSession.ended_at.is_(None))
    if user_id is not None:
        stmt = stmt.where(AuthSession.user_id == user_id)
    if session_id is not None:
        stmt = stmt.where(AuthSession.id == session_id)
    if except_session is not None:
        stmt = stmt.where(AuthSession.id != except_session)
    stmt = stmt.values(ended_at=utcnow(), end_reason=reason).returning(AuthSession.id)
    return list((await session.execute(stmt)).scalars())


async def consume_ticket(session: AsyncSession, token_hash: str) -> Ticket | None:
    stmt = (
        delete(Ticket)
        .where(Ticket.token_hash == token_hash, Ticket.expires_at > utcnow())
        .returning(Ticket)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def delete_expired_tickets(session: AsyncSession, now: datetime) -> None:
    await session.execute(delete(Ticket).where(Ticket.expires_at <= now))
