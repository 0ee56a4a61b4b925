"""uvicorn's WebSocket protocol, made cheaper for fan-out and for idle sockets.

Fan-out sends the same event to every member's socket. Through ASGI each delivery wakes
the connection's writer task, passes `websocket.send` down the middleware stack, encodes
the text again and frames it again: about 40 µs of CPU per socket. A server frame is not
masked, and Parley turns per-message compression off, so one event's frame is the same
bytes for every socket: the hub serializes it once, and one ASGI extension
(`FRAMES_EXTENSION` in the scope) hands those bytes to each socket's transport, the way
a bare broadcast server does. Frames a socket takes in one turn of the event loop are
written together at the end of that turn (_Coalescer).

The extension only ever takes a frame when the socket could take it without waiting:
handshake done, connection open, nothing of ours queued before it, and the transport
not pushing back (uvicorn's `writable`). Otherwise it answers False and the caller falls
back to the ordinary ASGI send, which waits for room. An ASGI server without the
extension gets the ordinary path everywhere.

For idle sockets (§11: at most 20 KiB each) the protocol also keeps less: slotted
stand-ins for uvicorn's per-socket queue and event, and no handshake once accepted.

This subclass relies on attributes of uvicorn's `websockets-sansio` protocol (hence the
uvicorn >= 0.35 pin); tests/test_ws_frames.py fails if the shortcut stops being used.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, State

FRAMES_EXTENSION = "parley.websocket.frames"


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, uncompressed, final text frame: what a server sends, byte for byte."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


async def _wait(waiters: list[asyncio.Future[None]]) -> None:
    """Wait to be woken through `waiters` (a list: no deque per socket)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        waiters.remove(waiter)


class _Inbox:
    """The part of asyncio.Queue the protocol uses (put_nowait, get, empty).

    asyncio.Queue keeps three deques, 2.3 KiB per socket for a queue that nearly always
    holds nothing: uvicorn stops reading the socket while a message waits in it."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self) -> Any:
        while not self._items:
            await _wait(self._waiters)
        return self._items.pop(0)


class _Flag:
    """The part of asyncio.Event the protocol uses, without a deque per socket."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            await _wait(self._waiters)
        return True


class ParleyWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets-sansio` protocol with the frames extension in its scope,
    and lighter stand-ins for its per-socket queue and event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        # Frames taken by write_frame in this turn of the event loop, written together
        # at its end (_Coalescer).
        self.pending: list[bytes] | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code != 101:
            return  # refused: no scope, no frames to come
        # A negotiated extension (compression) would change the bytes of a frame, so
        # such a socket gets no shortcut.
        if not self.conn.extensions:
            self.scope["extensions"][FRAMES_EXTENSION] = {"write": self.write_frame}
        if not self.conn.reader.buffer:
            # The handshake request stays alive as a local of the handshake parser
            # (ServerProtocol.parse goes on to parse frames in the same generator): about
            # 2.5 KiB of headers for the socket's whole life. A client sends nothing
            # before the 101 (RFC 6455 §4.1), so the parser waits at the start of a
            # frame; a fresh frame parser is the same state without the request.
            parser = Protocol.parse(self.conn)
            next(parser)
            self.conn.parser = parser

    async def send(self, message: Any) -> None:
        # Whatever goes out through ASGI (a queued frame, a close) follows the frames
        # already taken.
        self.flush()
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # The parsed handshake (request and response headers) is of no further use,
            # and would otherwise stay alive as long as the socket (~2 KiB).
            self.request = self.response = None  # type: ignore[assignment]

    def write_frame(self, frame: bytes) -> bool:
        """Write an encoded frame if the socket takes it at once; whether it did."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        pending = self.pending
        if pending is None:
            self.pending = [frame]
            _COALESCER.add(self)
        else:
            pending.append(frame)
        return True

    def flush(self) -> None:
        """Write the frames taken in this turn of the loop, in one write."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        # A socket closed meanwhile takes nothing more, like a kernel buffer at a reset.
        if self.conn.state is State.OPEN and not self.transport.is_closing():
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))


class _Coalescer:
    """Writes every socket's frames of one event-loop turn at the end of that turn.

    Under load the hub routes several events in one turn (the broker hands over what it
    has read), and each was a write system call per socket, the largest cost of a
    delivery. Written together, a socket costs one call per turn, however many events it
    got. The delay is one turn of the loop."""

    __slots__ = ("_dirty", "_scheduled_on")

    def __init__(self) -> None:
        self._dirty: list[ParleyWebSocketProtocol] = []
        # The loop a flush is scheduled on. A loop that was closed before running it
        # (tests run one loop after another) must not keep the next one from flushing.
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def add(self, protocol: ParleyWebSocketProtocol) -> None:
        self._dirty.append(protocol)
        if self._scheduled_on is not protocol.loop:
            self._scheduled_on = protocol.loop
            protocol.loop.call_soon(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled_on = None
        for protocol in dirty:
            protocol.flush()


_COALESCER = _Coalescer()
