"""SQL for conversations, memberships, bans and the per-conversation sequence.

Statements that read for a user start from that user's memberships, so a forgotten
check returns nothing rather than someone else's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from parley.db.base import utcnow
from parley.models import (
    Conversation,
    ConversationBan,
    ConversationEvent,
    Membership,
    Mention,
    Message,
    User,
)


async def lock_conversation_txn(
    session: AsyncSession, conversation_id: uuid.UUID
) -> Conversation | None:
    """Load a live conversation and hold its row lock until commit (PostgreSQL).

    SQLite needs no row lock: write transactions there begin IMMEDIATE and so are
    already serialized."""
    stmt = (
        select(Conversation)
        .where(Conversation.id == conversation_id, Conversation.deleted_at.is_(None))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def next_seq_txn(
    session: AsyncSession, conversation_id: uuid.UUID, *, activity: bool = False
) -> int:
    """Take the conversation's next seq.

    The UPDATE holds the row lock until commit, which orders concurrent writers; a
    rollback returns the number, so committed seqs have no gaps."""
    values: dict[str, Any] = {"last_seq": Conversation.last_seq + 1}
    if activity:
        values["last_activity_at"] = utcnow()
    stmt = (
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.deleted_at.is_(None))
        .values(**values)
        .returning(Conversation.last_seq)
        .execution_options(synchronize_session=False)
    )
    seq = (await session.execute(stmt)).scalar_one_or_none()
    if seq is None:
        raise LookupError(conversation_id)
    return seq


async def record_event_txn(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    seq: int,
    type_: str,
    *,
    message_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
    actor_id: uuid.UUID | None = None,
    role: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        ConversationEvent(
            conversation_id=conversation_id,
            seq=seq,
            type=type_,
            message_id=message_id,
            user_id=user_id,
            actor_id=actor_id,
            role=role,
            data=data,
        )
    )


async def get_live(session: AsyncSession, conversation_id: uuid.UUID) -> Conversation | None:
    return await session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.deleted_at.is_(None)
        )
    )


async def get_membership(
    session: AsyncSession, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> Membership | None:
    return await session.get(Membership, (conversation_id, user_id), populate_existing=True)


async def get_with_membership(
    session: AsyncSession, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Conversation, Membership | None] | None:
    stmt = (
        select(Conversation, Membership)
        .outerjoin(
            Membership,
            and_(Membership.conversation_id == Conversation.id, Membership.user_id == user_id),
        )
        .where(Conversation.id == conversation_id, Conversation.deleted_at.is_(None))
    )
    row = (await session.execute(stmt)).one_or_none()
    return (row[0], row[1]) if row else None


async def get_direct_by_key(session: AsyncSession, key: str) -> Conversation | None:
    return await session.scalar(select(Conversation).where(Conversation.direct_key == key))


async def is_banned(session: AsyncSession, conversation_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    return await session.get(ConversationBan, (conversation_id, user_id)) is not None


async def list_for_user(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[tuple[Conversation, Membership]]:
    stmt = (
        select(Conversation, Membership)
        .join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user_id, Conversation.deleted_at.is_(None))
    )
    if after is not None:
        at, cid = after
        stmt = stmt.where(
            or_(
                Conversation.last_activity_at < at,
                and_(Conversation.last_activity_at == at, Conversation.id < cid),
            )
        )
    stmt = stmt.order_by(Conversation.last_activity_at.desc(), Conversation.id.desc()).limit(limit)
    return [(c, m) for c, m in (await session.execute(stmt)).all()]


async def list_public(
    session: AsyncSession,
    viewer_id: uuid.UUID,
    *,
    q: str | None,
    after: tuple[str, uuid.UUID] | None,
    limit: int,
) -> list[tuple[Conversation, Membership | None, str]]:
    """Rooms by lower-cased name, each with its sort key as the database computed it.

    The next page's cursor must carry that key, not Python's `str.lower()` of the name:
    the two differ outside ASCII (SQLite's lower() folds ASCII only), and a cursor key
    the database does not order the same way skips or repeats rooms."""
    name_key = func.lower(Conversation.name)
    stmt = (
        select(Conversation, Membership, name_key)
        .outerjoin(
            Membership,
            and_(Membership.conversation_id == Conversation.id, Membership.user_id == viewer_id),
        )
        .where(Conversation.kind == "room", Conversation.deleted_at.is_(None))
    )
    if q:
        pattern = (
            "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        stmt = stmt.where(name_key.like(pattern, escape="\\"))
    if after is not None:
        name, cid = after
        stmt = stmt.where(or_(name_key > name, and_(name_key == name, Conversation.id > cid)))
    stmt = stmt.order_by(name_key, Conversation.id).limit(limit)
    return [(c, m, key or "") for c, m, key in (await session.execute(stmt)).all()]


async def last_messages(
    session: AsyncSession, conversation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[Message, User]]:
    if not conversation_ids:
        return {}
    newest = (
        select(Message.conversation_id, func.max(Message.seq))
        .where(Message.conversation_id.in_(conversation_ids), Message.deleted_at.is_(None))
        .group_by(Message.conversation_id)
    )
    stmt = (
        select(Message, User)
        .join(User, User.id == Message.sender_id)
        .where(tuple_(Message.conversation_id, Message.seq).in_(newest))
    )
    return {m.conversation_id: (m, u) for m, u in (await session.execute(stmt)).all()}


async def unread_counts(
    session: AsyncSession, user_id: uuid.UUID, conversation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Messages by others, not deleted, after the caller's read marker."""
    if not conversation_ids:
        return {}
    stmt = (
        select(Message.conversation_id, func.count())
        .join(
            Membership,
            and_(
                Membership.conversation_id == Message.conversation_id,
                Membership.user_id == user_id,
            ),
        )
        .where(
            Message.conversation_id.in_(conversation_ids),
            Message.seq > Membership.last_read_seq,
            Message.sender_id != user_id,
            Message.deleted_at.is_(None),
        )
        .group_by(Message.conversation_id)
    )
    return {cid: n for cid, n in (await session.execute(stmt)).all()}


async def mention_counts(
    session: AsyncSession, user_id: uuid.UUID, conversation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    if not conversation_ids:
        return {}
    stmt = (
        select(Mention.conversation_id, func.count())
        .join(
            Membership,
            and_(
                Membership.conversation_id == Mention.conversation_id,
                Membership.user_id == user_id,
            ),
        )
        .join(Message, Message.id == Mention.message_id)
        .where(
            Mention.user_id == user_id,
            Mention.conversation_id.in_(conversation_ids),
            Mention.seq > Membership.last_read_seq,
            Message.deleted_at.is_(None),
        )
        .group_by(Mention.conversation_id)
    )
    return {cid: n for cid, n in (await session.execute(stmt)).all()}


async def direct_partners(
    session: AsyncSession, user_id: uuid.UUID, conversation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, User]:
    if not conversation_ids:
        return {}
    stmt = (
        select(Membership.conversation_id, User)
        .join(User, User.id == Membership.user_id)
        .where(Membership.conversation_id.in_(conversation_ids), Membership.user_id != user_id)
    )
    return {cid: user for cid, user in (await session.execute(stmt)).all()}


async def list_members(
    session: AsyncSession, conversation_id: uuid.UUID, *, after_seq: int | None, limit: int
) -> list[tuple[Membership, User]]:
    stmt = (
        select(Membership, User)
        .join(User, User.id == Membership.user_id)
        .where(Membership.conversation_id == conversation_id)
    )
    if after_seq is not None:
        stmt = stmt.where(Membership.joined_seq > after_seq)
    stmt = stmt.order_by(Membership.joined_seq, Membership.user_id).limit(limit)
    return [(m, u) for m, u in (await session.execute(stmt)).all()]


async def successor(
    session: AsyncSession, conversation_id: uuid.UUID, leaving: uuid.UUID
) -> Membership | None:
    """Who inherits ownership: the longest-standing admin, else the longest-standing member."""
    admin_first = case((Membership.role == "admin", 0), else_=1)
    stmt = (
        select(Membership)
        .where(Membership.conversation_id == conversation_id, Membership.user_id != leaving)
        .order_by(admin_first, Membership.joined_seq)
        .limit(1)
    )
    return await session.scalar(stmt)


async def delete_membership(
    session: AsyncSession, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    await session.execute(
        delete(Membership).where(
            Membership.conversation_id == conversation_id, Membership.user_id == user_id
        )
    )


async def active_user_ids(session: AsyncSession, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not ids:
        return set()
    stmt = select(User.id).where(User.id.in_(ids), User.is_active.is_(True))
    return set((await session.scalars(stmt)).all())
