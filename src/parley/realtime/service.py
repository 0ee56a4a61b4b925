"""The real-time layer of one process: broker, hub, presence and typing, and the actions
every transport shares (connect, resume, typing).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from parley.auth.service import Principal
from parley.config import Settings
from parley.conversations.service import access_membership
from parley.db.session import Database
from parley.errors import ParleyError
from parley.models import Conversation, ConversationEvent, Membership, Message
from parley.ops.metrics import LIVE_CONNECTIONS
from parley.realtime.broker import Broker, MemoryBroker, RedisBroker
from parley.realtime.connection import Connection
from parley.realtime.envelope import Envelope, conversation_channel, serialize, to_conversation
from parley.realtime.events import (
    ConversationDeletedEvent,
    PresenceEvent,
    ResumedEvent,
    TypingEvent,
)
from parley.realtime.hub import Hub
from parley.realtime.presence import (
    MemoryPresence,
    MemoryTyping,
    PresenceStore,
    RedisPresence,
    RedisTyping,
    TypingStore,
)
from parley.realtime.replay import load_envelopes, load_resume

log = structlog.get_logger("parley.realtime")

BACKLOG_LIMIT = 100  # §8: the one-conversation WebSocket opens with at most this many


class TooManyConnections(ParleyError):
    status = 429
    code = "too_many_connections"


@dataclass(frozen=True, slots=True)
class MembershipRow:
    conversation_id: uuid.UUID
    joined_seq: int
    kind: str


class Realtime:
    def __init__(self, settings: Settings, db: Database, *, process: str) -> None:
        self.settings = settings
        self.db = db
        self.process = process
        self.redis: aioredis.Redis | None = None
        broker: Broker
        self.presence: PresenceStore
        self.typing: TypingStore
        if settings.redis_url:
            # One retry: after a Redis restart each pooled connection is dead until its
            # first use fails; presence and typing calls are safe to repeat.
            self.redis = aioredis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 1))
            broker = RedisBroker(settings.redis_url, prefix=settings.redis_prefix)
            self.presence = RedisPresence(
                self.redis,
                prefix=settings.redis_prefix,
                process=process,
                ttl=settings.presence_ttl,
            )
            self.typing = RedisTyping(self.redis, prefix=settings.redis_prefix)
        else:
            broker = MemoryBroker()
            self.presence = MemoryPresence(process=process)
            self.typing = MemoryTyping()
        self.broker = broker
        self.hub = Hub(db, broker)
        db.publisher = self.publish
        self._presence_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.hub.start()
        await self.presence.start()
        self._presence_task = asyncio.create_task(
            self._refresh_presence_forever(), name="parley-presence"
        )

    async def stop(self) -> None:
        self.db.publisher = None
        if self._presence_task is not None:
            self._presence_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._presence_task
        await self.presence.stop()
        await self.hub.stop()
        if self.redis is not None:
            await self.redis.aclose()

    @property
    def connection_count(self) -> int:
        return len(self.hub.connections)

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            await self.broker.publish(envelope.channel, envelope.encode())

    # -- connections --------------------------------------------------------------------

    async def connect(
        self,
        principal: Principal,
        *,
        transport: str,
        scope: uuid.UUID | None = None,
        hold_scope: bool = False,
    ) -> Connection:
        """Register a live connection and subscribe it; raises if the user has too many.

        For a one-conversation connection the caller has checked membership already;
        `hold_scope` keeps its live events back until the caller releases them (after
        a backlog)."""
        async with self.db.transaction(write=False) as session:
            rows = await _memberships(session, principal.id, scope)
        conn = Connection(
            id=uuid.uuid4().hex,
            user_id=principal.id,
            session_id=principal.session_id,
            scope=scope,
            queue_limit=self.settings.ws_send_queue,
        )
        if scope is not None and hold_scope:
            conn.hold(scope)
        # Count first, then check: two handshakes at once cannot both slip under the cap.
        count = await self.presence.add(principal.id)
        if count > self.settings.max_connections_per_user:
            await self.presence.remove(principal.id)
            raise TooManyConnections(
                f"At most {self.settings.max_connections_per_user} live connections per user"
            )
        try:
            await self.hub.attach(conn, [(r.conversation_id, r.joined_seq) for r in rows])
        except BaseException:
            self.hub.detach(conn)
            await self.presence.remove(principal.id)
            raise
        LIVE_CONNECTIONS.labels(transport).inc()
        if count == 1:
            await self._announce_presence(principal.id, "online", rows)
        return conn

    async def disconnect(self, conn: Connection, *, transport: str) -> None:
        self.hub.detach(conn)
        LIVE_CONNECTIONS.labels(transport).dec()
        try:
            if await self.presence.remove(conn.user_id) == 0:
                await self._announce_presence_of(conn.user_id, "offline")
        except Exception:
            log.exception("presence_update_failed")

    async def _refresh_presence_forever(self) -> None:
        while True:
            await asyncio.sleep(self.presence.refresh_interval)
            try:
                await self.refresh_presence()
            except Exception as exc:
                log.warning("presence_refresh_failed", error=type(exc).__name__)

    async def refresh_presence(self) -> None:
        """Keep this process's presence alive, and tell the people around them of users
        who went offline with a dead process, or who are back after this process was
        taken for dead."""
        changes = await self.presence.refresh()
        for status, users in (("offline", changes.offline), ("online", changes.online)):
            for user_id in users:
                await self._announce_presence_of(user_id, status)

    async def _announce_presence_of(self, user_id: uuid.UUID, status: str) -> None:
        """_announce_presence, for a user whose memberships are not at hand."""
        async with self.db.transaction(write=False) as session:
            rows = await _memberships(session, user_id, None)
        await self._announce_presence(user_id, status, rows)

    async def _announce_presence(
        self, user_id: uuid.UUID, status: str, rows: Sequence[MembershipRow]
    ) -> None:
        # Rooms can be huge and public: presence goes to the people one talks with.
        event = PresenceEvent(user_id=user_id, status=status)
        payload = serialize(event)
        envelopes = [
            Envelope(
                channel=conversation_channel(r.conversation_id), type="presence", payload=payload
            )
            for r in rows
            if r.kind != "room"
        ]
        await self.publish(envelopes)

    # -- resume -------------------------------------------------------------------------

    async def resume(
        self,
        conn: Connection,
        cursors: dict[uuid.UUID, int],
        ref: str | int | None,
        *,
        announce: bool = True,
    ) -> None:
        """Send every event after each cursor exactly once and in order, then `resumed`
        (§8). Live events of a conversation wait while it is replayed. SSE passes
        `announce=False`: its event ids already say where the stream stands."""
        stood_at: dict[str, int] = {}
        for conversation_id, cursor in cursors.items():
            if conn.scope is not None and conversation_id != conn.scope:
                continue
            if not self.hub.routes(conn, conversation_id):
                await self._resume_outsider(conn, conversation_id, cursor)
                continue
            conn.hold(conversation_id)
            # Live events may have reached the connection between `ready` and this
            # resume; the replay brings everything after the cursor except those, so each
            # event arrives exactly once (Connection.replay).
            try:
                async with self.db.transaction(write=False) as session:
                    replay = await load_resume(session, conversation_id, conn.user_id, cursor)
                if replay.gap is not None:
                    conn.send(replay.gap)
                for envelope in replay.envelopes:
                    assert envelope.seq is not None
                    await conn.make_room()
                    conn.replay(conversation_id, envelope.seq, envelope.payload, envelope.type)
                # Everything up to where the database stood is now covered (folded or
                # filtered on purpose); the client also vouches for its own cursor.
                conn.floor(conversation_id, max(replay.last_seq, cursor))
            finally:
                conn.release(conversation_id)
            stood_at[conversation_id.hex] = conn.sent.get(conversation_id, cursor)
        if announce:
            conn.send(serialize(ResumedEvent(ref=ref, cursors=_dashed(stood_at))))

    async def _resume_outsider(
        self, conn: Connection, conversation_id: uuid.UUID, cursor: int
    ) -> None:
        """The caller no longer routes this conversation: it was deleted, or they left or
        were removed. Say which, with the event itself where the log has it."""
        async with self.db.transaction(write=False) as session:
            conversation = await session.get(Conversation, conversation_id)
            left_at = await session.scalar(
                select(func.max(ConversationEvent.seq)).where(
                    ConversationEvent.conversation_id == conversation_id,
                    ConversationEvent.type == "member.left",
                    ConversationEvent.user_id == conn.user_id,
                )
            )
            envelopes = (
                await load_envelopes(session, conversation_id, after=left_at - 1, upto=left_at)
                if left_at is not None and left_at > cursor
                else []
            )
        if conversation is not None and conversation.deleted_at is not None:
            conn.send(serialize(ConversationDeletedEvent(conversation_id=conversation_id)))
        elif envelopes:
            env = envelopes[0]
            assert env.seq is not None
            conn.replay(conversation_id, env.seq, env.payload, env.type)

    async def backlog(
        self, conn: Connection, conversation_id: uuid.UUID
    ) -> tuple[list[Message], int, int]:
        """The caller's newest unread messages (at most BACKLOG_LIMIT), how many more are
        unread, and the seq the conversation stood at."""
        async with self.db.transaction(write=False) as session:
            membership = await session.get(Membership, (conversation_id, conn.user_id))
            conversation = await session.get(Conversation, conversation_id)
            if membership is None or conversation is None:
                return [], 0, 0
            unread = and_(
                Message.conversation_id == conversation_id,
                Message.seq > membership.last_read_seq,
                Message.deleted_at.is_(None),
            )
            total = await session.scalar(select(func.count()).where(unread)) or 0
            rows = list(
                (
                    await session.scalars(
                        select(Message)
                        .where(unread)
                        .order_by(Message.seq.desc())
                        .limit(BACKLOG_LIMIT)
                    )
                ).all()
            )
        rows.reverse()
        return rows, max(0, total - len(rows)), conversation.last_seq

    # -- typing -------------------------------------------------------------------------

    async def set_typing(
        self,
        session: AsyncSession,
        principal: Principal,
        conversation_id: uuid.UUID,
        is_typing: bool,
    ) -> None:
        await access_membership(session, principal, conversation_id)
        await self.typing.set(conversation_id, principal.id, is_typing)
        event = TypingEvent(
            conversation_id=conversation_id, user_id=principal.id, is_typing=is_typing
        )
        await self.publish(
            [to_conversation(conversation_id, event, type_="typing", subject=principal.id)]
        )

    async def who_is_typing(
        self, session: AsyncSession, principal: Principal, conversation_id: uuid.UUID
    ) -> list[uuid.UUID]:
        await access_membership(session, principal, conversation_id)
        return await self.typing.who(conversation_id)


def _dashed(cursors: dict[str, int]) -> dict[str, int]:
    return {str(uuid.UUID(hex=k)): v for k, v in cursors.items()}


async def _memberships(
    session: AsyncSession, user_id: uuid.UUID, scope: uuid.UUID | None
) -> list[MembershipRow]:
    stmt = (
        select(Membership.conversation_id, Membership.joined_seq, Conversation.kind)
        .join(Conversation, Conversation.id == Membership.conversation_id)
        .where(Membership.user_id == user_id, Conversation.deleted_at.is_(None))
    )
    if scope is not None:
        stmt = stmt.where(Membership.conversation_id == scope)
    return [MembershipRow(c, j, k) for c, j, k in (await session.execute(stmt)).all()]
