"""Conversations, memberships and bans (§5).

`access_*` loads and authorizes or raises; `check_*` validates; `do_*` mutates. Every
membership change takes the conversation's next seq and is written to its event log.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from parley.auth.service import Principal
from parley.config import Settings
from parley.conversations import repository
from parley.conversations.schemas import (
    ConversationCreate,
    ConversationList,
    ConversationOut,
    ConversationPatch,
    MemberList,
    MemberOut,
    MembershipOut,
    MessagePreview,
)
from parley.db.base import utcnow
from parley.errors import Conflict, Forbidden, NotFound, ParleyError, Unprocessable, invalid_field
from parley.models import Conversation, ConversationBan, Membership, User
from parley.pagination import InvalidCursor, decode_cursor, encode_cursor
from parley.realtime.envelope import emit, to_conversation, to_user
from parley.realtime.events import (
    ConversationDeletedEvent,
    ConversationUpdatedEvent,
    MemberEvent,
    MemberEventType,
)
from parley.users.schemas import DELETED_DISPLAY_NAME, DELETED_USERNAME, UserRef
from parley.users.service import UserNotFound

PREVIEW_CHARS = 200  # enough for a list row; the full message is one request away


class ConversationNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("No such conversation")


class Banned(ParleyError):
    status = 403
    code = "banned"

    def __init__(self) -> None:
        super().__init__("You are banned from this room")


class ConversationFull(Conflict):
    code = "conversation_full"


@dataclass(slots=True)
class Access:
    conversation: Conversation
    membership: Membership | None

    @property
    def role(self) -> str | None:
        return self.membership.role if self.membership else None


def user_ref(user: User) -> UserRef:
    if not user.is_active:
        return UserRef(id=user.id, username=DELETED_USERNAME, display_name=DELETED_DISPLAY_NAME)
    return UserRef(id=user.id, username=user.username, display_name=user.display_name)


# -- access -----------------------------------------------------------------------------


async def access_conversation(
    session: AsyncSession,
    principal: Principal,
    conversation_id: uuid.UUID,
    *,
    public_ok: bool = False,
) -> Access:
    """The conversation if the caller is a member (or it is a room and `public_ok`);
    404 otherwise, the same as for one that does not exist."""
    found = await repository.get_with_membership(session, conversation_id, principal.id)
    if found is None:
        raise ConversationNotFound()
    conversation, membership = found
    if membership is None and not (public_ok and conversation.kind == "room"):
        raise ConversationNotFound()
    return Access(conversation, membership)


async def access_membership(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID
) -> Access:
    access = await access_conversation(session, principal, conversation_id)
    assert access.membership is not None
    return access


async def access_for_update(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, *, public_ok: bool
) -> Access:
    """Like `access_conversation`, holding the conversation's row lock until commit, so
    membership checks and the change that follows cannot interleave with another."""
    conversation = await repository.lock_conversation_txn(session, conversation_id)
    if conversation is None:
        raise ConversationNotFound()
    membership = await repository.get_membership(session, conversation_id, principal.id)
    if membership is None and not (public_ok and conversation.kind == "room"):
        raise ConversationNotFound()
    return Access(conversation, membership)


def check_not_direct(conversation: Conversation, action: str) -> None:
    if conversation.kind == "direct":
        raise Forbidden(f"Direct conversations cannot {action}")


def check_manager(access: Access) -> None:
    if access.role not in ("owner", "admin"):
        raise Forbidden("This needs the conversation's owner or an admin")


def check_can_act_on(actor: Membership, target: Membership | None) -> None:
    """An admin cannot act on another admin or on the owner."""
    if actor.role == "admin" and target is not None and target.role in ("admin", "owner"):
        raise Forbidden("Admins cannot act on other admins or the owner")


# -- sequenced membership changes -------------------------------------------------------


async def _add_member_txn(
    session: AsyncSession,
    conversation: Conversation,
    user_id: uuid.UUID,
    role: str,
    *,
    actor_id: uuid.UUID,
    settings: Settings,
) -> Membership:
    """Caller holds the conversation row lock and has checked the user may be added."""
    if conversation.member_count >= settings.max_members:
        raise ConversationFull(f"A conversation has at most {settings.max_members} members")
    seq = await repository.next_seq_txn(session, conversation.id)
    membership = Membership(
        conversation_id=conversation.id,
        user_id=user_id,
        role=role,
        joined_at=utcnow(),
        joined_seq=seq,
        # A new member has read up to their joining; the history before it is there to
        # read, not counted as unread.
        last_read_seq=seq,
        delivered_seq=seq,
    )
    session.add(membership)
    await repository.record_event_txn(
        session,
        conversation.id,
        seq,
        "member.joined",
        user_id=user_id,
        actor_id=actor_id,
        role=role,
    )
    conversation.last_seq = conversation.member_seq = seq
    conversation.member_count += 1
    await session.flush()
    _notify_member(session, conversation.id, seq, "member.joined", user_id, role)
    # The member's own processes may not route this conversation yet: tell them where
    # to start (§8: everything after the join response must reach the member).
    emit(session, to_user(user_id, None, type_="track", seq=seq, conversation_id=conversation.id))
    return membership


async def _remove_member_txn(
    session: AsyncSession,
    conversation: Conversation,
    membership: Membership,
    *,
    actor_id: uuid.UUID,
    reason: str,
) -> None:
    seq = await repository.next_seq_txn(session, conversation.id)
    await repository.record_event_txn(
        session,
        conversation.id,
        seq,
        "member.left",
        user_id=membership.user_id,
        actor_id=actor_id,
        role=membership.role,
        data={"reason": reason},
    )
    await repository.delete_membership(session, conversation.id, membership.user_id)
    conversation.last_seq = conversation.member_seq = seq
    conversation.member_count -= 1
    await session.flush()
    _notify_member(
        session, conversation.id, seq, "member.left", membership.user_id, membership.role, reason
    )


async def _set_role_txn(
    session: AsyncSession,
    conversation: Conversation,
    membership: Membership,
    role: str,
    *,
    actor_id: uuid.UUID,
) -> None:
    seq = await repository.next_seq_txn(session, conversation.id)
    membership.role = role
    await repository.record_event_txn(
        session,
        conversation.id,
        seq,
        "member.updated",
        user_id=membership.user_id,
        actor_id=actor_id,
        role=role,
    )
    conversation.last_seq = seq
    await session.flush()
    _notify_member(session, conversation.id, seq, "member.updated", membership.user_id, role)


def _notify_member(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    seq: int,
    type_: MemberEventType,
    user_id: uuid.UUID,
    role: str,
    reason: str | None = None,
) -> None:
    event = MemberEvent(
        type=type_,
        conversation_id=conversation_id,
        seq=seq,
        user_id=user_id,
        role=role,
        reason=reason,
    )
    emit(session, to_conversation(conversation_id, event, type_=type_, seq=seq, subject=user_id))


def _notify_deleted(session: AsyncSession, conversation: Conversation) -> None:
    event = ConversationDeletedEvent(conversation_id=conversation.id)
    emit(session, to_conversation(conversation.id, event, type_=event.type))


# -- conversations ----------------------------------------------------------------------


async def do_create_conversation(
    session: AsyncSession, settings: Settings, principal: Principal, data: ConversationCreate
) -> Conversation:
    member_ids = list(dict.fromkeys(m for m in data.member_ids if m != principal.id))
    known = await repository.active_user_ids(session, member_ids)
    unknown = [str(m) for m in member_ids if m not in known]
    if unknown:
        raise Unprocessable(
            "Some member_ids are not users",
            errors=[
                {"loc": ["body", "member_ids"], "msg": f"unknown user {u}", "type": "unknown_user"}
                for u in unknown
            ],
        )
    conversation = Conversation(
        kind=data.kind, name=data.name, topic=data.topic, created_by=principal.id
    )
    session.add(conversation)
    await session.flush()
    await _add_member_txn(
        session, conversation, principal.id, "owner", actor_id=principal.id, settings=settings
    )
    for member_id in member_ids:
        await _add_member_txn(
            session, conversation, member_id, "member", actor_id=principal.id, settings=settings
        )
    return conversation


def _direct_key(a: uuid.UUID, b: uuid.UUID) -> str:
    low, high = sorted((a.hex, b.hex))
    return f"{low}:{high}"


async def do_get_or_create_direct(
    session: AsyncSession, settings: Settings, principal: Principal, other_id: uuid.UUID
) -> tuple[Conversation, bool]:
    """The one direct conversation of the pair, and whether it was created now."""
    if other_id == principal.id:
        raise invalid_field(
            "user_id", "cannot be yourself", detail="A direct conversation needs another person"
        )
    other = await session.get(User, other_id)
    if other is None or not other.is_active:
        raise UserNotFound()
    key = _direct_key(principal.id, other_id)
    existing = await repository.get_direct_by_key(session, key)
    if existing is not None:
        return existing, False
    try:
        # The unique direct_key decides a race between two creators: the loser's
        # savepoint rolls back and it answers with the winner's conversation.
        async with session.begin_nested():
            conversation = Conversation(kind="direct", direct_key=key, created_by=principal.id)
            session.add(conversation)
            await session.flush()
            for user_id in (principal.id, other_id):
                await _add_member_txn(
                    session,
                    conversation,
                    user_id,
                    "member",
                    actor_id=principal.id,
                    settings=settings,
                )
    except IntegrityError:
        existing = await repository.get_direct_by_key(session, key)
        if existing is None:
            raise
        return existing, False
    return conversation, True


async def do_update_conversation(
    session: AsyncSession,
    principal: Principal,
    conversation_id: uuid.UUID,
    patch: ConversationPatch,
) -> Conversation:
    access = await access_conversation(session, principal, conversation_id)
    check_not_direct(access.conversation, "be renamed")
    check_manager(access)
    conversation = access.conversation
    if "name" in patch.model_fields_set:
        if patch.name is None:
            raise invalid_field("name", "must not be null", detail="A name cannot be removed")
        conversation.name = patch.name
    if "topic" in patch.model_fields_set:
        conversation.topic = patch.topic
    conversation.updated_at = utcnow()
    await session.flush()
    event = ConversationUpdatedEvent(
        conversation_id=conversation.id, name=conversation.name, topic=conversation.topic
    )
    emit(session, to_conversation(conversation.id, event, type_=event.type))
    return conversation


async def do_delete_conversation(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID
) -> None:
    conversation = await repository.lock_conversation_txn(session, conversation_id)
    if conversation is None:
        raise ConversationNotFound()
    membership = await repository.get_membership(session, conversation_id, principal.id)
    if not principal.is_admin:
        if membership is None:
            raise ConversationNotFound()
        if membership.role != "owner":
            raise Forbidden("Only the owner deletes a conversation")
    check_not_direct(conversation, "be deleted")
    conversation.deleted_at = utcnow()
    await session.flush()
    _notify_deleted(session, conversation)


# -- membership actions -----------------------------------------------------------------


async def do_join(
    session: AsyncSession, settings: Settings, principal: Principal, conversation_id: uuid.UUID
) -> Membership:
    access = await access_for_update(session, principal, conversation_id, public_ok=True)
    if access.conversation.kind != "room":
        # Only a member gets this far for a group or direct conversation (others get
        # 404): members of those are added, never join, and "joining" is refused
        # rather than answered as if it meant something.
        raise Forbidden("Only rooms can be joined")
    if access.membership is not None:
        return access.membership  # joining twice is a no-op, not a new seq
    if await repository.is_banned(session, conversation_id, principal.id):
        raise Banned()
    return await _add_member_txn(
        session,
        access.conversation,
        principal.id,
        "member",
        actor_id=principal.id,
        settings=settings,
    )


async def do_leave(session: AsyncSession, principal: Principal, conversation_id: uuid.UUID) -> None:
    access = await access_for_update(session, principal, conversation_id, public_ok=False)
    conversation, membership = access.conversation, access.membership
    assert membership is not None
    check_not_direct(conversation, "be left")
    if conversation.member_count <= 1:
        await _remove_member_txn(
            session, conversation, membership, actor_id=principal.id, reason="left"
        )
        # The last member leaving a group or room deletes it.
        conversation.deleted_at = utcnow()
        await session.flush()
        _notify_deleted(session, conversation)
        return
    if membership.role == "owner":
        heir = await repository.successor(session, conversation.id, principal.id)
        assert heir is not None
        await _set_role_txn(session, conversation, heir, "owner", actor_id=principal.id)
    await _remove_member_txn(
        session, conversation, membership, actor_id=principal.id, reason="left"
    )


async def do_put_member(
    session: AsyncSession,
    settings: Settings,
    principal: Principal,
    conversation_id: uuid.UUID,
    user_id: uuid.UUID,
    role: str | None,
) -> tuple[Membership, bool]:
    """Add a member or change a member's role; the membership and whether it was added."""
    access = await access_for_update(session, principal, conversation_id, public_ok=False)
    conversation, actor = access.conversation, access.membership
    assert actor is not None
    check_not_direct(conversation, "change members")
    check_manager(access)
    target_user = await session.get(User, user_id)
    if target_user is None or not target_user.is_active:
        raise UserNotFound()
    target = await repository.get_membership(session, conversation_id, user_id)
    check_can_act_on(actor, target)

    if target is None:
        if role == "owner":
            raise invalid_field(
                "role", "add first, then hand on", detail="Ownership goes to an existing member"
            )
        if role == "admin" and actor.role != "owner":
            raise Forbidden("Only the owner grants admin")
        if await repository.is_banned(session, conversation_id, user_id):
            raise Conflict("That user is banned from this room; unban them first")
        added = await _add_member_txn(
            session,
            conversation,
            user_id,
            role or "member",
            actor_id=principal.id,
            settings=settings,
        )
        return added, True

    if role is None or role == target.role:
        return target, False
    if actor.role != "owner":
        raise Forbidden("Only the owner changes roles")
    if target.user_id == principal.id:
        raise Conflict("The owner hands on ownership by giving another member the owner role")
    if role == "owner":
        # Handing on ownership: the previous owner stays on as an admin.
        await _set_role_txn(session, conversation, target, "owner", actor_id=principal.id)
        await _set_role_txn(session, conversation, actor, "admin", actor_id=principal.id)
    else:
        await _set_role_txn(session, conversation, target, role, actor_id=principal.id)
    return target, False


async def do_kick(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    access = await access_for_update(session, principal, conversation_id, public_ok=False)
    check_not_direct(access.conversation, "remove members")
    check_manager(access)
    assert access.membership is not None
    if user_id == principal.id:
        raise Conflict("To leave, use the leave action")
    target = await repository.get_membership(session, conversation_id, user_id)
    if target is None:
        raise NotFound("That user is not a member")
    check_can_act_on(access.membership, target)
    await _remove_member_txn(
        session, access.conversation, target, actor_id=principal.id, reason="removed"
    )


async def _access_room_manager(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID
) -> Access:
    access = await access_for_update(session, principal, conversation_id, public_ok=False)
    if access.conversation.kind != "room":
        raise Forbidden("Bans apply to rooms only")
    check_manager(access)
    return access


async def do_ban(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    access = await _access_room_manager(session, principal, conversation_id)
    assert access.membership is not None
    if user_id == principal.id:
        raise Conflict("You cannot ban yourself")
    target_user = await session.get(User, user_id)
    if target_user is None:
        raise UserNotFound()
    target = await repository.get_membership(session, conversation_id, user_id)
    check_can_act_on(access.membership, target)
    if target is not None:
        await _remove_member_txn(
            session, access.conversation, target, actor_id=principal.id, reason="banned"
        )
    if not await repository.is_banned(session, conversation_id, user_id):
        session.add(
            ConversationBan(
                conversation_id=conversation_id, user_id=user_id, banned_by=principal.id
            )
        )
        await session.flush()


async def do_unban(
    session: AsyncSession, principal: Principal, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    await _access_room_manager(session, principal, conversation_id)
    ban = await session.get(ConversationBan, (conversation_id, user_id))
    if ban is not None:
        await session.delete(ban)
        await session.flush()


# -- views ------------------------------------------------------------------------------


async def build_views(
    session: AsyncSession,
    principal: Principal,
    rows: Sequence[tuple[Conversation, Membership | None]],
) -> list[ConversationOut]:
    """Conversation objects for one viewer, with a fixed number of queries per page."""
    ids = [c.id for c, _ in rows]
    member_ids = [c.id for c, m in rows if m is not None]
    direct_ids = [c.id for c, _ in rows if c.kind == "direct"]
    last = await repository.last_messages(session, member_ids)
    unread = await repository.unread_counts(session, principal.id, member_ids)
    mentions = await repository.mention_counts(session, principal.id, member_ids)
    partners = await repository.direct_partners(session, principal.id, direct_ids)
    views = []
    for conversation, membership in rows:
        name = conversation.name
        partner = partners.get(conversation.id)
        if conversation.kind == "direct" and partner is not None:
            ref = user_ref(partner)
            name = ref.display_name or ref.username
        preview = None
        if conversation.id in last:
            message, sender = last[conversation.id]
            preview = MessagePreview(
                id=message.id,
                seq=message.seq,
                sender=user_ref(sender),
                content=message.content[:PREVIEW_CHARS],
                created_at=message.created_at,
            )
        views.append(
            ConversationOut(
                id=conversation.id,
                kind=conversation.kind,
                name=name,
                topic=conversation.topic,
                created_at=conversation.created_at,
                updated_at=conversation.updated_at,
                member_count=conversation.member_count,
                last_seq=conversation.last_seq,
                last_message=preview,
                my_role=membership.role if membership else None,
                last_read_seq=membership.last_read_seq if membership else 0,
                unread_count=unread.get(conversation.id, 0),
                mention_count=mentions.get(conversation.id, 0),
            )
        )
    assert len(views) == len(ids)
    return views


async def view_one(
    session: AsyncSession, principal: Principal, conversation: Conversation
) -> ConversationOut:
    membership = await repository.get_membership(session, conversation.id, principal.id)
    return (await build_views(session, principal, [(conversation, membership)]))[0]


async def list_conversations(
    session: AsyncSession, principal: Principal, *, cursor: str | None, limit: int
) -> ConversationList:
    after = None
    if cursor:
        at, cid = decode_cursor(cursor, 2)
        after = (_parse_time(at), _parse_uuid(cid))
    rows = await repository.list_for_user(session, principal.id, after=after, limit=limit + 1)
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1][0]
        next_cursor = encode_cursor(last.last_activity_at.isoformat(), last.id)
    views = await build_views(session, principal, [(c, m) for c, m in page])
    return ConversationList(conversations=views, next_cursor=next_cursor)


async def list_public(
    session: AsyncSession, principal: Principal, *, q: str | None, cursor: str | None, limit: int
) -> ConversationList:
    after = None
    if cursor:
        name, cid = decode_cursor(cursor, 2)
        after = (_parse_name_key(name), _parse_uuid(cid))
    rows = await repository.list_public(session, principal.id, q=q, after=after, limit=limit + 1)
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last, _, sort_key = page[-1]
        next_cursor = encode_cursor(sort_key, last.id)
    views = await build_views(session, principal, [(c, m) for c, m, _ in page])
    return ConversationList(conversations=views, next_cursor=next_cursor)


async def list_members(
    session: AsyncSession,
    principal: Principal,
    conversation_id: uuid.UUID,
    *,
    cursor: str | None,
    limit: int,
) -> MemberList:
    await access_membership(session, principal, conversation_id)
    after = _parse_seq(decode_cursor(cursor, 1)[0]) if cursor else None
    rows = await repository.list_members(session, conversation_id, after_seq=after, limit=limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1][0].joined_seq) if len(rows) > limit else None
    members = []
    for membership, user in page:
        ref = user_ref(user)
        members.append(
            MemberOut(
                conversation_id=membership.conversation_id,
                user_id=membership.user_id,
                role=membership.role,
                joined_at=membership.joined_at,
                username=ref.username,
                display_name=ref.display_name,
            )
        )
    return MemberList(members=members, next_cursor=next_cursor)


def membership_out(membership: Membership) -> MembershipOut:
    return MembershipOut(
        conversation_id=membership.conversation_id,
        user_id=membership.user_id,
        role=membership.role,
        joined_at=membership.joined_at,
    )


# Cursors come back from clients: each part is checked before it reaches SQL, so a
# forged or damaged cursor is a 422, never a database error (500).
MAX_SEQ = 2**31 - 1  # seqs are INTEGER columns


def _parse_time(value: object) -> datetime:
    try:
        at = datetime.fromisoformat(str(value))
        if at.tzinfo is None:
            raise ValueError("every timestamp this API gives out is UTC-aware")
        return at.astimezone(UTC)  # year 1 at +01:00 overflows here, not in the driver
    except (ValueError, OverflowError) as exc:
        raise InvalidCursor() from exc


def _parse_seq(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise InvalidCursor()
    return value


def _parse_name_key(value: object) -> str:
    # PostgreSQL text cannot hold NUL; no room name contains one.
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidCursor()
    return value


def _parse_uuid(value: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise InvalidCursor() from exc
