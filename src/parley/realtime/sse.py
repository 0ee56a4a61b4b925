"""Server-Sent Events transport (§8): `GET /api/v1/stream` (all of the caller's
conversations) and `GET /api/v1/stream?conversation_id=` (one).

Thin like the WebSocket gateway: authenticate, check, register a `Connection` with the
real-time service, then write the connection's frames as `event:` (the event type),
`data:` (its JSON, one line) and, for sequenced events, `id:`. The first event is
`ready`; a comment line every 15 s is the heartbeat. The stream ends when the hub
closes the connection (session ended, too slow, removed from the one conversation) —
after an `error` event that says why — or when the client goes away.

Event ids
---------
On `?conversation_id=` an event's id is its seq, and `Last-Event-ID: N` replays what
came after N, as a WebSocket `resume` with one cursor does.

On `/stream` one id must say where the client stands in *every* one of its
conversations, and any process must be able to read it. Listing every position in the
id does not scale (a user in 2,000 conversations), so the id has two parts:

    <checkpoint>.<delta>        e.g. 0c9f5e0d2b8a4f5e9d1c7a3b6e2f8a41.AQEHAwk

- *checkpoint*, 32 hex digits: a row of `stream_checkpoints` with `{conversation: seq}`
  for each of the caller's conversations, written when a stream opens. Each position
  is read from the hub in the same step that subscribed the stream — the seq just below
  the first event the stream will carry — so nothing before it is owed and nothing
  after it can be skipped.
- *delta*, base64url without padding: the conversations whose position moved since the
  checkpoint, and nothing else. A version byte (1), then per conversation a varint `k`
  — `i + 1` for the i-th conversation of the checkpoint in uuid order, or `0` followed
  by the 16 bytes of a conversation joined after the checkpoint — and a varint: the seq
  of the last event of it that the stream has sent. Two to five bytes per conversation
  of the checkpoint. Once more than 32 conversations have moved, or the checkpoint is
  half the refresh-token TTL old, the stream writes a fresh checkpoint (the current
  positions) and its delta starts empty again.

`ready` carries an id as well (where the stream opened), so a client that loses the
stream before any sequenced event resumes instead of starting live and missing what
happened in between.

Reading an id back: the checkpoint must exist and belong to the caller (else 400
`invalid_last_event_id`); the delta is laid over it. A conversation the caller is in
that neither names was joined after the checkpoint with nothing of it sent yet: it
starts at its join (`joined_seq - 1`). That is a cursor for every conversation, and
`Realtime.resume` replays exactly what is missing after each cursor, in seq order,
before the conversation goes live; a conversation that was left or deleted answers
`member.left` / `conversation.deleted` as for the WebSocket. A reconnect keeps the
checkpoint and the delta it came with, so it writes nothing unless the checkpoint is due
for renewal.

Checkpoints older than the refresh-token TTL are deleted when a checkpoint is written
(at most every few minutes per process). An id whose checkpoint is gone is refused like
a garbled one: the client opens a new stream without `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any

import anyio
import orjson
import structlog
from fastapi import APIRouter, Depends, Header, Query, Request
from sqlalchemy import delete, select
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from parley.auth.dependencies import oauth2_scheme
from parley.auth.service import Principal, access_principal_by_token
from parley.config import API_PREFIX, Settings
from parley.conversations.service import access_membership
from parley.db.base import utcnow
from parley.db.session import Database
from parley.errors import Forbidden, ParleyError, Unauthorized, error_responses
from parley.models import Conversation, ConversationEvent, Membership, StreamCheckpoint
from parley.ops.context import user_id_var
from parley.realtime.connection import (
    CLOSE_FORBIDDEN,
    CLOSE_INTERNAL,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    Connection,
    Frame,
)
from parley.realtime.envelope import serialize
from parley.realtime.events import ErrorEvent, ReadyEvent
from parley.realtime.handshake import access_principal_by_query, origin_allowed
from parley.realtime.replay import last_seqs
from parley.realtime.service import Realtime

log = structlog.get_logger("parley.sse")
router = APIRouter(prefix=API_PREFIX, tags=["realtime"])

HEARTBEAT_SECONDS = 15  # §8: a comment line this often keeps proxies from idling us out
# Conversations an id may list beyond its checkpoint; past this a fresh checkpoint is
# written, so an id stays well under a kilobyte.
MAX_DELTA = 32
# The longest id this server writes is 33 chars + base64 of ~33 entries of ≤ 26 bytes.
MAX_ID_CHARS = 2048
MAX_SEQ = 2**53
DELTA_VERSION = 1
# A stream that opens while another connection of this process is still opening one of
# the same conversations waits this long for the hub to know where it stands.
HUB_READY_WAIT = 2.0
PRUNE_INTERVAL = 300.0  # s between deletions of expired checkpoints, per process
RENEW_RETRY = 60.0  # s before retrying a checkpoint write that failed
# A client that takes longer than this to accept one event has stopped reading; its
# queue has overflowed long before (§9.6), so the response is ended.
SEND_TIMEOUT = 30.0

_ID_RE = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9_-]+)")
_SEQ_RE = re.compile(r"[0-9]{1,16}")
# Why the hub ended a stream, as the `code` of the last event.
_CLOSE_CODES = {
    CLOSE_UNAUTHORIZED: "session_ended",
    CLOSE_FORBIDDEN: "forbidden",
    CLOSE_TOO_SLOW: "too_slow",
}


class InvalidLastEventId(ParleyError):
    status = 400
    code = "invalid_last_event_id"

    def __init__(self) -> None:
        super().__init__(
            "Last-Event-ID is not an id this server sent on this kind of stream to you; "
            "open the stream again without it"
        )


# -- ids --------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift <= 56:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    raise InvalidLastEventId()


@dataclass(slots=True)
class Positions:
    """Where a `/stream` stands: its checkpoint and what moved since (see the module
    docstring for the id format)."""

    checkpoint_id: uuid.UUID
    base: dict[uuid.UUID, int]
    renew_at: float  # time.monotonic() after which the checkpoint is replaced
    moved: dict[uuid.UUID, int] = field(default_factory=dict)
    retry_at: float = 0.0
    order: dict[uuid.UUID, int] = field(init=False)

    def __post_init__(self) -> None:
        self.order = {c: i for i, c in enumerate(sorted(self.base))}

    def get(self, conversation_id: uuid.UUID) -> int | None:
        return self.moved.get(conversation_id, self.base.get(conversation_id))

    def current(self) -> dict[uuid.UUID, int]:
        return {**self.base, **self.moved}

    @property
    def due(self) -> bool:
        now = time.monotonic()
        return now >= self.retry_at and (len(self.moved) > MAX_DELTA or now >= self.renew_at)

    def event_id(self) -> str:
        out = bytearray([DELTA_VERSION])
        known = sorted((self.order[c], c) for c in self.moved if c in self.order)
        for index, c in known:
            out += _varint(index + 1) + _varint(self.moved[c])
        for c in sorted(c for c in self.moved if c not in self.order):
            out += _varint(0) + c.bytes + _varint(self.moved[c])
        delta = base64.urlsafe_b64encode(bytes(out)).rstrip(b"=").decode()
        return f"{self.checkpoint_id.hex}.{delta}"

    def read_delta(self, delta: str) -> None:
        try:
            data = base64.urlsafe_b64decode(delta + "=" * (-len(delta) % 4))
        except ValueError as exc:
            raise InvalidLastEventId() from exc
        if not data or data[0] != DELTA_VERSION:
            raise InvalidLastEventId()
        order = sorted(self.base)
        at = 1
        while at < len(data):
            k, at = _read_varint(data, at)
            if k == 0:
                if at + 16 > len(data):
                    raise InvalidLastEventId()
                conversation_id = uuid.UUID(bytes=data[at : at + 16])
                at += 16
            elif k <= len(order):
                conversation_id = order[k - 1]
            else:
                raise InvalidLastEventId()
            seq, at = _read_varint(data, at)
            if seq > MAX_SEQ or len(self.moved) > 2 * MAX_DELTA:
                raise InvalidLastEventId()
            self.moved[conversation_id] = seq


class _Throttle:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -interval

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval:
            return False
        self.last = now
        return True


_prune = _Throttle(PRUNE_INTERVAL)


async def _write_checkpoint(
    db: Database, settings: Settings, user_id: uuid.UUID, stood: dict[uuid.UUID, int]
) -> Positions:
    row = StreamCheckpoint(
        id=uuid.uuid4(),
        user_id=user_id,
        positions={c.hex: seq for c, seq in stood.items()},
        created_at=utcnow(),
    )
    async with db.transaction() as session:
        session.add(row)
        if _prune.ready():
            # No session outlives the refresh-token TTL, so no stream needs an older one.
            expired = row.created_at - timedelta(seconds=settings.refresh_token_ttl)
            await session.execute(
                delete(StreamCheckpoint).where(StreamCheckpoint.created_at < expired)
            )
    return Positions(row.id, dict(stood), renew_at=time.monotonic() + _renew_after(settings))


def _renew_after(settings: Settings) -> float:
    return settings.refresh_token_ttl / 2


async def _read_checkpoint(
    db: Database, settings: Settings, user_id: uuid.UUID, last_event_id: str
) -> Positions:
    """The positions an id stands for; InvalidLastEventId unless it is the caller's."""
    match = _ID_RE.fullmatch(last_event_id)
    if match is None:
        raise InvalidLastEventId()
    async with db.transaction(write=False) as session:
        row = await session.get(StreamCheckpoint, uuid.UUID(hex=match[1]))
    if row is None or row.user_id != user_id:
        raise InvalidLastEventId()
    base: dict[uuid.UUID, int] = {}
    for key, seq in row.positions.items():
        base[uuid.UUID(hex=key)] = int(seq)
    age = (utcnow() - row.created_at).total_seconds()
    positions = Positions(row.id, base, renew_at=time.monotonic() + _renew_after(settings) - age)
    positions.read_delta(match[2])
    return positions


def _read_seq(last_event_id: str) -> int:
    if _SEQ_RE.fullmatch(last_event_id) is None or int(last_event_id) > MAX_SEQ:
        raise InvalidLastEventId()
    return int(last_event_id)


async def _joined_seqs(db: Database, user_id: uuid.UUID) -> dict[uuid.UUID, int]:
    """The caller's conversations and the seq of their (latest) join."""
    async with db.transaction(write=False) as session:
        rows = await session.execute(
            select(Membership.conversation_id, Membership.joined_seq)
            .join(Conversation, Conversation.id == Membership.conversation_id)
            .where(Membership.user_id == user_id, Conversation.deleted_at.is_(None))
        )
        return {c: joined for c, joined in rows.all()}


async def _drop_strangers(
    db: Database, user_id: uuid.UUID, positions: Positions, members: set[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """The positions worth resuming. A conversation that only the delta names (the
    client wrote that part) and that the caller is not in is kept only if the caller
    ever was in it: resuming answers `conversation.deleted` for a deleted one, which
    must not tell a stranger that some id was a conversation (§2, no leaks)."""
    cursors = positions.current()
    strangers = [c for c in cursors if c not in members and c not in positions.base]
    if strangers:
        async with db.transaction(write=False) as session:
            rows = await session.scalars(
                select(ConversationEvent.conversation_id)
                .where(
                    ConversationEvent.conversation_id.in_(strangers),
                    ConversationEvent.user_id == user_id,
                )
                .distinct()
            )
            was_member = set(rows)
        for c in strangers:
            if c not in was_member:
                del cursors[c]
    return cursors


# -- the endpoint -----------------------------------------------------------------------


@router.get(
    "/stream",
    operation_id="stream_events",
    summary="Server-Sent Events: the caller's real-time events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "An endless `text/event-stream`: `ready`, then the events of "
            "§8 with `id:` on sequenced ones, and a comment heartbeat every 15 s",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 403, 404, 429),
    },
)
async def stream_events(
    request: Request,
    bearer: Annotated[str | None, Depends(oauth2_scheme)],
    conversation_id: Annotated[
        uuid.UUID | None, Query(description="Only this conversation; ids are then its seqs")
    ] = None,
    ticket: Annotated[
        str | None, Query(max_length=256, description="A single-use ticket (POST /auth/ticket)")
    ] = None,
    token: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="An access token, for clients that cannot set Authorization",
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Resume after this id (browsers send it)"),
    ] = None,
) -> EventSourceResponse:
    settings: Settings = request.app.state.settings
    db: Database = request.app.state.db
    realtime: Realtime = request.app.state.realtime
    if not origin_allowed(request, settings):
        raise Forbidden("This Origin may not open a stream")
    principal = await _authenticate(db, settings, bearer=bearer, ticket=ticket, token=token)
    user_id_var.set(str(principal.id))
    if conversation_id is not None:
        async with db.transaction(write=False) as session:
            await access_membership(session, principal, conversation_id)
    if last_event_id is not None and len(last_event_id) > MAX_ID_CHARS:
        raise InvalidLastEventId()

    # Everything that can refuse the request with a problem+json happens before connect.
    cursors: dict[uuid.UUID, int] | None = None
    members: set[uuid.UUID] = set()
    positions: Positions | None = None
    if last_event_id and conversation_id is not None:
        cursors = {conversation_id: _read_seq(last_event_id)}
        members = {conversation_id}
    elif last_event_id:
        positions = await _read_checkpoint(db, settings, principal.id, last_event_id)
        joined = await _joined_seqs(db, principal.id)
        members = set(joined)
        cursors = await _drop_strangers(db, principal.id, positions, members)
        for c, joined_seq in joined.items():
            # Joined after the checkpoint, nothing of it sent yet: from the join on.
            cursors.setdefault(c, max(joined_seq - 1, 0))

    transport = "sse" if conversation_id is None else "sse_conversation"
    conn = await realtime.connect(principal, transport=transport, scope=conversation_id)
    # From here until the response owns it, any failure must give the connection back.
    stream = EventStream(realtime, settings, conn, transport=transport)
    try:
        if cursors is None:
            await stream.start_live()
        else:
            await stream.start_resumed(cursors, members, positions)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.close()
        raise
    return _StreamResponse(stream)


async def _authenticate(
    db: Database, settings: Settings, *, bearer: str | None, ticket: str | None, token: str | None
) -> Principal:
    if bearer:
        async with db.transaction(write=False) as session:
            return await access_principal_by_token(session, settings, bearer)
    principal = await access_principal_by_query(db, settings, ticket=ticket, token=token)
    if principal is None:
        raise Unauthorized()
    return principal


class _StreamResponse(EventSourceResponse):
    """An EventSourceResponse that always gives its connection back: also when the
    client leaves before the first event, when the generator has not even started."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(stream.events(), ping=HEARTBEAT_SECONDS, send_timeout=SEND_TIMEOUT)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("sse_client_stalled", connection_id=self.stream.conn.id)
        finally:
            # The task group may have been cancelled (client gone, shutdown): without the
            # shield the first await of the cleanup would be cancelled too.
            with anyio.CancelScope(shield=True):
                await self.stream.close()


# -- one stream -------------------------------------------------------------------------


class EventStream:
    """One open SSE response: the connection, where it stands, and its writer."""

    def __init__(
        self,
        realtime: Realtime,
        settings: Settings,
        conn: Connection,
        *,
        transport: str,
    ) -> None:
        self.realtime = realtime
        self.settings = settings
        self.conn = conn
        self.transport = transport
        self.positions: Positions | None = None  # `/stream` only
        self.ready_id = ""
        self._replay: asyncio.Task[None] | None = None
        self._closed = False

    # -- opening ------------------------------------------------------------------------

    async def start_live(self) -> None:
        """No Last-Event-ID: the stream starts where the hub stood when it subscribed."""
        await self._wait_for_hub()
        stood = self._stood_at()
        if self.conn.scope is not None:
            self.ready_id = str(stood.get(self.conn.scope, 0))
            return
        self.positions = await _write_checkpoint(
            self.realtime.db, self.settings, self.conn.user_id, stood
        )
        self.ready_id = self.positions.event_id()

    async def start_resumed(
        self,
        cursors: dict[uuid.UUID, int],
        members: set[uuid.UUID],
        positions: Positions | None,
    ) -> None:
        """Replay what was missed after each cursor, then go live.

        Must be awaited right after `Realtime.connect`, with no await in between: the
        first step takes back what the hub queued since subscribing."""
        self._take_back(cursors)
        async with self.realtime.db.transaction(write=False) as session:
            stood = await last_seqs(session, list(cursors))
        missed: dict[uuid.UUID, int] = {}
        for c, cursor in cursors.items():
            seq = stood.get(c)
            if c in members and seq is not None and seq <= cursor:
                # Nothing happened here since: live from the cursor, no replay needed.
                self.conn.floor(c, cursor)
                self.conn.release(c)
            else:
                missed[c] = cursor
        if self.conn.scope is not None:
            self.ready_id = str(cursors[self.conn.scope])
        else:
            assert positions is not None
            if positions.due:
                positions = await _write_checkpoint(
                    self.realtime.db, self.settings, self.conn.user_id, cursors
                )
            self.positions = positions
            self.ready_id = positions.event_id()
        if missed:
            self._replay = asyncio.create_task(self._resume(missed))

    def _take_back(self, cursors: dict[uuid.UUID, int]) -> None:
        """Hold every conversation about to be replayed, and put what the hub queued for
        them since subscribing behind the replay. Nothing has been written to the client
        yet, so this is a rewind, not a loss; release() drops what the replay covered."""
        conn = self.conn
        for c in cursors:
            conn.hold(c)
        kept: list[Frame | None] = []
        while not conn.queue.empty():
            frame = conn.queue.get_nowait()
            if frame is not None and frame.seq is not None and frame.conversation_id in cursors:
                conn.held[frame.conversation_id].append(frame)
            else:
                kept.append(frame)
        for frame in kept:
            conn.queue.put_nowait(frame)
        for c, cursor in cursors.items():
            # The client vouches for its cursor; the replay starts right after it.
            conn.sent[c] = cursor

    async def _resume(self, cursors: dict[uuid.UUID, int]) -> None:
        # Runs beside the writer, so a long replay drains while it is being loaded.
        try:
            await self.realtime.resume(self.conn, cursors, None, announce=False)
        except Exception:
            log.exception("sse_resume_failed", connection_id=self.conn.id)
            self.conn.close(CLOSE_INTERNAL, "the replay failed: reconnect to resume")
        finally:
            for c in cursors:
                self.conn.release(c)

    async def _wait_for_hub(self) -> None:
        hub = self.realtime.hub
        deadline = time.monotonic() + HUB_READY_WAIT
        while time.monotonic() < deadline:
            streams = [hub.streams.get(c) for c in hub.member_of.get(self.conn.id, ())]
            if all(s is None or s.ready for s in streams):
                return
            await asyncio.sleep(0.01)

    def _stood_at(self) -> dict[uuid.UUID, int]:
        """Per conversation, the seq just below the first event this stream will carry.

        Synchronous on purpose: it reads the queue and the hub in one step, so no event
        can slip between the two."""
        conn, hub = self.conn, self.realtime.hub
        frames: list[Frame | None] = []
        first: dict[uuid.UUID, int] = {}
        while not conn.queue.empty():
            frame = conn.queue.get_nowait()
            frames.append(frame)
            if frame is not None and frame.seq is not None and frame.conversation_id is not None:
                first.setdefault(frame.conversation_id, frame.seq)
        for frame in frames:
            conn.queue.put_nowait(frame)
        stood: dict[uuid.UUID, int] = {}
        for c in hub.member_of.get(conn.id, set()) | set(first):
            if c in first:
                stood[c] = first[c] - 1  # already queued from there on
                continue
            # Nothing queued yet: the hub routes last_seq + 1 next, and the connection
            # skips anything up to its own floor (the join).
            stream = hub.streams.get(c)
            floor = conn.sent.get(c, 0)
            stood[c] = max(floor, stream.last_seq) if stream is not None and stream.ready else floor
        return stood

    # -- writing ------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        conn = self.conn
        hub = self.realtime.hub
        ready = ReadyEvent(user_id=conn.user_id, connection_id=conn.id, heartbeat=HEARTBEAT_SECONDS)
        yield ServerSentEvent(serialize(ready).decode(), event="ready", id=self.ready_id)
        while True:
            frame = await conn.queue.get()
            if frame is None:
                yield self._farewell()
                return
            if not frame.payload:
                continue
            yield await self._event(frame)
            if frame.type == "message.created" and frame.conversation_id and frame.seq:
                hub.mark_delivered(conn, frame.conversation_id, frame.seq)

    async def _event(self, frame: Frame) -> ServerSentEvent:
        data = frame.data
        event_type = frame.type or _type_of(frame.payload)
        if frame.seq is None or frame.conversation_id is None:
            return ServerSentEvent(data, event=event_type)
        if self.positions is None:
            return ServerSentEvent(data, event=event_type, id=str(frame.seq))
        self.positions.moved[frame.conversation_id] = frame.seq
        if self.positions.due:
            await self._renew()
        return ServerSentEvent(data, event=event_type, id=self.positions.event_id())

    async def _renew(self) -> None:
        assert self.positions is not None
        try:
            self.positions = await _write_checkpoint(
                self.realtime.db, self.settings, self.conn.user_id, self.positions.current()
            )
        except Exception:
            # The ids stay right, only longer; try again later.
            log.exception("sse_checkpoint_failed", connection_id=self.conn.id)
            self.positions.retry_at = time.monotonic() + RENEW_RETRY

    def _farewell(self) -> ServerSentEvent:
        code = self.conn.close_code or 1000
        event = ErrorEvent(
            code=_CLOSE_CODES.get(code, "closed"),
            detail=self.conn.close_reason or "the server closed the stream",
        )
        return ServerSentEvent(serialize(event).decode(), event="error")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._replay is not None and not self._replay.done():
            self._replay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._replay
        await self.realtime.disconnect(self.conn, transport=self.transport)


def _type_of(payload: bytes) -> str:
    """The type of an ephemeral event (sequenced frames carry theirs in the frame)."""
    try:
        event: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "message"
    return str(event.get("type", "message")) if isinstance(event, dict) else "message"
