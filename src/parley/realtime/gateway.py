"""The WebSocket transports (§8): authenticate, parse, clamp, delegate.

Each connection has two halves: this reader, which parses one op at a time and calls
the same services REST uses, and a writer that drains the connection's bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import orjson
import structlog
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.websockets import WebSocketDisconnect, WebSocketState

from parley.auth.service import (
    Principal,
    access_principal_by_ticket,
    access_principal_by_token,
)
from parley.config import API_PREFIX, Settings
from parley.conversations.service import access_membership
from parley.db.session import Database
from parley.errors import ParleyError, Unauthorized
from parley.messages import service as messages
from parley.messages.schemas import MessageCreate
from parley.realtime.connection import (
    CLOSE_POLICY,
    CLOSE_UNAUTHORIZED,
    Connection,
)
from parley.realtime.envelope import serialize
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
from parley.realtime.service import Realtime, TooManyConnections, gap_payload

log = structlog.get_logger("parley.gateway")
router = APIRouter(prefix=API_PREFIX, tags=["realtime"])

HEARTBEAT_SECONDS = 25  # §8: the server pings every 25 s and closes after two misses
AUTH_TIMEOUT = 5.0  # §8: a first-frame `auth` must come within 5 s
# Ops per connection: a steady 20/s with bursts of 40. Past that an op is refused with
# `rate_limited`; a client that keeps on through this many refusals in a row is closed.
OP_RATE = 20.0
OP_BURST = 40.0
MAX_STRIKES = 50


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


def allowed_origins(websocket: WebSocket, settings: Settings) -> set[str]:
    origins = set(settings.ws_allowed_origins or settings.cors_origins)
    host = websocket.headers.get("host")
    if host and settings.ws_allowed_origins is None:
        # The server's own origin (its web page), under either scheme.
        origins |= {f"http://{host}", f"https://{host}"}
    return origins


@router.websocket("/ws")
async def websocket_all(websocket: WebSocket) -> None:
    await Gateway(websocket, scope=None).run()


@router.websocket("/ws/conversations/{conversation_id}")
async def websocket_one(websocket: WebSocket, conversation_id: uuid.UUID) -> None:
    await Gateway(websocket, scope=conversation_id).run()


class Gateway:
    def __init__(self, websocket: WebSocket, *, scope: uuid.UUID | None) -> None:
        self.ws = websocket
        self.scope = scope
        state = websocket.app.state
        self.settings: Settings = state.settings
        self.db: Database = state.db
        self.realtime: Realtime = state.realtime
        self.principal: Principal | None = None
        self.conn: Connection | None = None
        self.bucket = TokenBucket(OP_RATE, OP_BURST)
        self.strikes = 0

    # -- handshake ----------------------------------------------------------------------

    async def run(self) -> None:
        origin = self.ws.headers.get("origin")
        if origin is not None and origin not in allowed_origins(self.ws, self.settings):
            # Refused before accept: the browser sees a 403 (§8).
            await self.ws.close(code=CLOSE_POLICY)
            return
        await self.ws.accept()
        try:
            self.principal = await self._authenticate()
        except (Unauthorized, TimeoutError, ValueError) as exc:
            await self._close(CLOSE_UNAUTHORIZED, _reason(exc, "authentication failed"))
            return
        except WebSocketDisconnect:
            return
        if self.scope is not None and not await self._is_member(self.scope):
            await self._close(4003, "not a member of this conversation")
            return
        transport = "ws" if self.scope is None else "ws_conversation"
        try:
            self.conn = await self.realtime.connect(
                self.principal, transport=transport, scope=self.scope
            )
        except TooManyConnections as exc:
            await self._close(CLOSE_POLICY, exc.detail)
            return
        try:
            await self._serve()
        finally:
            await self.realtime.disconnect(self.conn, transport=transport)

    async def _authenticate(self) -> Principal:
        params = self.ws.query_params
        async with self.db.transaction() as session:
            if params.get("ticket"):
                return await access_principal_by_ticket(session, params["ticket"])
            if params.get("token"):
                return await access_principal_by_token(session, self.settings, params["token"])
        text = await asyncio.wait_for(self.ws.receive_text(), AUTH_TIMEOUT)
        try:
            op = AuthOp.model_validate(orjson.loads(text))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise Unauthorized('The first frame must be {"op":"auth","token":…}') from exc
        async with self.db.transaction() as session:
            return await access_principal_by_token(session, self.settings, op.token)

    async def _is_member(self, conversation_id: uuid.UUID) -> bool:
        assert self.principal is not None
        try:
            async with self.db.transaction(write=False) as session:
                await access_membership(session, self.principal, conversation_id)
        except ParleyError:
            return False
        return True

    # -- the connection -----------------------------------------------------------------

    async def _serve(self) -> None:
        conn = self.conn
        assert conn is not None and self.principal is not None
        if self.scope is not None:
            conn.hold(self.scope)
        await self.ws.send_text(
            serialize(
                ReadyEvent(
                    user_id=self.principal.id, connection_id=conn.id, heartbeat=HEARTBEAT_SECONDS
                )
            ).decode()
        )
        if self.scope is not None:
            await self._send_backlog(self.scope)
        writer = asyncio.create_task(self._write())
        reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if conn.closed:
            await self._close(conn.close_code or 1000, conn.close_reason)

    async def _send_backlog(self, conversation_id: uuid.UUID) -> None:
        conn = self.conn
        assert conn is not None and self.principal is not None
        try:
            rows, more, stood_at = await self.realtime.backlog(conn, conversation_id)
            if more:
                first = rows[0].seq if rows else stood_at + 1
                await self.ws.send_text(gap_payload(conversation_id, 1, first - 1).decode())
            async with self.db.transaction(write=False) as session:
                views = await messages.build_views(session, self.principal, rows)
            backlog = BacklogEvent(conversation_id=conversation_id, messages=views)
            await self.ws.send_text(serialize(backlog).decode())
            conn.floor(conversation_id, stood_at)
        finally:
            conn.release(conversation_id)

    async def _write(self) -> None:
        conn = self.conn
        assert conn is not None
        hub = self.realtime.hub
        while True:
            frame = await conn.queue.get()
            if frame is None:
                return
            await self.ws.send_text(frame.payload.decode())
            if frame.type == "message.created" and frame.conversation_id and frame.seq:
                hub.mark_delivered(conn, frame.conversation_id, frame.seq)

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._error(None, "bad_request", "Frames are JSON text")
                continue
            await self._handle(text)
            if self.conn is not None and self.conn.closed:
                return

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason[:120])

    # -- ops ----------------------------------------------------------------------------

    async def _handle(self, text: str) -> None:
        ref: Any = None
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError:
            raw = None
        if not (isinstance(raw, dict) and "op" in raw):
            if self.scope is not None:
                # The one-conversation socket takes plain text as a message (§8).
                raw = {"op": "send", "content": text}
            else:
                self._error(None, "bad_request", 'Expected a JSON object with an "op"')
                return
        ref = raw.get("ref")
        if not isinstance(ref, str | int) or isinstance(ref, bool):
            ref = None
        wait = self.bucket.take()
        if wait:
            self.strikes += 1
            if self.strikes >= MAX_STRIKES and self.conn is not None:
                self.conn.close(CLOSE_POLICY, "rate limit exceeded")
                return
            self._error(ref, "rate_limited", "Too many ops; slow down", retry_after=round(wait, 3))
            return
        self.strikes = 0
        try:
            op = client_op_adapter.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            self._error(ref, "validation_error", f"{where}: {first['msg']}")
            return
        try:
            await self._dispatch(op)
        except ParleyError as exc:
            self._error(ref, exc.code, exc.detail)
        except Exception:
            log.exception("op_failed", op=raw.get("op"))
            self._error(ref, "internal_error", "The op failed; nothing was changed")

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
        principal, conn = self.principal, self.conn
        assert principal is not None and conn is not None
        if isinstance(op, PingOp):
            conn.send(serialize(PongEvent(ref=op.ref)))
        elif isinstance(op, SendOp):
            conversation_id = self._conversation(op.conversation_id)
            data = MessageCreate(
                content=op.content,
                client_msg_id=op.client_msg_id,
                reply_to_id=op.reply_to_id,
                attachment_ids=op.attachment_ids,
            )
            async with self.db.transaction() as session:
                message, _ = await messages.do_send_message(
                    session, self.settings, principal, conversation_id, data
                )
                view = (await messages.build_views(session, principal, [message]))[0]
            conn.send(serialize(AckEvent(ref=op.ref, message=view)))
        elif isinstance(op, EditOp):
            async with self.db.transaction() as session:
                await self._check_scope(session, op.message_id)
                message = await messages.do_edit_message(
                    session, self.settings, principal, op.message_id, op.content
                )
                view = (await messages.build_views(session, principal, [message]))[0]
            conn.send(serialize(AckEvent(ref=op.ref, message=view)))
        elif isinstance(op, DeleteOp):
            async with self.db.transaction() as session:
                await self._check_scope(session, op.message_id)
                message = await messages.do_delete_message(session, principal, op.message_id)
                view = (await messages.build_views(session, principal, [message]))[0]
            conn.send(serialize(AckEvent(ref=op.ref, message=view)))
        elif isinstance(op, TypingOp):
            conversation_id = self._conversation(op.conversation_id)
            async with self.db.transaction(write=False) as session:
                await self.realtime.set_typing(session, principal, conversation_id, op.is_typing)
        elif isinstance(op, ReadOp):
            conversation_id = self._conversation(op.conversation_id)
            async with self.db.transaction() as session:
                await messages.do_mark_read(session, principal, conversation_id, op.seq)
        elif isinstance(op, HistoryOp):
            conversation_id = self._conversation(op.conversation_id)
            async with self.db.transaction(write=False) as session:
                page = await messages.list_history(
                    session,
                    principal,
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

    async def _check_scope(self, session: AsyncSession, message_id: uuid.UUID) -> None:
        if self.scope is None:
            return
        assert self.principal is not None
        message, _ = await messages.access_message(session, self.principal, message_id)
        if message.conversation_id != self.scope:
            raise OpError("This socket is for one conversation only")


def _reason(exc: BaseException, fallback: str) -> str:
    if isinstance(exc, ParleyError):
        return exc.detail
    if isinstance(exc, TimeoutError):
        return "no auth frame within 5 s"
    return fallback
