"""Messages (§6 core): send, page, edit, delete, read markers, receipts and search.

Every change takes the conversation's next seq inside the writing transaction and is
written to the conversation's event log with it.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from parley.auth.service import Principal, access_principal
from parley.config import Settings
from parley.conversations import repository as conversations_repository
from parley.conversations.service import (
    ConversationNotFound,
    access_membership,
    user_ref,
)
from parley.db.base import utcnow
from parley.db.session import Database
from parley.errors import Conflict, Forbidden, NotFound, Unauthorized, invalid_field
from parley.messages import repository
from parley.messages.repository import MessageRow
from parley.messages.schemas import (
    MessageCreate,
    MessageList,
    MessageOut,
    MessagePage,
    ReceiptList,
    ReceiptOut,
    Status,
    VersionList,
    VersionOut,
)
from parley.models import Membership, Message, MessageVersion, User
from parley.pagination import InvalidCursor, decode_cursor, encode_cursor
from parley.realtime.envelope import Envelope, emit, to_conversation, to_user
from parley.realtime.events import EventMessage, MessageEvent, MessageEventType, ReadEvent
from parley.users.schemas import UserRef

M = TypeVar("M", bound=MessageOut)
# The lowest read and delivered markers among the other members (None when there are none).
Markers = tuple[int | None, int | None]

# `@name` where name is a username; the lookbehind keeps e-mail addresses out. The token
# runs to the first character no username has, so "@bobby" never mentions "bob".
MENTION_RE = re.compile(r"(?<![\w.@-])@([A-Za-z0-9_.-]+)")
USERNAME_CHARS = (3, 32)  # §3: ^[a-z0-9_.-]{3,32}$
MAX_MENTIONS = 50  # a message naming more people than this is a broadcast, not a mention
# Seq columns are 32-bit INTEGERs, and PostgreSQL refuses a larger parameter outright. The
# API takes any JSON-safe integer as a history bound, so larger bounds are narrowed to the
# seqs that can exist instead of reaching the driver (which would answer 500).
MAX_STORED_SEQ = 2**31 - 1


class MessageNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("No such message")


class _Duplicate(Exception):
    """Raised inside the send savepoint when a retry finds the original after the lock."""

    def __init__(self, message: Message) -> None:
        self.message = message


def check_content(settings: Settings, content: str) -> None:
    if len(content) > settings.max_message_chars:
        raise invalid_field(
            "content",
            f"longer than {settings.max_message_chars} characters",
            detail=f"A message has at most {settings.max_message_chars} characters",
            type_="string_too_long",
        )


async def _mentioned_members(
    session: AsyncSession, conversation_id: uuid.UUID, sender_id: uuid.UUID, content: str
) -> list[uuid.UUID]:
    """Members named by `@username`, in order of appearance, without the sender.

    Usernames may contain dots, so "thanks @bob." is ambiguous: a member named "bob." wins,
    else the full stop ends the sentence and "bob" is meant."""
    tokens = list(dict.fromkeys(t.lower() for t in MENTION_RE.findall(content)))[:MAX_MENTIONS]
    low, high = USERNAME_CHARS
    names = {n for t in tokens for n in (t, t.rstrip(".")) if low <= len(n) <= high}
    members = await repository.member_ids_by_username(session, conversation_id, sorted(names))
    mentioned: list[uuid.UUID] = []
    for token in tokens:
        user_id = members.get(token) or members.get(token.rstrip("."))
        if user_id is not None and user_id != sender_id and user_id not in mentioned:
            mentioned.append(user_id)
    return mentioned


async def access_message(
    session: AsyncSession, principal: Principal, message_id: uuid.UUID
) -> tuple[Message, Membership]:
    found = await repository.get_for_member(session, message_id, principal.id)
    if found is None:
        raise MessageNotFound()
    return found


# -- writes -----------------------------------------------------------------------------


def check_send(settings: Settings, data: MessageCreate) -> None:
    check_content(settings, data.content)
    if data.attachment_ids:
        raise invalid_field(
            "attachment_ids", "not supported yet", detail="File attachments are not available yet"
        )


def _sends_in_one_statement(session: AsyncSession, data: MessageCreate) -> bool:
    return data.reply_to_id is None and session.get_bind().dialect.name == "postgresql"


async def send_in_transaction(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, data: MessageCreate
) -> tuple[MessageOut, bool]:
    """Store a message within the session's transaction, for a send check_send passed;
    (the message as its sender sees it, as build_views gives it; created). A retry with a
    known client_msg_id answers the original with created=False.

    The common send on PostgreSQL learns all its view needs from its one statement, so
    it makes none of build_views' queries."""
    if _sends_in_one_statement(session, data):
        message, created, state = await _send_pg(session, principal, conversation_id, data)
        if state is not None:
            mentions = state.mentions
            if len(mentions) > 1:
                # The order a later read of the message gives.
                mentions = (await repository.mentions_of(session, [message.id]))[message.id]
            status = _sender_status(state.sent, message.seq)
            return message_view(message, principal.user, mentions, status), created
    else:
        message, created = await _send_portable(session, principal, conversation_id, data)
    return (await build_views(session, principal, [message]))[0], created


async def _send_portable(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, data: MessageCreate
) -> tuple[Message, bool]:
    await access_membership(session, principal, conversation_id)
    if data.client_msg_id is not None:
        existing = await repository.find_by_client_id(
            session, conversation_id, principal.id, data.client_msg_id
        )
        if existing is not None:
            return existing, False
    if data.reply_to_id is not None:
        parent = await session.get(Message, data.reply_to_id)
        if parent is None or parent.conversation_id != conversation_id:
            raise invalid_field(
                "reply_to_id",
                "unknown message",
                detail="reply_to_id is not a message of this conversation",
            )
    try:
        async with session.begin_nested():
            message = await _insert_message_txn(session, principal, conversation_id, data)
    except _Duplicate as dup:
        return dup.message, False
    except IntegrityError:
        # The unique (conversation, sender, client_msg_id) index caught a concurrent twin
        # that the re-check under the lock could not see (it has committed since).
        if data.client_msg_id is None:
            raise
        existing = await repository.find_by_client_id(
            session, conversation_id, principal.id, data.client_msg_id
        )
        if existing is None:
            raise
        return existing, False
    return message, True


@dataclass(frozen=True, slots=True)
class _SentState:
    """What the sender's view of a message just created needs beyond the row itself."""

    sent: repository.Sent
    mentions: list[uuid.UUID]


def _admitted(sent: repository.Sent | None) -> repository.Sent:
    """The send statement's answer, once it is known the sender may send."""
    if sent is None:
        raise Unauthorized("The session has ended")
    if sent.kind is None:
        raise ConversationNotFound()
    return sent


def _sender_status(sent: repository.Sent, seq: int) -> Status | None:
    """The sender's status of the message the statement stored at `seq` (§6)."""
    if sent.kind == "room":
        return None
    return message_status(seq, (sent.min_read, sent.min_delivered))


async def _send_pg(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, data: MessageCreate
) -> tuple[Message, bool, _SentState | None]:
    """The common send in one statement (repository.SEND_SQL): what the portable path
    above does in seven round trips. Same checks, same rows, same events. The state is
    None for a retry that found the original."""
    message = Message(
        id=uuid.uuid4(),
        conversation_id=conversation_id,
        sender_id=principal.id,
        content=data.content,
        client_msg_id=data.client_msg_id,
        reply_to_id=None,
        created_at=utcnow(),
        edited_at=None,
        deleted_at=None,
    )
    sent = await repository.send_message(session, message, principal.session_id)
    if sent is not None and sent.kind is not None and not sent.settled:
        # The members changed while this send waited for the conversation's lock, so
        # the membership the statement checked may be stale and it stored nothing. It
        # holds the lock now: run again, it sees what no one can change meanwhile.
        sent = await repository.send_message(session, message, principal.session_id)
    sent = _admitted(sent)
    assert sent.settled
    if sent.seq is None:
        assert data.client_msg_id is not None
        existing = await repository.find_by_client_id(
            session, conversation_id, principal.id, data.client_msg_id
        )
        assert existing is not None
        return existing, False, None
    message.seq = message.updated_seq = sent.seq
    mentioned: list[uuid.UUID] = []
    if "@" in data.content:
        mentioned = await _mentioned_members(session, conversation_id, principal.id, data.content)
        await repository.insert_mentions(session, message, mentioned)
    notify_message(session, "message.created", message, principal.user, mentioned)
    return message, True, _SentState(sent, mentioned)


@dataclass(frozen=True, slots=True)
class _Stored:
    """A message the send statement stored on its own, without the ORM."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    sender_id: uuid.UUID
    content: str
    client_msg_id: str | None
    created_at: datetime
    seq: int = 0
    reply_to_id: None = None
    edited_at: None = None
    deleted_at: None = None

    @property
    def updated_seq(self) -> int:
        return self.seq


def sends_autocommit(db: Database, data: MessageCreate) -> bool:
    """Whether a send is the send statement alone: a plain message on PostgreSQL. A
    reply, an attachment or a mention has more to check or write."""
    return (
        db.is_postgres
        and data.reply_to_id is None
        and not data.attachment_ids
        and "@" not in data.content
    )


async def do_send_message_autocommit(
    db: Database,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    conversation_id: uuid.UUID,
    data: MessageCreate,
) -> MessageOut | None:
    """The common send as the send statement alone, outside any transaction (SPEC §11):
    no BEGIN, no COMMIT, no ORM session, one round trip on a pooled driver connection.
    The statement checks the session itself, so the caller need not. Publishes the
    message and answers the sender's view of it; None when the send is not one the
    statement takes alone (sends_autocommit) or it declined, having stored nothing (a
    known client_msg_id, or a change of members while it waited for the conversation's
    lock), and a transaction must send it."""
    if not sends_autocommit(db, data):
        return None
    message = _Stored(
        id=uuid.uuid4(),
        conversation_id=conversation_id,
        sender_id=user_id,
        content=data.content,
        client_msg_id=data.client_msg_id,
        created_at=utcnow(),
    )
    async with db.driver_connection() as conn:
        sent = _admitted(await repository.send_message_autocommit(conn, message, session_id))
    if sent.seq is None:
        return None
    stored = dataclasses.replace(message, seq=sent.seq)
    sender = UserRef(id=user_id, username=sent.username, display_name=sent.display_name)
    await db.publish([message_envelope("message.created", stored, sender, [])])
    return message_view(stored, sender, [], _sender_status(sent, sent.seq))


async def do_send(
    db: Database,
    settings: Settings,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    conversation_id: uuid.UUID,
    data: MessageCreate,
) -> tuple[MessageOut, bool]:
    """A send by the caller of a session whose credential was verified (REST and the
    WebSocket `send` op): the statement alone when it takes the send, else a
    transaction that checks the session first. (the sender's view, created)."""
    check_send(settings, data)
    view = await do_send_message_autocommit(db, user_id, session_id, conversation_id, data)
    if view is not None:
        return view, True
    async with db.transaction() as session:
        principal = await access_principal(session, user_id, session_id)
        return await send_in_transaction(session, principal, conversation_id, data)


async def _insert_message_txn(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, data: MessageCreate
) -> Message:
    try:
        seq = await conversations_repository.next_seq_txn(session, conversation_id, activity=True)
    except LookupError as exc:
        raise ConversationNotFound() from exc
    if data.client_msg_id is not None:
        # Holding the conversation lock now: a concurrent twin has either committed (and
        # is visible to this statement) or is waiting behind us.
        twin = await repository.find_by_client_id(
            session, conversation_id, principal.id, data.client_msg_id
        )
        if twin is not None:
            raise _Duplicate(twin)
    message = Message(
        id=uuid.uuid4(),
        conversation_id=conversation_id,
        seq=seq,
        updated_seq=seq,
        sender_id=principal.id,
        content=data.content,
        client_msg_id=data.client_msg_id,
        reply_to_id=data.reply_to_id,
        created_at=utcnow(),
    )
    session.add(message)
    await session.flush()
    await conversations_repository.record_event_txn(
        session,
        conversation_id,
        seq,
        "message.created",
        message_id=message.id,
        actor_id=principal.id,
    )
    mentioned = await _mentioned_members(session, conversation_id, principal.id, data.content)
    await repository.replace_mentions(session, message, mentioned)
    # Sending moves the sender's own read marker to the message.
    await repository.advance_read_marker(session, conversation_id, principal.id, seq)
    await session.flush()
    notify_message(session, "message.created", message, principal.user, mentioned)
    return message


async def do_edit_message(
    session: AsyncSession,
    settings: Settings,
    principal: Principal,
    message_id: uuid.UUID,
    content: str,
) -> Message:
    check_content(settings, content)
    message, _ = await access_message(session, principal, message_id)
    if message.sender_id != principal.id:
        raise Forbidden("Only the author edits a message")
    if message.deleted_at is not None:
        raise Conflict("The message was deleted")
    if content == message.content:
        return message
    seq = await conversations_repository.next_seq_txn(session, message.conversation_id)
    now = utcnow()
    session.add(
        MessageVersion(
            message_id=message.id,
            content=message.content,
            created_at=message.edited_at or message.created_at,
            replaced_at=now,
        )
    )
    message.content = content
    message.edited_at = now
    message.updated_seq = seq
    await conversations_repository.record_event_txn(
        session,
        message.conversation_id,
        seq,
        "message.updated",
        message_id=message.id,
        actor_id=principal.id,
    )
    mentioned = await _mentioned_members(
        session, message.conversation_id, message.sender_id, content
    )
    await repository.replace_mentions(session, message, mentioned)
    await session.flush()
    notify_message(session, "message.updated", message, principal.user, mentioned)
    return message


async def do_delete_message(
    session: AsyncSession, principal: Principal, message_id: uuid.UUID
) -> Message:
    found = await repository.get_for_member(session, message_id, principal.id)
    if found is not None:
        message, membership = found
        allowed = (
            message.sender_id == principal.id
            or membership.role in ("owner", "admin")
            or principal.is_admin
        )
        if not allowed:
            raise Forbidden("Only the author or the conversation's owner or admins delete it")
    else:
        # Global admins may delete any message, also where they are not members.
        message_or_none = (
            await repository.get_in_live_conversation(session, message_id)
            if principal.is_admin
            else None
        )
        if message_or_none is None:
            raise MessageNotFound()
        message = message_or_none
    if message.deleted_at is not None:
        return message  # deleting twice changes nothing and takes no seq
    seq = await conversations_repository.next_seq_txn(session, message.conversation_id)
    # Soft delete: the row keeps its place in history, but the content, earlier versions
    # and mentions are gone from every response and from search.
    message.content = ""
    message.deleted_at = utcnow()
    message.updated_seq = seq
    await repository.delete_versions(session, message.id)
    await repository.replace_mentions(session, message, [])
    await conversations_repository.record_event_txn(
        session,
        message.conversation_id,
        seq,
        "message.deleted",
        message_id=message.id,
        actor_id=principal.id,
    )
    await session.flush()
    sender = await session.get(User, message.sender_id)
    assert sender is not None
    notify_message(session, "message.deleted", message, sender, [])
    return message


async def do_mark_read(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, seq: int
) -> int:
    """Move the caller's read marker forward, at most to last_seq; the marker after."""
    access = await access_membership(session, principal, conversation_id)
    assert access.membership is not None
    target = min(seq, access.conversation.last_seq)
    if target > access.membership.last_read_seq:
        await repository.advance_read_marker(session, conversation_id, principal.id, target)
        event = ReadEvent(conversation_id=conversation_id, user_id=principal.id, seq=target)
        if access.conversation.kind == "room":
            # In rooms a read marker is the reader's own business: only their other
            # connections hear of it (§8).
            emit(
                session,
                to_user(
                    principal.id,
                    event,
                    type_="read",
                    subject=principal.id,
                    conversation_id=conversation_id,
                ),
            )
        else:
            emit(
                session,
                to_conversation(conversation_id, event, type_="read", subject=principal.id),
            )
        return target
    return access.membership.last_read_seq


def notify_message(
    session: AsyncSession,
    type_: MessageEventType,
    message: Message,
    sender: User,
    mentions: list[uuid.UUID],
) -> None:
    """Publish a message change after commit, at the seq it took."""
    emit(session, message_envelope(type_, message, sender, mentions))


def message_envelope(
    type_: MessageEventType,
    message: MessageRow,
    sender: User | UserRef,
    mentions: list[uuid.UUID],
) -> Envelope:
    event = MessageEvent(
        type=type_,
        conversation_id=message.conversation_id,
        seq=message.updated_seq,
        message=message_view(message, sender, mentions, cls=EventMessage),
    )
    return to_conversation(message.conversation_id, event, type_=type_, seq=message.updated_seq)


# -- reads ------------------------------------------------------------------------------


def message_status(seq: int, markers: Markers) -> Status:
    """The sender's status of a message in a direct or group conversation (§6)."""
    min_read, min_delivered = markers
    if min_read is None or min_read >= seq:
        return "read"  # also when no one else is left to read it
    if min_delivered is not None and min_delivered >= seq:
        return "delivered"
    return "sent"


async def build_views(
    session: AsyncSession, principal: Principal, messages: Sequence[Message]
) -> list[MessageOut]:
    """Message objects for one viewer, with a fixed number of queries per page."""
    if not messages:
        return []
    # The caller is usually the sender of some: no need to load them again.
    users = await repository.users_by_id(
        session, [m.sender_id for m in messages if m.sender_id != principal.id]
    )
    users[principal.id] = principal.user
    # A mention is an `@name` in the content: messages without an @ have none to load.
    mentions = await repository.mentions_of(
        session, [m.id for m in messages if m.deleted_at is None and "@" in m.content]
    )
    markers: dict[uuid.UUID, Markers] = {}
    for conversation_id in {m.conversation_id for m in messages if m.sender_id == principal.id}:
        kind, min_read, min_delivered = await repository.others_markers(
            session, conversation_id, principal.id
        )
        if kind != "room":
            markers[conversation_id] = (min_read, min_delivered)
    views: list[MessageOut] = []
    for message in messages:
        status: Status | None = None
        if message.sender_id == principal.id and message.conversation_id in markers:
            status = message_status(message.seq, markers[message.conversation_id])
        views.append(
            message_view(message, users[message.sender_id], mentions.get(message.id, []), status)
        )
    return views


def message_view(
    message: MessageRow,
    sender: User | UserRef,
    mentions: list[uuid.UUID],
    status: Status | None = None,
    *,
    cls: type[M] = MessageOut,  # type: ignore[assignment]
) -> M:
    deleted = message.deleted_at is not None
    return cls(
        id=message.id,
        conversation_id=message.conversation_id,
        seq=message.seq,
        updated_seq=message.updated_seq,
        sender=sender if isinstance(sender, UserRef) else user_ref(sender),
        content="" if deleted else message.content,
        client_msg_id=message.client_msg_id,
        reply_to_id=message.reply_to_id,
        attachments=[],
        reactions=[],
        mentions=[] if deleted else mentions,
        pinned=False,
        created_at=message.created_at,
        edited_at=message.edited_at,
        deleted=deleted,
        status=status,
    )


async def list_history(
    session: AsyncSession,
    principal: Principal,
    conversation_id: uuid.UUID,
    *,
    before: int | None,
    after: int | None,
    changed_after: int | None,
    limit: int,
) -> MessagePage:
    await access_membership(session, principal, conversation_id)
    if changed_after is not None:
        if before is not None or after is not None:
            raise invalid_field(
                "changed_after",
                "use alone",
                detail="changed_after cannot be combined with before or after",
                source="query",
            )
        rows, has_more = await repository.changed_after(
            session, conversation_id, min(changed_after, MAX_STORED_SEQ), limit
        )
    else:
        rows, has_more = await repository.page(
            session,
            conversation_id,
            # A bound above every possible seq is no bound at all.
            before=before if before is None or before <= MAX_STORED_SEQ else None,
            after=after if after is None else min(after, MAX_STORED_SEQ),
            limit=limit,
        )
    return MessagePage(messages=await build_views(session, principal, rows), has_more=has_more)


async def get_message(
    session: AsyncSession, principal: Principal, message_id: uuid.UUID
) -> MessageOut:
    message, _ = await access_message(session, principal, message_id)
    return (await build_views(session, principal, [message]))[0]


def _time_id_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not cursor:
        return None
    at, item_id = decode_cursor(cursor, 2)
    try:
        # Every timestamp this API gives out is UTC-aware; a naive one (or one that leaves
        # the calendar in UTC) was made by hand, and would fail in the query as a 500.
        parsed = datetime.fromisoformat(str(at))
        if parsed.tzinfo is None:
            raise InvalidCursor()
        return parsed.astimezone(UTC), uuid.UUID(str(item_id))
    except (ValueError, OverflowError) as exc:
        raise InvalidCursor() from exc


async def list_versions(
    session: AsyncSession,
    principal: Principal,
    message_id: uuid.UUID,
    *,
    cursor: str | None,
    limit: int,
) -> VersionList:
    message, _ = await access_message(session, principal, message_id)
    if message.deleted_at is not None:
        return VersionList(versions=[], next_cursor=None)
    rows = await repository.versions(
        session, message.id, after=_time_id_cursor(cursor), limit=limit + 1
    )
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1].replaced_at.isoformat(), page[-1].id) if len(rows) > limit else None
    )
    return VersionList(
        versions=[
            VersionOut(content=v.content, created_at=v.created_at, replaced_at=v.replaced_at)
            for v in page
        ],
        next_cursor=next_cursor,
    )


async def list_receipts(
    session: AsyncSession,
    principal: Principal,
    message_id: uuid.UUID,
    *,
    cursor: str | None,
    limit: int,
) -> ReceiptList:
    message, _ = await access_message(session, principal, message_id)
    after_user = None
    if cursor:
        try:
            after_user = uuid.UUID(str(decode_cursor(cursor, 1)[0]))
        except ValueError as exc:
            raise InvalidCursor() from exc
    rows = await repository.receipts(
        session, message, principal.id, after_user=after_user, limit=limit + 1
    )
    page = rows[:limit]
    receipts = []
    for membership, read_at in page:
        read = membership.last_read_seq >= message.seq
        receipts.append(
            ReceiptOut(
                user_id=membership.user_id,
                delivered=read or membership.delivered_seq >= message.seq,
                read=read,
                # A member who joined after the message has "read" it without a read time.
                read_at=read_at if read else None,
            )
        )
    next_cursor = encode_cursor(page[-1][0].user_id) if len(rows) > limit else None
    return ReceiptList(receipts=receipts, next_cursor=next_cursor)


async def search_messages(
    session: AsyncSession,
    principal: Principal,
    q: str,
    *,
    conversation_id: uuid.UUID | None,
    cursor: str | None,
    limit: int,
) -> MessageList:
    if conversation_id is not None:
        await access_membership(session, principal, conversation_id)
    rows = await repository.search(
        session,
        principal.id,
        q,
        conversation_id=conversation_id,
        after=_time_id_cursor(cursor),
        limit=limit + 1,
    )
    return await _message_list(session, principal, rows, limit)


async def list_user_messages(
    session: AsyncSession,
    principal: Principal,
    user_id: uuid.UUID,
    *,
    cursor: str | None,
    limit: int,
) -> MessageList:
    if await session.get(User, user_id) is None:
        raise NotFound("No such user")
    rows = await repository.by_sender_readable(
        session, principal.id, user_id, after=_time_id_cursor(cursor), limit=limit + 1
    )
    return await _message_list(session, principal, rows, limit)


async def _message_list(
    session: AsyncSession, principal: Principal, rows: list[Message], limit: int
) -> MessageList:
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > limit else None
    )
    return MessageList(
        messages=await build_views(session, principal, page), next_cursor=next_cursor
    )
