"""Users and the admin actions on them."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from parley.auth import repository as auth_repository
from parley.auth.service import Principal
from parley.db.base import utcnow
from parley.errors import Conflict, NotFound
from parley.models import User
from parley.pagination import decode_cursor, encode_cursor
from parley.users import repository
from parley.users.schemas import AdminUserPatch, UserPatch


class UserNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("No such user")


async def list_users(
    session: AsyncSession, *, q: str | None, cursor: str | None, limit: int, include_inactive: bool
) -> tuple[list[User], str | None]:
    after = str(decode_cursor(cursor, 1)[0]) if cursor else None
    rows = await repository.list_users(
        session, q=q, after_username=after, limit=limit + 1, include_inactive=include_inactive
    )
    next_cursor = encode_cursor(rows[limit - 1].username) if len(rows) > limit else None
    return rows[:limit], next_cursor


async def access_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await repository.get_active(session, user_id)
    if user is None:
        raise UserNotFound()
    return user


async def do_update_me(session: AsyncSession, principal: Principal, patch: UserPatch) -> User:
    user = principal.user
    fields = patch.model_fields_set
    if "display_name" in fields:
        name = (patch.display_name or "").strip()
        user.display_name = name or None
    if "email" in fields:
        email = str(patch.email).lower() if patch.email else None
        if email and await session.scalar(
            select(User.id).where(func.lower(User.email) == email, User.id != user.id)
        ):
            raise Conflict("That email is already registered")
        user.email = email
    user.updated_at = utcnow()
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:
        raise Conflict("That email is already registered") from exc
    return user


async def do_deactivate(session: AsyncSession, user: User, *, reason: str) -> list[uuid.UUID]:
    """Deactivate an account and end its sessions; its messages stay, shown as a deleted
    user."""
    user.is_active = False
    user.deactivated_at = utcnow()
    user.updated_at = user.deactivated_at
    await session.flush()
    return await auth_repository.end_sessions(session, user_id=user.id, reason=reason)


async def do_admin_update(
    session: AsyncSession, admin: Principal, user_id: uuid.UUID, patch: AdminUserPatch
) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise UserNotFound()
    if user.id == admin.id and (patch.role == "user" or patch.is_active is False):
        # Guards against an instance locking itself out of its last admin by accident.
        raise Conflict("Admins cannot demote or deactivate themselves")
    if patch.role is not None:
        user.role = patch.role
    if patch.is_active is not None and patch.is_active != user.is_active:
        if patch.is_active:
            user.is_active = True
            user.deactivated_at = None
        else:
            await do_deactivate(session, user, reason="deactivated")
    user.updated_at = utcnow()
    await session.flush()
    return user
