"""SQL for users."""

from __future__ import annotations

import uuid

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from parley.models import Conversation, Message, User


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def list_users(
    session: AsyncSession,
    *,
    q: str | None,
    after_username: str | None,
    limit: int,
    include_inactive: bool = False,
) -> list[User]:
    """Users by username, after `after_username`; `q` is a case-insensitive prefix of the
    username or the display name."""
    stmt = select(User)
    if not include_inactive:
        stmt = stmt.where(User.is_active.is_(True))
    if q:
        prefix = _escape_like(q.lower()) + "%"
        stmt = stmt.where(
            or_(
                User.username.like(prefix, escape="\\"),
                func.lower(User.display_name).like(prefix, escape="\\"),
            )
        )
    if after_username is not None:
        stmt = stmt.where(User.username > after_username)
    return list((await session.scalars(stmt.order_by(User.username).limit(limit))).all())


async def get_active(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.scalar(select(User).where(User.id == user_id, User.is_active.is_(True)))


async def get_by_username(session: AsyncSession, username: str) -> User | None:
    return await session.scalar(select(User).where(User.username == username))


async def count_stats(session: AsyncSession) -> tuple[int, int, int, int]:
    users = await session.scalar(select(func.count()).select_from(User)) or 0
    active = await session.scalar(select(func.count()).where(User.is_active.is_(True))) or 0
    conversations = (
        await session.scalar(
            select(func.count()).select_from(Conversation).where(Conversation.deleted_at.is_(None))
        )
        or 0
    )
    messages = await session.scalar(select(func.count()).select_from(Message)) or 0
    return users, active, conversations, messages
