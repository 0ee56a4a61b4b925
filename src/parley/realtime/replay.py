"""Events rebuilt from the database: for holes, catch-ups and resume (§9.3).

The conversation's event log has one row per seq. Message events are rebuilt from the
message's current state, so a replayed message is never older than what it describes.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from parley.messages import repository as messages_repository
from parley.messages.service import message_view
from parley.models import Conversation, ConversationEvent, Message
from parley.realtime.envelope import Envelope, gap_payload, to_conversation
from parley.realtime.events import EventMessage, MemberEvent, MessageEvent

# §8: a resume sends at most this many events of one conversation; older ones are
# announced with a `gap` and fetched by the client with changed_after.
RESUME_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Replay:
    envelopes: list[Envelope]
    last_seq: int  # where the conversation stood when it was read
    gap: bytes | None = None  # the `gap` event to send before the envelopes


async def last_seqs(
    session: AsyncSession, conversation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int | None]:
    """Current last_seq of each conversation; None for deleted ones."""
    if not conversation_ids:
        return {}
    rows = await session.execute(
        select(Conversation.id, Conversation.last_seq, Conversation.deleted_at).where(
            Conversation.id.in_(conversation_ids)
        )
    )
    found: dict[uuid.UUID, int | None] = {
        cid: (None if deleted else seq) for cid, seq, deleted in rows
    }
    return {cid: found.get(cid) for cid in conversation_ids}


async def load_envelopes(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    after: int,
    upto: int | None = None,
    limit: int | None = None,
) -> list[Envelope]:
    """One envelope per seq in (after, upto], ascending."""
    rows = await _load(session, conversation_id, after=after, upto=upto, limit=limit)
    return [env for env, _ in rows]


async def _load(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    after: int,
    upto: int | None = None,
    limit: int | None = None,
) -> list[tuple[Envelope, uuid.UUID | None]]:
    """(envelope, id of the message it is about) per seq in (after, upto]."""
    stmt = select(ConversationEvent).where(
        ConversationEvent.conversation_id == conversation_id, ConversationEvent.seq > after
    )
    if upto is not None:
        stmt = stmt.where(ConversationEvent.seq <= upto)
    stmt = stmt.order_by(ConversationEvent.seq)
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = list((await session.scalars(stmt)).all())
    message_ids = list({r.message_id for r in rows if r.message_id is not None})
    messages: dict[uuid.UUID, Message] = {}
    if message_ids:
        result = await session.scalars(select(Message).where(Message.id.in_(message_ids)))
        messages = {m.id: m for m in result}
    senders = await messages_repository.users_by_id(
        session, [m.sender_id for m in messages.values()]
    )
    mentions = await messages_repository.mentions_of(
        session, [m.id for m in messages.values() if m.deleted_at is None]
    )
    envelopes: list[tuple[Envelope, uuid.UUID | None]] = []
    for row in rows:
        if row.message_id is not None:
            message = messages[row.message_id]
            view = message_view(
                message, senders[message.sender_id], mentions.get(message.id, []), cls=EventMessage
            )
            event_type = "message.deleted" if view.deleted else row.type
            if event_type not in ("message.created", "message.updated", "message.deleted"):
                event_type = "message.updated"  # reactions and pins travel as updates
            event = MessageEvent(
                type=event_type,
                conversation_id=conversation_id,
                seq=row.seq,
                message=view,
            )
            envelopes.append(
                (
                    to_conversation(conversation_id, event, type_=event_type, seq=row.seq),
                    message.id,
                )
            )
        else:
            reason = (row.data or {}).get("reason")
            member = MemberEvent(
                type=row.type,
                conversation_id=conversation_id,
                seq=row.seq,
                user_id=row.user_id,
                role=row.role,
                reason=reason,
            )
            envelopes.append(
                (
                    to_conversation(
                        conversation_id, member, type_=row.type, seq=row.seq, subject=row.user_id
                    ),
                    None,
                )
            )
    return envelopes


def fold(envelopes: list[Envelope], message_ids: list[uuid.UUID | None]) -> list[Envelope]:
    """Keep each message's latest event only (at its latest seq), as §8 allows for resume."""
    last_index: dict[uuid.UUID, int] = {}
    for index, message_id in enumerate(message_ids):
        if message_id is not None:
            last_index[message_id] = index
    return [
        env
        for index, (env, message_id) in enumerate(zip(envelopes, message_ids, strict=True))
        if message_id is None or last_index[message_id] == index
    ]


async def load_resume(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    user_id: uuid.UUID,
    after: int,
) -> Replay:
    """What a client that saw up to `after` missed, for a member: at most RESUME_LIMIT
    events, each message folded to its latest change, and nothing from a time the user
    was not a member (§9.5)."""
    last = (
        await session.scalar(
            select(func.coalesce(func.max(ConversationEvent.seq), 0)).where(
                ConversationEvent.conversation_id == conversation_id
            )
        )
        or 0
    )
    gap = None
    start = after
    if last - after > RESUME_LIMIT:
        start = last - RESUME_LIMIT
        gap = gap_payload(conversation_id, after + 1, start)
    rows = await _load(session, conversation_id, after=start, upto=last)
    kept: list[Envelope] = []
    message_ids: list[uuid.UUID | None] = []
    member = True
    for env, message_id in rows:
        if env.type == "member.left" and env.subject == user_id:
            kept.append(env)
            message_ids.append(None)
            member = False
            continue
        if env.type == "member.joined" and env.subject == user_id:
            member = True
        if member:
            kept.append(env)
            message_ids.append(message_id)
    return Replay(envelopes=fold(kept, message_ids), last_seq=last, gap=gap)
