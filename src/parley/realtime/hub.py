"""The per-process router: conversation → local connections, in seq order, no holes.

Every process runs one hub. It subscribes the broker channels of the conversations its
connections need and routes each event, serialized once, to those connections.

Order and completeness (§9.2, §9.3): per conversation the hub remembers the last seq it
routed. An event that arrives early waits in `pending`; if the missing seqs do not show
up within a short grace (pub/sub from several publishers may reorder), they are loaded
from the database. After a broker outage every stream is caught up from the database,
and a periodic sweep catches up any stream that the database shows to be behind (an
event lost between commit and publish with nothing after it).

Isolation (§9.5): membership changes travel in the same ordered stream, so a member's
connections are added exactly at their member.joined and removed right after their
member.left; nothing sequenced after the removal is routed to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from sqlalchemy import bindparam, select, update

from parley.db.base import utcnow
from parley.db.session import Database
from parley.models import AuthSession, Membership, User
from parley.ops.metrics import EVENTS_FANNED_OUT, FANOUT_LATENCY, HOLES_FILLED
from parley.realtime.broker import Broker
from parley.realtime.connection import (
    CLOSE_FORBIDDEN,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    WRITE_STALL,
    Connection,
    Frame,
)
from parley.realtime.envelope import (
    Envelope,
    conversation_channel,
    gap_payload,
    serialize,
    user_channel,
)
from parley.realtime.events import ConversationDeletedEvent
from parley.realtime.replay import last_seqs, load_envelopes

log = structlog.get_logger("parley.hub")

# Pub/sub from several publishers may deliver seq N+1 before N; wait this long for N
# before reading it from the database.
HOLE_GRACE = 0.05
# How often the hub re-checks sessions (revocation closes within 5 s, §3), compares its
# streams with the database, drops idle streams and writes delivery markers.
SWEEP_INTERVAL = 2.0


@dataclass(eq=False, slots=True)
class Stream:
    """The hub's routing state for one conversation."""

    id: uuid.UUID
    last_seq: int = 0
    ready: bool = False
    subscribers: set[Connection] = field(default_factory=set)
    pending: dict[int, Envelope] = field(default_factory=dict)
    filling: bool = False
    catch_up: bool = False
    # The database's last_seq at the previous sweep: still above last_seq one sweep
    # later means an event went missing (not merely in flight).
    expected: int = 0


class Hub:
    def __init__(self, db: Database, broker: Broker) -> None:
        self.db = db
        self.broker = broker
        self.connections: dict[str, Connection] = {}
        self.by_user: dict[uuid.UUID, set[Connection]] = {}
        self.streams: dict[uuid.UUID, Stream] = {}
        self.member_of: dict[str, set[uuid.UUID]] = {}
        self._delivered: dict[tuple[uuid.UUID, uuid.UUID], int] = {}
        self._subscription_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self._on_message, self._on_reconnect)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="parley-hub-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._tasks):
            task.cancel()
        await self._flush_delivered()
        await self.broker.close()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections --------------------------------------------------------------------

    async def attach(self, conn: Connection, memberships: Iterable[tuple[uuid.UUID, int]]) -> None:
        """Route the given conversations to `conn` ((conversation id, joined_seq) pairs).

        Returns once every channel is subscribed and every stream knows where it stands,
        so an event committed after this returns reaches the connection."""
        self.connections[conn.id] = conn
        users = self.by_user.setdefault(conn.user_id, set())
        first_of_user = not users
        users.add(conn)
        conversations = self.member_of.setdefault(conn.id, set())
        opening: list[Stream] = []
        for conversation_id, joined_seq in memberships:
            # Events from before the (latest) join are history, not live traffic.
            conn.floor(conversation_id, joined_seq - 1)
            stream = self.streams.get(conversation_id)
            if stream is None:
                stream = self.streams[conversation_id] = Stream(conversation_id)
                opening.append(stream)
            stream.subscribers.add(conn)
            conversations.add(conversation_id)
        channels = [conversation_channel(s.id) for s in opening]
        if first_of_user:
            channels.append(user_channel(conn.user_id))
        async with self._subscription_lock:
            await self.broker.subscribe(channels)
        await self._open(opening)

    def detach(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        users = self.by_user.get(conn.user_id)
        channels: list[str] = []
        if users is not None:
            users.discard(conn)
            if not users:
                del self.by_user[conn.user_id]
                channels.append(user_channel(conn.user_id))
        for conversation_id in self.member_of.pop(conn.id, set()):
            stream = self.streams.get(conversation_id)
            if stream is not None:
                stream.subscribers.discard(conn)
                if not stream.subscribers and not stream.filling:
                    del self.streams[conversation_id]
                    channels.append(conversation_channel(conversation_id))
        if channels:
            self._spawn(self._unsubscribe(channels))

    async def _unsubscribe(self, channels: list[str]) -> None:
        async with self._subscription_lock:
            # Re-checked under the lock: a connection may have needed a channel again
            # since it was given up.
            still_needed = {conversation_channel(cid) for cid in self.streams} | {
                user_channel(uid) for uid in self.by_user
            }
            await self.broker.unsubscribe([c for c in channels if c not in still_needed])

    async def _open(self, streams: list[Stream]) -> None:
        if not streams:
            return
        for stream, seq in await self._positions(streams):
            stream.last_seq = seq
            stream.expected = seq
            stream.ready = True
            self._drain(stream)
            if stream.pending:
                self._schedule_fill(stream)

    async def _positions(self, streams: list[Stream]) -> list[tuple[Stream, int]]:
        """Where the database says each stream's conversation stands; streams dropped
        meanwhile are left out, deleted conversations are dropped here."""
        async with self.db.transaction(write=False) as session:
            seqs = await last_seqs(session, [s.id for s in streams])
        positions = []
        for stream in streams:
            if self.streams.get(stream.id) is not stream:
                continue
            seq = seqs.get(stream.id)
            if seq is None:
                self._deleted(stream)
            else:
                positions.append((stream, seq))
        return positions

    def routes(self, conn: Connection, conversation_id: uuid.UUID) -> bool:
        """Whether the hub routes this conversation to `conn` (it is a member)."""
        return conversation_id in self.member_of.get(conn.id, ()) and (
            conversation_id in self.streams
        )

    # -- broker input -------------------------------------------------------------------

    def _on_message(self, channel: str, data: bytes) -> None:
        try:
            kind, _, ident = channel.partition(":")
            envelope = Envelope.decode(channel, data)
            if kind == "c":
                self._on_conversation(uuid.UUID(hex=ident), envelope)
            elif kind == "u":
                self._on_user(uuid.UUID(hex=ident), envelope)
        except Exception:
            log.exception("route_failed", channel=channel)

    async def _on_reconnect(self) -> None:
        """The subscription was interrupted: whatever was published meanwhile is lost to
        pub/sub; take it from the database (§9.3)."""
        for stream in list(self.streams.values()):
            if stream.ready:
                stream.catch_up = True
                self._schedule_fill(stream)

    def _on_conversation(self, conversation_id: uuid.UUID, envelope: Envelope) -> None:
        stream = self.streams.get(conversation_id)
        if stream is None:
            return
        if envelope.seq is None:
            self._route_ephemeral(stream, envelope)
            return
        if stream.ready and envelope.seq <= stream.last_seq:
            return  # already routed (from the database, or a duplicate)
        stream.pending[envelope.seq] = envelope
        if stream.ready:
            self._drain(stream)
            if stream.pending:
                self._schedule_fill(stream)

    def _on_user(self, user_id: uuid.UUID, envelope: Envelope) -> None:
        connections = self.by_user.get(user_id)
        if not connections:
            return
        if envelope.type == "track":
            self._track(envelope)
            return
        for conn in list(connections):
            if conn.scope is not None and envelope.conversation_id != conn.scope:
                continue  # a one-conversation socket hears of its conversation only
            conn.send(envelope.payload)

    def _track(self, envelope: Envelope) -> None:
        """The user joined a conversation this process may not route yet: start its
        stream just before the join, so the member.joined (and all after) come through."""
        conversation_id, seq = envelope.conversation_id, envelope.seq
        if conversation_id is None or seq is None or conversation_id in self.streams:
            return
        stream = self.streams[conversation_id] = Stream(conversation_id, last_seq=seq - 1)
        self._spawn(self._open_tracked(stream))

    async def _open_tracked(self, stream: Stream) -> None:
        async with self._subscription_lock:
            await self.broker.subscribe([conversation_channel(stream.id)])
        if self.streams.get(stream.id) is not stream:
            return
        stream.ready = True
        stream.catch_up = True
        self._drain(stream)
        self._schedule_fill(stream)

    # -- routing ------------------------------------------------------------------------

    def _route_ephemeral(self, stream: Stream, envelope: Envelope) -> None:
        if envelope.type == "conversation.deleted":
            self._deleted(stream, envelope.payload)
            return
        frame = Frame(envelope.payload, text=envelope.payload.decode())
        for conn in list(stream.subscribers):
            if envelope.type == "typing" and conn.user_id == envelope.subject:
                continue  # one's own typing is no news
            conn.send_frame(frame)
        EVENTS_FANNED_OUT.labels("ephemeral").inc(len(stream.subscribers))

    def _drain(self, stream: Stream) -> None:
        while True:
            envelope = stream.pending.pop(stream.last_seq + 1, None)
            if envelope is None:
                break
            stream.last_seq += 1
            self._apply(stream, envelope)
        for seq in [s for s in stream.pending if s <= stream.last_seq]:
            del stream.pending[seq]

    def _apply(self, stream: Stream, envelope: Envelope) -> None:
        assert envelope.seq is not None
        subject = envelope.subject
        if envelope.published_at is not None:
            FANOUT_LATENCY.observe(max(0.0, time.time() - envelope.published_at))
        if envelope.type == "member.joined" and subject is not None:
            for conn in self.by_user.get(subject, ()):
                if conn.scope is None:
                    stream.subscribers.add(conn)
                    self.member_of.setdefault(conn.id, set()).add(stream.id)
        # One frame, decoded once, for every connection.
        frame = Frame(
            envelope.payload, stream.id, envelope.seq, envelope.type, envelope.payload.decode()
        )
        for conn in list(stream.subscribers):
            conn.deliver_frame(frame)
        EVENTS_FANNED_OUT.labels("sequenced").inc(len(stream.subscribers))
        if envelope.type == "member.left" and subject is not None:
            for conn in list(self.by_user.get(subject, ())):
                stream.subscribers.discard(conn)
                self.member_of.get(conn.id, set()).discard(stream.id)
                if conn.scope == stream.id:
                    conn.close(
                        CLOSE_FORBIDDEN, "no longer a member of this conversation", flush=True
                    )

    def _deleted(self, stream: Stream, payload: bytes | None = None) -> None:
        payload = payload or serialize(ConversationDeletedEvent(conversation_id=stream.id))
        for conn in list(stream.subscribers):
            conn.send(payload)
            self.member_of.get(conn.id, set()).discard(stream.id)
            if conn.scope == stream.id:
                conn.close(CLOSE_FORBIDDEN, "the conversation was deleted", flush=True)
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self._spawn(self._unsubscribe([conversation_channel(stream.id)]))

    # -- filling holes from the database -------------------------------------------------

    def _schedule_fill(self, stream: Stream) -> None:
        if not stream.filling:
            stream.filling = True
            self._spawn(self._fill(stream))

    async def _fill(self, stream: Stream) -> None:
        try:
            if not stream.catch_up:
                await asyncio.sleep(HOLE_GRACE)
            while self.streams.get(stream.id) is stream:
                if stream.catch_up:
                    stream.catch_up = False
                    await self._load_into(stream, upto=None)
                    continue
                if not stream.pending:
                    break
                first = min(stream.pending)
                before = stream.last_seq
                await self._load_into(stream, upto=first - 1)
                if stream.last_seq == before and stream.pending and min(stream.pending) == first:
                    # The log has no rows there, which gap-free commits rule out; say so
                    # rather than stall the conversation.
                    self._gap(stream, before + 1, first - 1)
        except Exception:
            log.exception("fill_failed", conversation_id=str(stream.id))
        finally:
            stream.filling = False

    async def _load_into(self, stream: Stream, *, upto: int | None) -> None:
        async with self.db.transaction(write=False) as session:
            envelopes = await load_envelopes(session, stream.id, after=stream.last_seq, upto=upto)
        for envelope in envelopes:
            assert envelope.seq is not None
            if envelope.seq > stream.last_seq and envelope.seq not in stream.pending:
                stream.pending[envelope.seq] = envelope
                HOLES_FILLED.inc()
        self._drain(stream)

    def _gap(self, stream: Stream, from_seq: int, to_seq: int) -> None:
        log.error("seq_gap", conversation_id=str(stream.id), from_seq=from_seq, to_seq=to_seq)
        payload = gap_payload(stream.id, from_seq, to_seq)
        for conn in list(stream.subscribers):
            conn.send(payload)
            conn.floor(stream.id, to_seq)
        stream.last_seq = to_seq
        self._drain(stream)

    # -- delivery markers ---------------------------------------------------------------

    def mark_delivered(self, conn: Connection, conversation_id: uuid.UUID, seq: int) -> None:
        """A message event was written to a live connection (feeds `status`, receipts)."""
        key = (conversation_id, conn.user_id)
        if seq > self._delivered.get(key, 0):
            self._delivered[key] = seq

    async def _flush_delivered(self) -> None:
        if not self._delivered:
            return
        batch, self._delivered = self._delivered, {}
        stmt = (
            update(Membership)
            .where(
                Membership.conversation_id == bindparam("c"),
                Membership.user_id == bindparam("u"),
                Membership.delivered_seq < bindparam("s"),
            )
            .values(delivered_seq=bindparam("s"))
        )
        params = [{"c": c, "u": u, "s": s} for (c, u), s in batch.items()]
        async with self.db.transaction() as session:
            conn = await session.connection()
            await conn.execute(stmt, params)

    # -- the sweep ----------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep_failed")

    async def sweep(self) -> None:
        self._close_stalled_writers()
        await self._close_ended_sessions()
        await self._check_streams()
        await self._flush_delivered()

    def _close_stalled_writers(self) -> None:
        """§9.6: a client that takes no frame for WRITE_STALL seconds is too slow, even
        while its queue still has room."""
        now = time.monotonic()
        for conn in list(self.connections.values()):
            since = conn.writing_since
            if since is not None and now - since > WRITE_STALL:
                conn.close(CLOSE_TOO_SLOW, "too slow: reconnect and resume")

    async def _close_ended_sessions(self) -> None:
        # Only the connections asked about: one that attaches while the query runs has
        # a session nobody checked yet, and must not be taken for an ended one.
        checked = list(self.connections.values())
        sessions = {c.session_id for c in checked}
        if not sessions:
            return
        async with self.db.transaction(write=False) as session:
            rows = await session.scalars(
                select(AuthSession.id)
                .join(User, User.id == AuthSession.user_id)
                .where(
                    AuthSession.id.in_(sessions),
                    AuthSession.ended_at.is_(None),
                    AuthSession.expires_at > utcnow(),
                    User.is_active.is_(True),
                )
            )
            live = set(rows)
        for conn in checked:
            if conn.session_id not in live:
                conn.close(CLOSE_UNAUTHORIZED, "the session has ended")

    async def _check_streams(self) -> None:
        streams = [s for s in self.streams.values() if s.ready]
        if not streams:
            return
        idle: list[str] = []
        for stream, seq in await self._positions(streams):
            if not stream.subscribers and not stream.filling and not stream.pending:
                del self.streams[stream.id]
                idle.append(conversation_channel(stream.id))
                continue
            if stream.last_seq < stream.expected and not stream.filling:
                stream.catch_up = True
                self._schedule_fill(stream)
            stream.expected = seq
        if idle:
            await self._unsubscribe(idle)
