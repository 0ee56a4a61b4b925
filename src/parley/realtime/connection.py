"""One live stream to one client (a WebSocket or an SSE response), transport-free.

The hub pushes events; the transport pulls frames. The queue between them is bounded:
a client that stops reading is closed with 4008 instead of holding up anyone else (§9.6).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from parley.ops.metrics import QUEUE_DROPS

# §9.6: how far a connection may fall behind before it is cut off (PARLEY_WS_SEND_QUEUE,
# default 512: a few seconds of a busy room). A client this far behind reconnects and
# resumes from the database instead.
SEND_QUEUE_LIMIT = 512

# A replay (resume) fills the queue only while the client keeps reading: it waits for
# room every so often and gives up on a client that reads nothing for this long.
REPLAY_POLL = 0.005
# §9.6: a client that does not take a frame for this long is too slow (4008), even
# while its queue has room: it bounds how long a writer waits on a socket never read.
WRITE_STALL = 10.0
REPLAY_STALL = 30.0

CLOSE_NORMAL = 1000
CLOSE_RESTART = 1012
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TOO_BIG = 1009
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_TOO_SLOW = 4008


@dataclass(slots=True)
class Frame:
    payload: bytes
    conversation_id: uuid.UUID | None = None
    seq: int | None = None
    type: str | None = None
    # The payload as text, decoded once by the hub and shared by every connection the
    # event goes to (WebSocket text frames and SSE data are str).
    text: str | None = None
    # The payload as an encoded WebSocket frame, likewise built once and shared
    # (parley.ops.wsproto).
    wire: bytes | None = None

    @property
    def data(self) -> str:
        return self.text if self.text is not None else self.payload.decode()


class FrameQueue:
    """A bounded FIFO with one consumer, much cheaper than asyncio.Queue on the fan-out
    path (no unfinished-task bookkeeping, at most one waiter to wake).

    Its deque (760 bytes even when empty) is made on first use: most connections never
    queue a frame, because their socket takes every frame at once (Connection.direct)."""

    __slots__ = ("_items", "_waiter", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Frame | None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return self.qsize() >= self.maxsize

    def put_nowait(self, item: Frame | None) -> None:
        items = self._items
        if items is None:
            items = self._items = deque()
        if item is not None and len(items) >= self.maxsize:
            raise asyncio.QueueFull
        items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> Frame | None:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Frame | None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


@dataclass(eq=False, slots=True)
class Connection:
    id: str
    user_id: uuid.UUID
    session_id: uuid.UUID
    # Set for the one-conversation WebSocket and the one-conversation SSE stream.
    scope: uuid.UUID | None = None
    queue_limit: int = SEND_QUEUE_LIMIT
    queue: FrameQueue = field(init=False)
    # The highest seq handed over per conversation: nothing is sent twice or backwards.
    # Only conversations with traffic since connecting get an entry.
    sent: dict[uuid.UUID, int] = field(default_factory=dict)
    # The first seq delivered live per conversation: from there up to `sent` the
    # connection has every event, so a resume only has to bring what lies outside.
    first_live: dict[uuid.UUID, int] = field(default_factory=dict)
    # Conversations being resumed: live events wait here until the replay is out.
    held: dict[uuid.UUID, list[Frame]] = field(default_factory=dict)
    close_code: int | None = None
    close_reason: str = ""
    # The transport's writer, and since when it has been blocked writing one frame: a
    # close cancels a blocked writer (the socket will not take the goodbye frames
    # anyway), and the hub's sweep closes one blocked too long (§9.6).
    writer: asyncio.Task[None] | None = None
    writing_since: float | None = None
    # Set by a transport that can write a frame at once when the socket takes it
    # (parley.ops.wsproto): then a frame skips the queue and the writer task, unless
    # frames wait there already (they go first). Answers whether it wrote.
    direct: Callable[[Frame], bool] | None = None

    def __post_init__(self) -> None:
        self.queue = FrameQueue(self.queue_limit)

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def deliver(
        self,
        conversation_id: uuid.UUID,
        seq: int,
        payload: bytes,
        type_: str,
        text: str | None = None,
    ) -> None:
        """A sequenced event: in order, at most once."""
        self.deliver_frame(Frame(payload, conversation_id, seq, type_, text))

    def deliver_frame(self, frame: Frame) -> None:
        """deliver() for a frame built once and shared by every connection it goes to."""
        if self.closed:
            return
        conversation_id, seq = frame.conversation_id, frame.seq
        assert conversation_id is not None and seq is not None
        held = self.held.get(conversation_id)
        if held is not None:
            held.append(frame)
            return
        if seq <= self.sent.get(conversation_id, 0):
            return
        self.sent[conversation_id] = seq
        self.first_live.setdefault(conversation_id, seq)
        self._put(frame)

    def replay(self, conversation_id: uuid.UUID, seq: int, payload: bytes, type_: str) -> None:
        """A sequenced event loaded for this connection's resume (passes the hold).

        Skips what the connection already got live; below that it may fill in events
        older than ones already sent, which is what a resume is for."""
        if self.closed:
            return
        first = self.first_live.get(conversation_id)
        last = self.sent.get(conversation_id, 0)
        if first is not None and first <= seq <= last:
            return
        if first is None and seq <= last:
            return
        self.sent[conversation_id] = max(seq, last)
        self._put(Frame(payload, conversation_id, seq, type_))

    async def make_room(self) -> None:
        """Wait until the queue is at most half full (a replay must not overflow it).

        A client that reads nothing for REPLAY_STALL seconds is closed as too slow."""
        waited = 0.0
        while not self.closed and self.queue.qsize() >= self.queue_limit // 2:
            if waited >= REPLAY_STALL:
                self.close(CLOSE_TOO_SLOW, "too slow: reconnect and resume")
                return
            await asyncio.sleep(REPLAY_POLL)
            waited += REPLAY_POLL

    def send(self, payload: bytes, text: str | None = None) -> None:
        """An ephemeral event or a reply."""
        if not self.closed:
            self._put(Frame(payload, text=text))

    def send_frame(self, frame: Frame) -> None:
        """send() for an ephemeral frame built once and shared by several connections."""
        if not self.closed:
            self._put(frame)

    def floor(self, conversation_id: uuid.UUID, seq: int) -> None:
        """Nothing at or below `seq` of this conversation is to be sent."""
        if seq > self.sent.get(conversation_id, 0):
            self.sent[conversation_id] = seq

    def hold(self, conversation_id: uuid.UUID) -> None:
        self.held.setdefault(conversation_id, [])

    def release(self, conversation_id: uuid.UUID) -> None:
        """End a replay: deliver what arrived live meanwhile, minus what the replay sent."""
        for frame in self.held.pop(conversation_id, []):
            self.deliver_frame(frame)

    def close(self, code: int, reason: str = "", *, flush: bool = False) -> None:
        """Ask the transport to close. Queued frames are dropped, unless `flush`: then
        they go out first (the event that explains the close), room permitting."""
        if self.closed:
            return
        self.close_code = code
        self.close_reason = reason
        if not flush or self.queue.full():
            while not self.queue.empty():
                self.queue.get_nowait()
        self.queue.put_nowait(None)
        if self.writing_since is not None and self.writer is not None and not flush:
            self.writer.cancel()

    def _put(self, frame: Frame) -> None:
        direct = self.direct
        if (
            direct is not None
            and self.writing_since is None
            and self.queue.empty()
            and direct(frame)
        ):
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            QUEUE_DROPS.inc()
            self.close(CLOSE_TOO_SLOW, "too slow: reconnect and resume")
