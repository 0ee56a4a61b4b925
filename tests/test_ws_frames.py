"""Fan-out frames written straight to the socket (parley.ops.wsproto) and the ordinary
ASGI path beside it: same events, same order, nothing overtakes what is queued."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode
from websockets.streams import StreamReader

from parley.ops.wsproto import ParleyWebSocketProtocol, encode_text_frame
from parley.realtime.connection import Connection, Frame
from tests.conftest import LiveFactory, User


class Socket:
    """A stand-in for the frames extension: takes frames while `open`."""

    def __init__(self) -> None:
        self.open = True
        self.written: list[int] = []

    def write(self, frame: Frame) -> bool:
        if not self.open:
            return False
        assert frame.seq is not None
        self.written.append(frame.seq)
        return True


def event(conversation_id: uuid.UUID, seq: int) -> Frame:
    return Frame(b'{"type":"message.created"}', conversation_id, seq, "message.created")


def test_a_frame_goes_straight_out_only_behind_an_empty_queue() -> None:
    conversation_id = uuid.uuid4()
    conn = Connection(id="c", user_id=uuid.uuid4(), session_id=uuid.uuid4())
    socket = Socket()
    conn.direct = socket.write

    conn.deliver_frame(event(conversation_id, 1))
    assert socket.written == [1]
    assert conn.queue.empty()

    # The socket pushes back: the frame waits in the queue, and so does every later one
    # even once the socket could take it again, or it would overtake.
    socket.open = False
    conn.deliver_frame(event(conversation_id, 2))
    socket.open = True
    conn.deliver_frame(event(conversation_id, 3))
    assert socket.written == [1]
    assert [conn.queue.get_nowait().seq for _ in range(2)] == [2, 3]  # type: ignore[union-attr]

    # Drained: straight out again.
    conn.deliver_frame(event(conversation_id, 4))
    assert socket.written == [1, 4]

    # A writer busy with a frame (waiting for the socket) keeps the shortcut shut too.
    conn.writing_since = 1.0
    conn.deliver_frame(event(conversation_id, 5))
    assert socket.written == [1, 4]
    assert conn.queue.get_nowait().seq == 5  # type: ignore[union-attr]


def test_the_encoded_frame_is_what_a_client_reads() -> None:
    for size in (0, 125, 126, 65_535, 65_536, 70_000):
        payload = ("é" * (size // 2)).encode()
        reader = StreamReader()
        reader.feed_data(encode_text_frame(payload))
        parser = WireFrame.parse(reader.read_exact, mask=False)
        with pytest.raises(StopIteration) as done:
            next(parser)
        frame = done.value.value
        assert frame.opcode is Opcode.TEXT
        assert frame.fin
        assert frame.data == payload


@pytest.mark.parametrize("protocol", [ParleyWebSocketProtocol, "websockets-sansio"])
async def test_fan_out_is_complete_and_in_order_with_or_without_the_shortcut(
    app: FastAPI,
    live_factory: LiveFactory,
    alice: User,
    bob: User,
    room: dict[str, Any],
    protocol: Any,
) -> None:
    live = await live_factory(app, ws=protocol)
    sender = await live.connect(alice)
    listeners = [await live.connect(bob) for _ in range(3)]
    await sender.ready()
    for ws in listeners:
        await ws.ready()

    sent = 40
    for i in range(sent):
        await sender.send(op="send", conversation_id=room["id"], content=f"m{i}")
    for ws in listeners:
        seqs = []
        while len(seqs) < sent:
            event, _ = await ws.until("message.created")
            seqs.append(event["seq"])
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == sent
        assert await ws.quiet() == []

    for _ in range(sent):
        await sender.until("ack")  # a client that reads nothing would stall the close
    # The shortcut is in use exactly when the server offers it.
    hub = app.state.realtime.hub
    bobs = [c for c in hub.connections.values() if c.user_id == uuid.UUID(bob.id)]
    assert len(bobs) == 3
    expect_direct = protocol is ParleyWebSocketProtocol
    assert all((c.direct is not None) is expect_direct for c in bobs)
    for ws in [sender, *listeners]:
        await ws.close()


async def test_frames_of_one_loop_turn_go_out_together_in_order_and_before_a_close(
    app: FastAPI, live_factory: LiveFactory, bob: User
) -> None:
    live = await live_factory(app)
    ws = await live.connect(bob)
    await ws.ready()
    hub = app.state.realtime.hub
    (conn,) = [c for c in hub.connections.values() if c.user_id == uuid.UUID(bob.id)]
    assert conn.direct is not None

    # Taken in one turn of the loop (no await in between), then a close asking for the
    # frames to go first: all arrive, in order, and then the close.
    for i in range(4):
        conn.send(orjson.dumps({"type": "probe", "n": i}))
    # A frame sent through ASGI in the same turn (how a queued frame or a close goes
    # out) follows them.
    gateway = conn.direct.__self__  # type: ignore[attr-defined]
    await gateway.ws.send_text(orjson.dumps({"type": "probe", "n": 4}).decode())
    conn.send(orjson.dumps({"type": "probe", "n": 5}))
    conn.close(4003, "no longer a member of this conversation", flush=True)
    got = [(await ws.recv())["n"] for _ in range(6)]
    assert got == [0, 1, 2, 3, 4, 5]
    assert await ws.closed_with() == 4003
