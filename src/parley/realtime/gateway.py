"""The WebSocket transports (§8): authenticate, parse, clamp, delegate.

Each connection has two halves: a reader, which parses one op at a time and calls the
same services REST uses, and a writer that drains the connection's bounded queue when
frames cannot go straight to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
import structlog
from fastapi import WebSocket
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from parley.auth.service import Principal, access_principal, access_principal_by_token
from parley.config import API_PREFIX, Settings
from parley.conversations.service import access_membership
from parley.db.session import Database
from parley.errors import ParleyError, RateLimited, Unauthorized
from parley.messages import service as messages
from parley.messages.schemas import MessageCreate
from parley.models import Membership
from parley.ops.context import start_request
from parley.ops.wsproto import FRAMES_EXTENSION, encode_text_frame
from parley.realtime.connection import (
    CLOSE_FORBIDDEN,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    WRITE_STALL,
    Connection,
    Frame,
)
from parley.realtime.envelope import gap_payload, serialize
from parley.realtime.events import (
    AckEvent,
    AuthOp,
    BacklogEvent,
    DeleteOp,
    EditOp,
    ErrorEvent,
    HistoryEvent,
    HistoryOp,
    PingOp,
    PongEvent,
    ReadOp,
    ReadyEvent,
    ResumeOp,
    SendOp,
    TypingOp,
    client_op_adapter,
)
from parley.realtime.handshake import access_principal_by_query, origin_allowed
from parley.realtime.service import Realtime, TooManyConnections

log = structlog.get_logger("parley.gateway")

HEARTBEAT_SECONDS = 25  # §8: the server pings every 25 s and closes after two misses
AUTH_TIMEOUT = 5.0  # §8: a first-frame `auth` must come within 5 s
# Frames per connection (ops, and anything else a client sends): a steady 20/s with
# bursts of 40. Past that a frame is refused with `rate_limited` and dropped.
OP_RATE = 20.0
OP_BURST = 40.0
# A client that keeps on is closed (1008). Refusals pile up and are forgiven at
# STRIKE_DECAY per second, so a client refused more than that on average (not one that
# merely brushes the limit now and then) reaches MAX_STRIKES within seconds. Counting
# "refusals in a row" instead would let a steady flood live for ever: every token that
# trickles back lets one op through and starts the count again.
MAX_STRIKES = 50.0
STRIKE_DECAY = 5.0
# A goodbye (close frame) to a client that does not read gets this long to go out;
# then the connection is dropped without one.
CLOSE_TIMEOUT = 5.0


class OpError(ParleyError):
    status = 400
    code = "bad_request"


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, time.monotonic()

    def take(self) -> float:
        """0 if an op may go now, else the seconds until it may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


_ONE_PREFIX = f"{API_PREFIX}/ws/conversations/"


async def serve_websocket(app: Any, scope: Scope, receive: Receive, send: Send) -> bool:
    """Serve a gateway WebSocket (`/ws`, `/ws/conversations/{id}`) straight from the ASGI
    call; False if the path is not one.

    ParleyApp calls this before the HTTP stack. As a FastAPI route, a socket would keep
    the stack's frames and exit stacks (middleware, exception handlers, dependency
    solving) alive as long as itself: about 10 KiB per idle connection."""
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path == f"{API_PREFIX}/ws":
        conversation_id = None
    elif path.startswith(_ONE_PREFIX):
        try:
            conversation_id = uuid.UUID(path[len(_ONE_PREFIX) :])
        except ValueError:
            return False  # no such path: the router refuses the handshake
    else:
        return False
    scope["app"] = app
    start_request(dict(scope.get("headers") or []))
    await Gateway(WebSocket(scope, receive, send), scope=conversation_id).run()
    return True


class Gateway:
    # Slots: one Gateway lives as long as its socket.
    __slots__ = (
        "_write_frame",
        "bucket",
        "conn",
        "db",
        "rate_limited",
        "realtime",
        "scope",
        "session_id",
        "settings",
        "strikes",
        "struck_at",
        "user_id",
        "ws",
    )

    def __init__(self, websocket: WebSocket, *, scope: uuid.UUID | None) -> None:
        self.ws = websocket
        self.scope = scope
        state = websocket.app.state
        self.settings: Settings = state.settings
        self.db: Database = state.db
        self.realtime: Realtime = state.realtime
        # The caller as two ids, not a Principal: its ORM user would stay alive with the
        # socket (§11, memory per idle socket) and go stale; each op loads it afresh.
        self.user_id: uuid.UUID | None = None
        self.session_id: uuid.UUID | None = None
        self.conn: Connection | None = None
        self._write_frame: Callable[[bytes], bool] | None = None
        self.bucket = TokenBucket(OP_RATE, OP_BURST)
        self.rate_limited = self.settings.rate_limits == "on"
        self.strikes = 0.0
        self.struck_at = time.monotonic()

    # -- handshake ----------------------------------------------------------------------

    @property
    def _transport(self) -> str:
        return "ws" if self.scope is None else "ws_conversation"

    async def run(self) -> None:
        conn = await self._open()
        if conn is None:
            return
        transport = self._transport
        try:
            await self._serve()
        except WebSocketDisconnect:
            pass
        finally:
            # Let go of the hub, presence and the connection count first: saying goodbye
            # to a client that does not read may take a while (CLOSE_TIMEOUT).
            await self.realtime.disconnect(conn, transport=transport)
        if conn.closed:
            await self._close(conn.close_code or 1000, conn.close_reason)

    async def _open(self) -> Connection | None:
        """The handshake: the registered connection, or None once the socket is refused.
        The caller's Principal lives only as long as this call."""
        if not origin_allowed(self.ws, self.settings):
            # Refused before accept: the browser sees a 403 (§8).
            await self.ws.close(code=CLOSE_POLICY)
            return None
        await self.ws.accept()
        try:
            principal = await self._authenticate()
        except (Unauthorized, TimeoutError, ValueError) as exc:
            await self._close(CLOSE_UNAUTHORIZED, _reason(exc, "authentication failed"))
            return None
        except WebSocketDisconnect:
            return None
        self.user_id, self.session_id = principal.id, principal.session_id
        if self.scope is not None and not await self._is_member(principal, self.scope):
            # Accepted, then closed: a browser sees a close code but never a handshake
            # status. A conversation that does not exist gets the same answer (§2).
            await self._close(CLOSE_FORBIDDEN, "not a member of this conversation")
            return None
        try:
            self.conn = await self.realtime.connect(
                principal, transport=self._transport, scope=self.scope, hold_scope=True
            )
        except TooManyConnections as exc:
            await self._close(CLOSE_POLICY, exc.detail)
            return None
        except Exception:
            # Redis or the database failed under the handshake: say so, the client retries.
            log.exception("connect_failed")
            await self._close(CLOSE_INTERNAL, "the server could not register the connection")
            return None
        # The handshake's headers (about 1 KiB) are of no further use, and the scope
        # lives as long as the socket.
        self.ws.scope["headers"] = []
        return self.conn

    async def _principal(self, session: AsyncSession) -> Principal:
        """The caller, loaded in the op's own transaction; Unauthorized once the session
        has ended (before the sweep gets to close the socket)."""
        assert self.user_id is not None and self.session_id is not None
        return await access_principal(session, self.user_id, self.session_id)

    async def _authenticate(self) -> Principal:
        # Parsed here rather than through ws.query_params, which the socket would keep.
        params = dict(parse_qsl(self.ws.scope["query_string"].decode("latin-1")))
        principal = await access_principal_by_query(
            self.db, self.settings, ticket=params.get("ticket"), token=params.get("token")
        )
        if principal is not None:
            return principal
        message = await asyncio.wait_for(self.ws.receive(), AUTH_TIMEOUT)
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        try:
            op = AuthOp.model_validate(orjson.loads(message.get("text") or b""))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise Unauthorized('The first frame must be {"op":"auth","token":…}') from exc
        async with self.db.transaction() as session:
            return await access_principal_by_token(session, self.settings, op.token)

    async def _is_member(self, principal: Principal, conversation_id: uuid.UUID) -> bool:
        try:
            async with self.db.transaction(write=False) as session:
                await access_membership(session, principal, conversation_id)
        except ParleyError:
            return False
        return True

    # -- the connection -----------------------------------------------------------------

    async def _serve(self) -> None:
        conn = self.conn
        assert conn is not None and self.user_id is not None
        # Serialized in the call: a ReadyEvent kept as a local would live as long as this
        # frame, that is, as the socket.
        try:
            await self._send_now(
                serialize(
                    ReadyEvent(
                        user_id=self.user_id, connection_id=conn.id, heartbeat=HEARTBEAT_SECONDS
                    )
                )
            )
            if self.scope is not None:
                await self._send_backlog(self.scope)
        except TimeoutError:
            conn.close(CLOSE_TOO_SLOW, "too slow: reconnect and resume")
            return
        except Unauthorized as exc:
            # The session ended between the handshake and the backlog.
            conn.close(CLOSE_UNAUTHORIZED, exc.detail)
            return
        frames = self.ws.scope.get("extensions", {}).get(FRAMES_EXTENSION)
        if frames is not None:
            # From here on (ready and backlog are out) events may skip the queue.
            self._write_frame = frames["write"]
            conn.direct = self._write_direct
        # The writer runs in this task and the reader in one of its own: one task per
        # socket fewer than a task each (memory per idle socket, §11). Whichever half
        # ends first ends the other: a close wakes the writer, and the reader's end
        # (the client left) is passed on to it the same way.
        reader = asyncio.create_task(self._read())
        reader.add_done_callback(lambda _: conn.queue.put_nowait(None))
        try:
            await self._write()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _send_now(self, payload: bytes) -> None:
        """Write one frame before the writer runs (ready, backlog), bounded in time."""
        async with asyncio.timeout(WRITE_STALL):
            await self.ws.send_text(payload.decode())

    async def _send_backlog(self, conversation_id: uuid.UUID) -> None:
        conn = self.conn
        assert conn is not None
        try:
            rows, more, stood_at = await self.realtime.backlog(conn, conversation_id)
            async with self.db.transaction(write=False) as session:
                views = await messages.build_views(session, await self._principal(session), rows)
                marker = await session.scalar(
                    select(Membership.last_read_seq).where(
                        Membership.conversation_id == conversation_id,
                        Membership.user_id == conn.user_id,
                    )
                )
            if more and rows:
                # What is unread but not in the backlog: from the read marker up to the
                # first message sent (the client pages it with `before`).
                to_seq = rows[0].seq - 1
                from_seq = min((marker or 0) + 1, to_seq)
                await self._send_now(gap_payload(conversation_id, from_seq, to_seq))
            backlog = BacklogEvent(conversation_id=conversation_id, messages=views)
            await self._send_now(serialize(backlog))
            if rows:
                self.realtime.hub.mark_delivered(conn, conversation_id, rows[-1].seq)
            conn.floor(conversation_id, stood_at)
        finally:
            conn.release(conversation_id)

    def _write_direct(self, frame: Frame) -> bool:
        """Write a frame to the socket at once if it takes it (parley.ops.wsproto)."""
        wire = frame.wire
        if wire is None:
            wire = frame.wire = encode_text_frame(frame.payload)
        assert self._write_frame is not None
        if not self._write_frame(wire):
            return False
        if frame.type == "message.created" and frame.conversation_id and frame.seq:
            assert self.conn is not None
            self.realtime.hub.mark_delivered(self.conn, frame.conversation_id, frame.seq)
        return True

    async def _write(self) -> None:
        conn = self.conn
        assert conn is not None
        hub = self.realtime.hub
        queue = conn.queue
        send = self.ws.send_text
        direct = conn.direct
        conn.writer = asyncio.current_task()
        while True:
            frame = queue.get_nowait() if not queue.empty() else await queue.get()
            if frame is None:
                return
            if direct is not None and direct(frame):
                continue
            # The hub's sweep (and a queue overflow) close a writer blocked here too long.
            conn.writing_since = time.monotonic()
            try:
                await send(frame.data)
            except asyncio.CancelledError:
                # Connection.close() cancels a writer stuck on a socket that takes
                # nothing; the connection then ends as any closed one does.
                task = asyncio.current_task()
                if conn.closed and task is not None:
                    task.uncancel()
                    return
                raise
            conn.writing_since = None
            if frame.type == "message.created" and frame.conversation_id and frame.seq:
                hub.mark_delivered(conn, frame.conversation_id, frame.seq)

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self._handle(message.get("text"))
            if self.conn is not None and self.conn.closed:
                return

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            # Bounded: the close frame waits behind whatever the client has not read.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.ws.close(code=code, reason=reason[:120])

    # -- ops ----------------------------------------------------------------------------

    async def _handle(self, text: str | None) -> None:
        """One frame from the client: `text` is None for a binary frame."""
        raw: Any = None
        if text is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                raw = orjson.loads(text)
        ref: Any = raw.get("ref") if isinstance(raw, dict) else None
        if not isinstance(ref, str | int) or isinstance(ref, bool):
            ref = None
        # Every frame counts, malformed ones too: a flood of junk is still a flood.
        if not self._admit(ref):
            return
        if text is None:
            self._error(None, "bad_request", "Frames are JSON text")
            return
        if not (isinstance(raw, dict) and "op" in raw):
            if self.scope is not None:
                # The one-conversation socket takes plain text as a message (§8).
                raw = {"op": "send", "content": text}
            else:
                self._error(ref, "bad_request", 'Expected a JSON object with an "op"')
                return
        try:
            op = client_op_adapter.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            self._error(ref, "validation_error", f"{where}: {first['msg']}")
            return
        try:
            await self._dispatch(op)
        except RateLimited as exc:
            self._error(ref, exc.code, exc.detail, retry_after=exc.retry_after)
        except ParleyError as exc:
            self._error(ref, exc.code, exc.detail)
        except Exception:
            log.exception("op_failed", op=raw.get("op"))
            self._error(ref, "internal_error", "The op failed; nothing was changed")

    def _admit(self, ref: Any) -> bool:
        """Take a token for one frame; refuse it (`rate_limited`) or, for a client that
        keeps on, close the connection (1008)."""
        if not self.rate_limited:
            return True
        wait = self.bucket.take()
        if not wait:
            return True
        now = time.monotonic()
        forgiven = (now - self.struck_at) * STRIKE_DECAY
        self.strikes = max(0.0, self.strikes - forgiven) + 1
        self.struck_at = now
        if self.strikes >= MAX_STRIKES:
            if self.conn is not None:
                self.conn.close(CLOSE_POLICY, "rate limit exceeded")
            return False
        # Rounded up: a client that waits retry_after finds a token.
        retry_after = math.ceil(wait * 1000) / 1000
        self._error(ref, "rate_limited", "Too many ops; slow down", retry_after=retry_after)
        return False

    def _error(self, ref: Any, code: str, detail: str, *, retry_after: float | None = None) -> None:
        if self.conn is not None:
            event = ErrorEvent(ref=ref, code=code, detail=detail, retry_after=retry_after)
            self.conn.send(serialize(event))

    def _conversation(self, given: uuid.UUID | None) -> uuid.UUID:
        conversation_id = given or self.scope
        if conversation_id is None:
            raise OpError("conversation_id is required")
        if self.scope is not None and conversation_id != self.scope:
            raise OpError("This socket is for one conversation only")
        return conversation_id

    async def _dispatch(self, op: object) -> None:
        conn = self.conn
        assert conn is not None and self.user_id is not None and self.session_id is not None
        if isinstance(op, PingOp):
            conn.send(serialize(PongEvent(ref=op.ref)))
        elif isinstance(op, SendOp):
            conversation_id = self._conversation(op.conversation_id)
            # The same per-user send limit as REST (§10): both count against one budget.
            limiter = self.ws.app.state.rate_limiter
            await limiter.check(limiter.send, "send", self.user_id.hex)
            data = MessageCreate(
                content=op.content,
                client_msg_id=op.client_msg_id,
                reply_to_id=op.reply_to_id,
                attachment_ids=op.attachment_ids,
            )
            # The send statement checks the session itself: no Principal to load.
            view, _ = await messages.do_send(
                self.db, self.settings, self.user_id, self.session_id, conversation_id, data
            )
            conn.send(serialize(AckEvent(ref=op.ref, message=view)))
        elif isinstance(op, EditOp):
            async with self.db.transaction() as session:
                principal = await self._principal(session)
                await self._check_scope(session, principal, op.message_id)
                message = await messages.do_edit_message(
                    session, self.settings, principal, op.message_id, op.content
                )
                view = (await messages.build_views(session, principal, [message]))[0]
            conn.send(serialize(AckEvent(ref=op.ref, message=view)))
        elif isinstance(op, DeleteOp):
            async with self.db.transaction() as session:
                principal = await self._principal(session)
                await self._check_scope(session, principal, op.message_id)
                message = await messages.do_delete_message(session, principal, op.message_id)
                view = (await messages.build_views(session, principal, [message]))[0]
            conn.send(serialize(AckEvent(ref=op.ref, message=view)))
        elif isinstance(op, TypingOp):
            conversation_id = self._conversation(op.conversation_id)
            async with self.db.transaction(write=False) as session:
                principal = await self._principal(session)
                await self.realtime.set_typing(session, principal, conversation_id, op.is_typing)
        elif isinstance(op, ReadOp):
            conversation_id = self._conversation(op.conversation_id)
            async with self.db.transaction() as session:
                principal = await self._principal(session)
                await messages.do_mark_read(session, principal, conversation_id, op.seq)
        elif isinstance(op, HistoryOp):
            conversation_id = self._conversation(op.conversation_id)
            async with self.db.transaction(write=False) as session:
                page = await messages.list_history(
                    session,
                    await self._principal(session),
                    conversation_id,
                    before=op.before,
                    after=op.after,
                    changed_after=None,
                    limit=op.limit,
                )
            reply = HistoryEvent(
                ref=op.ref,
                conversation_id=conversation_id,
                messages=page.messages,
                has_more=page.has_more,
            )
            conn.send(serialize(reply))
        elif isinstance(op, ResumeOp):
            await self.realtime.resume(conn, dict(op.cursors), op.ref)
        elif isinstance(op, AuthOp):
            raise OpError("Already authenticated")

    async def _check_scope(
        self, session: AsyncSession, principal: Principal, message_id: uuid.UUID
    ) -> None:
        if self.scope is None:
            return
        message, _ = await messages.access_message(session, principal, message_id)
        if message.conversation_id != self.scope:
            raise OpError("This socket is for one conversation only")


def _reason(exc: BaseException, fallback: str) -> str:
    if isinstance(exc, ParleyError):
        return exc.detail
    if isinstance(exc, TimeoutError):
        return "no auth frame within 5 s"
    return fallback
