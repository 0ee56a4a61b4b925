"""SQL for messages, versions, mentions, read markers and search."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import (
    CursorResult,
    Select,
    and_,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from parley.db.base import utcnow
from parley.models import Conversation, Membership, Mention, Message, MessageVersion, ReadMark, User

# SQLite's trigram tokenizer indexes 3-character sequences; shorter terms fall back to a
# LIKE scan of the caller's conversations.
TRIGRAM = 3


def escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def case_forms(term: str) -> list[str]:
    """Every spelling of a short term that differs only in letter case ("ab": ab, aB, Ab, AB).

    One-character forms only, so the term keeps its length ("ß" does not become "SS")."""
    forms = [""]
    for char in term:
        options = dict.fromkeys(
            c for c in (char, char.lower(), char.upper(), char.swapcase()) if len(c) == 1
        )
        forms = [form + option for form in forms for option in options]
    return forms


async def get_for_member(
    session: AsyncSession, message_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Message, Membership] | None:
    """A message of a live conversation the user is a member of."""
    stmt = (
        select(Message, Membership)
        .join(
            Membership,
            and_(
                Membership.conversation_id == Message.conversation_id,
                Membership.user_id == user_id,
            ),
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.id == message_id, Conversation.deleted_at.is_(None))
    )
    row = (await session.execute(stmt)).one_or_none()
    return (row[0], row[1]) if row else None


async def get_in_live_conversation(session: AsyncSession, message_id: uuid.UUID) -> Message | None:
    stmt = (
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.id == message_id, Conversation.deleted_at.is_(None))
    )
    return await session.scalar(stmt)


async def find_by_client_id(
    session: AsyncSession, conversation_id: uuid.UUID, sender_id: uuid.UUID, client_msg_id: str
) -> Message | None:
    stmt = select(Message).where(
        Message.conversation_id == conversation_id,
        Message.sender_id == sender_id,
        Message.client_msg_id == client_msg_id,
    )
    return await session.scalar(stmt.execution_options(populate_existing=True))


async def page(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    before: int | None,
    after: int | None,
    limit: int,
) -> tuple[list[Message], bool]:
    """Messages in ascending seq. Bounds are exclusive; `after` pages forward from the
    oldest, otherwise the page is the newest `limit` below `before` (or the top)."""
    stmt = select(Message).where(Message.conversation_id == conversation_id)
    if before is not None:
        stmt = stmt.where(Message.seq < before)
    if after is not None:
        stmt = stmt.where(Message.seq > after).order_by(Message.seq)
    else:
        stmt = stmt.order_by(Message.seq.desc())
    rows = list((await session.scalars(stmt.limit(limit + 1))).all())
    has_more = len(rows) > limit
    rows = rows[:limit]
    if after is None:
        rows.reverse()
    return rows, has_more


async def changed_after(
    session: AsyncSession, conversation_id: uuid.UUID, seq: int, limit: int
) -> tuple[list[Message], bool]:
    stmt = (
        select(Message)
        .where(Message.conversation_id == conversation_id, Message.updated_seq > seq)
        .order_by(Message.updated_seq)
        .limit(limit + 1)
    )
    rows = list((await session.scalars(stmt)).all())
    return rows[:limit], len(rows) > limit


async def users_by_id(session: AsyncSession, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, User]:
    if not ids:
        return {}
    rows = await session.scalars(select(User).where(User.id.in_(set(ids))))
    return {u.id: u for u in rows}


async def mentions_of(
    session: AsyncSession, message_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    if not message_ids:
        return {}
    stmt = select(Mention.message_id, Mention.user_id).where(Mention.message_id.in_(message_ids))
    out: dict[uuid.UUID, list[uuid.UUID]] = {}
    for message_id, user_id in (await session.execute(stmt)).all():
        out.setdefault(message_id, []).append(user_id)
    return out


async def member_ids_by_username(
    session: AsyncSession, conversation_id: uuid.UUID, usernames: Sequence[str]
) -> dict[str, uuid.UUID]:
    """The conversation's members among these usernames, by username."""
    if not usernames:
        return {}
    stmt = (
        select(User.username, User.id)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.conversation_id == conversation_id, User.username.in_(usernames))
    )
    return {username: user_id for username, user_id in (await session.execute(stmt)).all()}


async def replace_mentions(
    session: AsyncSession, message: Message, user_ids: Sequence[uuid.UUID]
) -> None:
    await session.execute(delete(Mention).where(Mention.message_id == message.id))
    for user_id in user_ids:
        session.add(
            Mention(
                message_id=message.id,
                user_id=user_id,
                conversation_id=message.conversation_id,
                seq=message.seq,
            )
        )


async def others_markers(
    session: AsyncSession, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[str, int | None, int | None]:
    """The conversation's kind, and the lowest read and delivered markers among the other
    members (None when there are none), in one query."""
    stmt = (
        select(
            Conversation.kind,
            func.min(Membership.last_read_seq),
            func.min(Membership.delivered_seq),
        )
        .outerjoin(
            Membership,
            and_(Membership.conversation_id == Conversation.id, Membership.user_id != user_id),
        )
        .where(Conversation.id == conversation_id)
        .group_by(Conversation.kind)
    )
    row = (await session.execute(stmt)).one_or_none()
    if row is None:
        return "room", None, None
    return row[0], row[1], row[2]


class MessageRow(Protocol):
    """What the send statement stores and a view of a message reads: a Message, or a
    message sent without the ORM (parley.messages.service.do_send_message_autocommit)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def conversation_id(self) -> uuid.UUID: ...
    @property
    def sender_id(self) -> uuid.UUID: ...
    @property
    def seq(self) -> int: ...
    @property
    def updated_seq(self) -> int: ...
    @property
    def content(self) -> str: ...
    @property
    def client_msg_id(self) -> str | None: ...
    @property
    def reply_to_id(self) -> uuid.UUID | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def edited_at(self) -> datetime | None: ...
    @property
    def deleted_at(self) -> datetime | None: ...


# One round trip for the common send on PostgreSQL: check the sender's session and
# membership, lock the conversation (which orders concurrent senders), insert the message
# at the next seq with its event-log row, take that seq, move the sender's read marker,
# and tell what the sender's view of the message needs. It is a whole send by itself, so
# it runs outside any transaction when nothing else is to be written (see
# parley.messages.service.do_send_message_autocommit), and inside one otherwise.
#
# The seq is taken only once the message row is in: a client_msg_id that already exists
# (committed, or by a twin this statement waited for at the lock) inserts nothing and
# takes nothing, so no seq is ever lost and no savepoint is needed.
#
# The lock is the one an UPDATE of the row would take (NO KEY: inserts elsewhere that
# merely reference the conversation are not held up), and, having waited for it, the
# statement sees the newest row. The session and membership checks, though, come from
# the snapshot taken before that wait. Every change of members moves the row's
# member_seq under the same lock, so `settled` (it did not move in between) says the
# snapshot's membership still holds. Other sends in between do not unsettle it. When it
# is false the statement inserts nothing; inside a transaction the caller then runs it
# again: holding the lock by now, it sees a membership no one can change meanwhile.
SEND_SQL = """
WITH who AS (
    SELECT u.username, u.display_name
    FROM auth_sessions s JOIN users u ON u.id = s.user_id
    WHERE s.id = :sid AND u.id = :uid AND s.ended_at IS NULL AND s.expires_at > :now
      AND u.is_active
), prior AS (
    SELECT member_seq FROM conversations WHERE id = :cid
), conv AS (
    SELECT last_seq, member_seq, kind FROM conversations
    WHERE id = :cid AND deleted_at IS NULL
      AND EXISTS (SELECT 1 FROM who)
      AND EXISTS (SELECT 1 FROM memberships WHERE conversation_id = :cid AND user_id = :uid)
    FOR NO KEY UPDATE
), msg AS (
    INSERT INTO messages
        (id, conversation_id, seq, updated_seq, sender_id, content, client_msg_id,
         reply_to_id, created_at)
    SELECT :mid, :cid, last_seq + 1, last_seq + 1, :uid, :content, :cmid, :reply, :now
    FROM conv
    WHERE conv.member_seq = (SELECT member_seq FROM prior)
    ON CONFLICT (conversation_id, sender_id, client_msg_id) DO NOTHING
    RETURNING seq
), taken AS (
    UPDATE conversations
    SET last_seq = msg.seq, last_activity_at = :now, updated_at = :now
    FROM msg
    WHERE id = :cid
), event AS (
    INSERT INTO conversation_events (conversation_id, seq, type, message_id, actor_id, created_at)
    SELECT :cid, seq, 'message.created', :mid, :uid, :now FROM msg
), marker AS (
    UPDATE memberships
    SET last_read_seq = msg.seq, last_read_at = :now,
        delivered_seq = GREATEST(delivered_seq, msg.seq)
    FROM msg
    WHERE conversation_id = :cid AND user_id = :uid AND last_read_seq < msg.seq
    RETURNING msg.seq
), mark AS (
    INSERT INTO read_marks (conversation_id, user_id, seq, read_at)
    SELECT :cid, :uid, seq, :now FROM marker
)
SELECT who.username, who.display_name,
       (SELECT seq FROM msg) AS seq, conv.kind,
       conv.member_seq = (SELECT member_seq FROM prior) AS settled,
       others.min_read, others.min_delivered
FROM who
LEFT JOIN conv ON true
LEFT JOIN LATERAL (
    -- Only direct and group conversations show a status; a room may be large.
    SELECT min(last_read_seq) AS min_read, min(delivered_seq) AS min_delivered
    FROM memberships
    WHERE conversation_id = :cid AND user_id <> :uid AND conv.kind <> 'room'
) others ON true
"""
_SEND = text(SEND_SQL)
SEND_PARAMS = ("uid", "sid", "cid", "mid", "content", "cmid", "reply", "now")
# The same statement in asyncpg's own form ($1… in SEND_PARAMS order), for a driver
# connection; the benchmark's framework-free baseline runs it too (bench/baselines).
SEND_SQL_POSITIONAL = re.sub(
    r":(" + "|".join(SEND_PARAMS) + r")\b",
    lambda m: f"${SEND_PARAMS.index(m[1]) + 1}",
    SEND_SQL,
)


@dataclass(frozen=True, slots=True)
class Sent:
    """What the send statement answers when the session is live."""

    username: str
    display_name: str | None
    seq: int | None  # None: nothing stored (a known client_msg_id, or not settled)
    kind: str | None  # None: not a member of a live conversation, nothing stored
    settled: bool | None
    min_read: int | None
    min_delivered: int | None


def _send_params(message: MessageRow, session_id: uuid.UUID) -> tuple[Any, ...]:
    return (
        message.sender_id,
        session_id,
        message.conversation_id,
        message.id,
        message.content,
        message.client_msg_id,
        message.reply_to_id,
        message.created_at,
    )


async def send_message(
    session: AsyncSession, message: Message, session_id: uuid.UUID
) -> Sent | None:
    """The send statement inside the session's transaction, for a message not yet in the
    session (its seq is what it returns); None when the sender's session has ended."""
    params = dict(zip(SEND_PARAMS, _send_params(message, session_id), strict=True))
    row = (await session.execute(_SEND, params)).one_or_none()
    return None if row is None else Sent(*row)


async def send_message_autocommit(
    conn: Any, message: MessageRow, session_id: uuid.UUID
) -> Sent | None:
    """The send statement on an asyncpg connection outside any transaction, as its own;
    None when the sender's session has ended."""
    row = await conn.fetchrow(SEND_SQL_POSITIONAL, *_send_params(message, session_id))
    return None if row is None else Sent(*row)


async def insert_mentions(
    session: AsyncSession, message: Message, user_ids: Sequence[uuid.UUID]
) -> None:
    if user_ids:
        await session.execute(
            insert(Mention),
            [
                {
                    "message_id": message.id,
                    "user_id": user_id,
                    "conversation_id": message.conversation_id,
                    "seq": message.seq,
                }
                for user_id in user_ids
            ],
        )


async def advance_read_marker(
    session: AsyncSession, conversation_id: uuid.UUID, user_id: uuid.UUID, seq: int
) -> bool:
    """Move a read marker forward (never back); whether it moved."""
    now = utcnow()
    stmt = (
        update(Membership)
        .where(
            Membership.conversation_id == conversation_id,
            Membership.user_id == user_id,
            Membership.last_read_seq < seq,
        )
        .values(
            last_read_seq=seq,
            last_read_at=now,
            delivered_seq=func.max(Membership.delivered_seq, seq)
            if session.get_bind().dialect.name == "sqlite"
            else func.greatest(Membership.delivered_seq, seq),
        )
        .execution_options(synchronize_session=False)
    )
    # An UPDATE answers a CursorResult, which carries the row count.
    result = cast("CursorResult[Any]", await session.execute(stmt))
    moved = result.rowcount > 0
    if moved:
        session.add(
            ReadMark(conversation_id=conversation_id, user_id=user_id, seq=seq, read_at=now)
        )
    return moved


async def receipts(
    session: AsyncSession,
    message: Message,
    viewer_id: uuid.UUID,
    *,
    after_user: uuid.UUID | None,
    limit: int,
) -> list[tuple[Membership, datetime | None]]:
    """Other members with the time their marker first passed the message."""
    read_at = (
        select(func.min(ReadMark.read_at))
        .where(
            ReadMark.conversation_id == Membership.conversation_id,
            ReadMark.user_id == Membership.user_id,
            ReadMark.seq >= message.seq,
        )
        .scalar_subquery()
    )
    stmt = select(Membership, read_at).where(
        Membership.conversation_id == message.conversation_id,
        Membership.user_id != viewer_id,
    )
    if after_user is not None:
        stmt = stmt.where(Membership.user_id > after_user)
    stmt = stmt.order_by(Membership.user_id).limit(limit)
    return [(m, at) for m, at in (await session.execute(stmt)).all()]


async def versions(
    session: AsyncSession,
    message_id: uuid.UUID,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[MessageVersion]:
    stmt = select(MessageVersion).where(MessageVersion.message_id == message_id)
    if after is not None:
        at, vid = after
        stmt = stmt.where(
            or_(
                MessageVersion.replaced_at > at,
                and_(MessageVersion.replaced_at == at, MessageVersion.id > vid),
            )
        )
    stmt = stmt.order_by(MessageVersion.replaced_at, MessageVersion.id).limit(limit)
    return list((await session.scalars(stmt)).all())


async def delete_versions(session: AsyncSession, message_id: uuid.UUID) -> None:
    await session.execute(delete(MessageVersion).where(MessageVersion.message_id == message_id))


def _newest_first(
    stmt: Select[Message], after: tuple[datetime, uuid.UUID] | None, limit: int
) -> Select[Message]:
    if after is not None:
        at, mid = after
        stmt = stmt.where(
            or_(Message.created_at < at, and_(Message.created_at == at, Message.id < mid))
        )
    return stmt.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)


def _readable_by(user_id: uuid.UUID) -> Select[Message]:
    """Messages of live conversations the user is a member of, not deleted."""
    return (
        select(Message)
        .join(
            Membership,
            and_(
                Membership.conversation_id == Message.conversation_id, Membership.user_id == user_id
            ),
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.deleted_at.is_(None), Message.deleted_at.is_(None))
    )


async def search(
    session: AsyncSession,
    user_id: uuid.UUID,
    q: str,
    *,
    conversation_id: uuid.UUID | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Message]:
    stmt = _readable_by(user_id)
    if conversation_id is not None:
        stmt = stmt.where(Message.conversation_id == conversation_id)
    dialect = session.get_bind().dialect.name
    pattern = "%" + escape_like(q) + "%"
    if dialect == "postgresql":
        # ILIKE over a pg_trgm GIN index: case-insensitive and partial words.
        stmt = stmt.where(Message.content.ilike(pattern, escape="\\"))
    elif len(q) >= TRIGRAM:
        phrase = '"' + q.replace('"', '""') + '"'
        matching = text(
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH :phrase"
        ).bindparams(phrase=phrase)
        stmt = stmt.where(literal_column("messages.rowid").in_(matching))
    else:
        # Shorter than a trigram: a scan of the caller's conversations. SQLite's LIKE and
        # lower() fold ASCII only ("é" would miss "É"), so every case form of the one or two
        # characters is looked for instead.
        stmt = stmt.where(or_(*(func.instr(Message.content, form) > 0 for form in case_forms(q))))
    return list((await session.scalars(_newest_first(stmt, after, limit))).all())


async def by_sender_readable(
    session: AsyncSession,
    viewer_id: uuid.UUID,
    sender_id: uuid.UUID,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Message]:
    stmt = _readable_by(viewer_id).where(Message.sender_id == sender_id)
    return list((await session.scalars(_newest_first(stmt, after, limit))).all())
