"""A WebSocket load generator that stays cheap on 2 cores.

A general-purpose client library would spend more CPU per received frame than the
server spends per sent frame, and the benchmark would measure itself. So each client
here is a bare `asyncio.Protocol` (on uvloop) that speaks just enough RFC 6455: the
upgrade handshake, unmasked server frames in, masked frames out, ping → pong, close.

Processes (multiprocessing, spawn), each driven by the coordinator over a pipe:

- **receivers** (several): hold a share of the room members' connections. For every
  message of the current step a client records the sender's counter `n`, the server's
  `seq` (Parley) and the end-to-end latency: receive time − the send time the sender put
  into the content.
- **sender** (one): open loop. It sends message i at `start + i / rate` whatever the
  server answers, and stamps that *intended* time into the content, so a sender that
  falls behind shows up as latency rather than hiding it (no coordinated omission).
  Messages go round-robin over its connections.

Content of a message: ``fb|<step>|<n>|<unix time>|``. Against Parley the frame is the
`send` op; the bare broadcast server relays the very same frame, so both sides carry
the same bytes from the sender and the receivers parse them the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import multiprocessing
import os
import re
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import psutil

MARK = re.compile(rb"fb\|(\d+)\|(\d+)\|([0-9.]+)\|")
SEQ = re.compile(rb'"seq":\s*(\d+)')
CREATED = b'"message.created"'


def content(step: int, n: int, sent_at: float) -> str:
    return f"fb|{step}|{n}|{sent_at:.6f}|"


def _frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: FIN, masked (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + payload


class WsClient(asyncio.Protocol):
    """One WebSocket connection. `owner` gets its text frames (`on_text`)."""

    def __init__(
        self, owner: Any, index: int, host: str, port: int, path: str, wait_ready: bool
    ) -> None:
        self.owner = owner
        self.index = index
        self.host, self.port, self.path = host, port, path
        self.wait_ready = wait_ready
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.open = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.fragments: list[bytes] = []
        self._fragment_opcode = 1
        # Receivers defer parsing: the hot path only keeps (receive time, payload), and
        # the frames are read between polls and after the step (`Receivers.parse`).
        self.deferred = False
        self.inbox: list[tuple[float, bytes]] = []
        # The current step: counters of the messages received, and server seqs.
        self.got: list[int] = []
        self.seqs: list[int] = []

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.close_code is None:
            self.close_code = 1006
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({self.close_code})"))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            status = data[9:12]
            if status != b"101":
                if not self.ready.done():
                    self.ready.set_exception(
                        ConnectionError(
                            f"handshake refused: {data[:end].decode(errors='replace')[:200]}"
                        )
                    )
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = self.open = True
            if not self.wait_ready:
                self.ready.set_result(None)
            data = data[end + 4 :]
        now = self.owner.last_frame = time.time()
        pos, size = 0, len(data)
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > size:
                break
            payload = data[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if not b0 & 0x80 or opcode == 0:  # fragmented message
                self.fragments.append(payload)
                if not b0 & 0x80:
                    if opcode:
                        self._fragment_opcode = opcode
                    continue
                payload = b"".join(self.fragments)
                self.fragments = []
                opcode = self._fragment_opcode
            if opcode == 1 or opcode == 2:
                if self.deferred:
                    self.inbox.append((now, payload))
                else:
                    self.owner.on_text(self, payload, now)
            elif opcode == 9:
                self.send_frame(10, payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send_frame(8, payload[:2])
                self.open = False
                assert self.transport is not None
                self.transport.close()
                return
        if pos < size:
            self.buf = data[pos:]

    # -- out ----------------------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(opcode, payload))

    def send_text(self, payload: bytes) -> None:
        self.send_frame(1, payload)

    def close(self) -> None:
        if self.open:
            self.send_frame(8, (1000).to_bytes(2, "big"))
        self.open = False
        if self.transport is not None:
            self.transport.close()


# -- worker processes ---------------------------------------------------------------------


@dataclass
class ClientSpec:
    path: str
    room: int
    conversation_id: str | None = None  # for the sender's `send` ops


@dataclass
class _Base:
    host: str
    port: int
    wait_ready: bool  # Parley: wait for the `ready` event; bare server: the 101 is enough
    specs: list[ClientSpec] = field(default_factory=list)
    clients: list[WsClient | None] = field(default_factory=list)
    last_frame: float = 0.0

    async def connect(self, specs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
        """Add these clients, then (re)connect every client that is not open."""
        for spec in specs:
            self.specs.append(ClientSpec(**spec))
            self.clients.append(None)
        closed_before = Counter(
            str(c.close_code)
            for c in self.clients
            if c is not None and not c.open and c.close_code is not None
        )
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        started = time.monotonic()

        async def one(i: int) -> None:
            client = self.clients[i]
            if client is not None and client.open:
                return
            spec = self.specs[i]
            async with sem:
                for attempt in range(3):
                    try:
                        _, proto = await loop.create_connection(
                            lambda: WsClient(
                                self, i, self.host, self.port, spec.path, self.wait_ready
                            ),
                            self.host,
                            self.port,
                        )
                        self.clients[i] = proto
                        async with asyncio.timeout(30):
                            await proto.ready
                        return
                    except (OSError, TimeoutError) as exc:
                        if attempt == 2:
                            errors.append(f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.2 * (attempt + 1))

        await asyncio.gather(*(one(i) for i in range(len(self.specs))))
        not_open = Counter(
            str(c.close_code if c is not None else "never")
            for c in self.clients
            if c is None or not c.open
        )
        return {
            "open": sum(1 for c in self.clients if c is not None and c.open),
            "not_open": dict(not_open),
            "closed_before": dict(closed_before),
            "failed": len(errors),
            "errors": errors[:5],
            "seconds": time.monotonic() - started,
        }

    def disconnect(self) -> dict[str, Any]:
        for client in self.clients:
            if client is not None:
                client.close()
        self.clients = []
        self.specs = []
        return {"closed": True}

    def on_control(self, client: WsClient, payload: bytes) -> None:
        """A frame that is not a benchmark message (ready, presence, member.joined…)."""
        if not client.ready.done() and b'"ready"' in payload:
            with contextlib.suppress(orjson.JSONDecodeError):
                if orjson.loads(payload).get("type") == "ready":
                    client.ready.set_result(None)

    async def quiet(self, idle: float, deadline: float) -> dict[str, Any]:
        """Wait until no frame has come for `idle` s (a backlog has drained)."""
        while time.time() < deadline and time.time() - self.last_frame < idle:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return {"quiet": time.time() - self.last_frame >= idle}


@dataclass
class Receivers(_Base):
    step: int = -1
    latencies: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    times: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    stale: int = 0
    first_recv: float = 0.0
    last_recv: float = 0.0
    received: int = 0
    foreign: int = 0

    def on_text(self, client: WsClient, payload: bytes, now: float) -> None:
        """Frames before `ready` (and any frame of a client not yet deferring)."""
        client.inbox.append((now, payload))
        if not client.ready.done():
            self.on_control(client, payload)
        if client.ready.done():
            client.deferred = True

    def parse(self) -> None:
        """Read what every client has received since the last call."""
        parley = self.wait_ready
        step = self.step
        latencies = self.latencies
        times = self.times
        for client in self.clients:
            if client is None or not client.inbox:
                continue
            inbox, client.inbox = client.inbox, []
            for now, payload in inbox:
                m = MARK.search(payload)
                if m is None:
                    continue  # ready, presence, member.joined…: not a benchmark message
                if int(m.group(1)) != step:
                    self.stale += 1
                    continue
                if parley:  # a message.created event with the room's seq
                    if CREATED not in payload:
                        self.foreign += 1
                        continue
                    s = SEQ.search(payload)
                    client.seqs.append(int(s.group(1)) if s else -1)
                client.got.append(int(m.group(2)))
                latencies.append(now - float(m.group(3)))
                times.append(now)
                if not self.received or now < self.first_recv:
                    self.first_recv = now
                if now > self.last_recv:
                    self.last_recv = now
                self.received += 1

    def begin(self, step: int) -> dict[str, Any]:
        self.parse()  # whatever came since the last step is stale
        self.step = step
        self.latencies = array("d")
        self.times = array("d")
        self.stale = self.received = self.foreign = 0
        self.first_recv = self.last_recv = 0.0
        for client in self.clients:
            if client is not None:
                client.got = []
                client.seqs = []
        return {"open": sum(1 for c in self.clients if c is not None and c.open)}

    async def collect(
        self, expected: dict[int, list[int]], senders: int, deadline: float
    ) -> dict[str, Any]:
        """Wait until every open client has every expected message (or the deadline),
        then check each client: lost, duplicates, order."""
        need = {room: len(ns) for room, ns in expected.items()}
        while True:
            self.parse()
            if time.time() >= deadline or all(
                c is None or not c.open or len(c.got) >= need.get(self.specs[i].room, 0)
                for i, c in enumerate(self.clients)
            ):
                break
            await asyncio.sleep(0.05)
        lost = duplicates = out_of_order = unexpected = closed = 0
        lost_at_closed = 0
        close_codes: Counter[int] = Counter()
        sets = {room: set(ns) for room, ns in expected.items()}
        for i, client in enumerate(self.clients):
            want = sets.get(self.specs[i].room, set())
            got = client.got if client is not None else []
            unique = set(got)
            duplicates += len(got) - len(unique)
            missing = len(want - unique)
            unexpected += len(unique - want)
            if client is None or not client.open:
                closed += 1
                lost_at_closed += missing
                close_codes[(client.close_code or 0) if client is not None else 0] += 1
            lost += missing
            if self.wait_ready:
                seqs = client.seqs if client is not None else []
                out_of_order += sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
            else:  # the bare server has no seq: each sender connection's order must hold
                last: dict[int, int] = {}
                for n in got:
                    k = n % senders
                    if n <= last.get(k, -1):
                        out_of_order += 1
                    last[k] = n
        return {
            "received": self.received,
            "lost": lost,
            "lost_at_closed": lost_at_closed,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "unexpected": unexpected,
            "closed": closed,
            "close_codes": dict(close_codes),
            "stale": self.stale,
            "foreign": self.foreign,
            "first_recv": self.first_recv,
            "last_recv": self.last_recv,
            "latencies": self.latencies.tobytes(),
            "times": self.times.tobytes(),
        }


@dataclass
class Sender(_Base):
    acked: set[int] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    step: int = -1

    def on_text(self, client: WsClient, payload: bytes, now: float) -> None:
        self.last_frame = now
        # The sender's own connections get every broadcast too: skip those cheaply.
        if b'"type":"ack"' in payload or b'"type":"error"' in payload:
            event = orjson.loads(payload)
            ref = event.get("ref")
            if event.get("type") == "ack" and isinstance(ref, int):
                self.acked.add(ref)
            else:
                self.errors[str(event.get("code"))] += 1
        elif not client.ready.done():
            self.on_control(client, payload)

    async def send(
        self, step: int, rate: float, duration: float, start_at: float, ack_timeout: float
    ) -> dict[str, Any]:
        self.step = step
        self.acked = set()
        self.errors = Counter()
        live = [c for c in self.clients if c is not None and c.open]
        rooms = {c.index: self.specs[c.index].room for c in live}
        total = max(1, round(rate * duration))
        frames = [
            (
                c,
                b'{"op":"send","conversation_id":"%s","ref":'
                % (self.specs[c.index].conversation_id or "").encode(),
            )
            for c in live
        ]
        k = len(frames)
        max_lag = 0.0
        i = 0
        while i < total:
            now = time.time()
            due = start_at + i / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            max_lag = max(max_lag, now - due)
            while i < total:
                due = start_at + i / rate
                if due > now:
                    break
                client, prefix = frames[i % k]
                client.send_text(
                    prefix + b'%d,"content":"%s"}' % (i, content(step, i, due).encode())
                )
                i += 1
        sent_until = time.time()
        if self.wait_ready:  # Parley acks after the commit; wait for them (bounded)
            deadline = sent_until + ack_timeout
            acked = self.acked
            while len(acked) + sum(self.errors.values()) < total and time.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            delivered = sorted(self.acked)
        else:
            delivered = list(range(total))
        by_room: dict[int, list[int]] = {}
        for n in delivered:
            by_room.setdefault(rooms[live[n % k].index], []).append(n)
        return {
            "sent": total,
            "acked": len(self.acked) if self.wait_ready else total,
            "errors": dict(self.errors),
            "expected": by_room,
            "senders": k,
            "max_lag_ms": max_lag * 1000,
            "send_seconds": sent_until - start_at,
            "acks_done": time.time(),
        }


async def _serve(pipe: Any, role: str, host: str, port: int, wait_ready: bool) -> None:
    state: _Base = (Receivers if role == "recv" else Sender)(host, port, wait_ready)
    loop = asyncio.get_running_loop()
    while True:
        # Commands come one at a time: a thread waits on the pipe (the pipe stays
        # blocking, so a large reply is never cut short by EAGAIN).
        try:
            msg = await loop.run_in_executor(None, pipe.recv)
        except (EOFError, OSError):
            msg = None
        if msg is None or msg["cmd"] == "stop":
            state.disconnect()
            await asyncio.sleep(0.1)
            with contextlib.suppress(OSError):
                pipe.send({"stopped": True})
            return
        cmd = msg.pop("cmd")
        try:
            if cmd == "connect":
                reply = await state.connect(**msg)
            elif cmd == "disconnect":
                reply = state.disconnect()
                await asyncio.sleep(0.2)
            elif cmd == "retarget":
                state.host, state.port, state.wait_ready = (
                    msg["host"],
                    msg["port"],
                    msg["wait_ready"],
                )
                reply = {}
            elif cmd == "quiet":
                reply = await state.quiet(**msg)
            elif cmd == "begin":
                assert isinstance(state, Receivers)
                gc.collect()
                reply = state.begin(**msg)
            elif cmd == "collect":
                assert isinstance(state, Receivers)
                reply = await state.collect(**msg)
            elif cmd == "send":
                assert isinstance(state, Sender)
                gc.collect()
                reply = await state.send(**msg)
            else:
                reply = {"error": f"unknown command {cmd}"}
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        pipe.send(reply)


def _worker_main(pipe: Any, role: str, host: str, port: int, wait_ready: bool) -> None:
    import uvloop

    # A collection in a load-generator process stops every client it holds: on the
    # loaded 2-core machine the full ones took 40-150 ms, and showed up as the server's
    # latency at p99. The clients make few reference cycles, so the collector runs only
    # between steps (see "begin" and "send"), where nothing is measured.
    gc.disable()

    uvloop.run(_serve(pipe, role, host, port, wait_ready))


# -- the coordinator's side ---------------------------------------------------------------


class Worker:
    def __init__(self, role: str, host: str, port: int, wait_ready: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.role = role
        self.proc = context.Process(
            target=_worker_main, args=(child, role, host, port, wait_ready), daemon=True
        )
        self.proc.start()
        child.close()
        self.ps = psutil.Process(self.proc.pid)
        self._lock = asyncio.Lock()

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        async with self._lock:
            self.pipe.send({"cmd": cmd, **args})
            reply: dict[str, Any] = await asyncio.to_thread(self.pipe.recv)
        if "error" in reply and isinstance(reply["error"], str):
            raise RuntimeError(f"{self.role} worker: {reply['error']}")
        return reply

    def cpu_seconds(self) -> float:
        with contextlib.suppress(psutil.Error):
            t = self.ps.cpu_times()
            return float(t.user + t.system)
        return 0.0

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.call("stop")
        await asyncio.to_thread(self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.terminate()
            await asyncio.to_thread(self.proc.join, 5)


class WsLoad:
    """`receivers` receiver processes plus one sender process."""

    def __init__(self, host: str, port: int, *, wait_ready: bool, receivers: int = 2) -> None:
        self.receivers = [Worker("recv", host, port, wait_ready) for _ in range(receivers)]
        self.sender = Worker("send", host, port, wait_ready)

    @property
    def workers(self) -> list[Worker]:
        return [*self.receivers, self.sender]

    def cpu_seconds(self) -> list[float]:
        """CPU seconds of each process: the receivers, then the sender."""
        return [w.cpu_seconds() for w in self.workers]

    async def retarget(self, host: str, port: int, *, wait_ready: bool) -> None:
        await asyncio.gather(*(w.call("disconnect") for w in self.workers))
        await asyncio.gather(
            *(w.call("retarget", host=host, port=port, wait_ready=wait_ready) for w in self.workers)
        )

    async def connect(
        self, members: list[ClientSpec], senders: list[ClientSpec], concurrency: int = 32
    ) -> dict[str, Any]:
        shares: list[list[dict[str, Any]]] = [[] for _ in self.receivers]
        for i, spec in enumerate(members):
            shares[i % len(shares)].append(spec.__dict__)
        replies = await asyncio.gather(
            *(
                w.call("connect", specs=share, concurrency=concurrency)
                for w, share in zip(self.receivers, shares, strict=True)
            ),
            self.sender.call(
                "connect", specs=[s.__dict__ for s in senders], concurrency=concurrency
            ),
        )
        return {
            "open": sum(r["open"] for r in replies[:-1]),
            "sender_open": replies[-1]["open"],
            "failed": sum(r["failed"] for r in replies),
            "not_open": [r["not_open"] for r in replies],
            "errors": [e for r in replies for e in r["errors"]][:5],
        }

    async def reconnect(self) -> dict[str, Any]:
        """Reconnect every client that is not open; say which close codes they had."""
        replies = await asyncio.gather(
            *(w.call("connect", specs=[], concurrency=32) for w in self.workers)
        )
        closed: dict[str, int] = {}
        for r in replies:
            for code, n in r["closed_before"].items():
                closed[code] = closed.get(code, 0) + n
        return {
            "open": sum(r["open"] for r in replies[:-1]),
            "failed": sum(r["failed"] for r in replies),
            "closed_before": closed,
        }

    async def quiet(self, idle: float = 0.5, limit: float = 15.0) -> bool:
        """True once no process has received a frame for `idle` s (at most `limit` s)."""
        deadline = time.time() + limit
        replies = await asyncio.gather(
            *(w.call("quiet", idle=idle, deadline=deadline) for w in self.workers)
        )
        return all(r["quiet"] for r in replies)

    async def step(
        self, step: int, rate: float, duration: float, *, drain: float, ack_timeout: float
    ) -> dict[str, Any]:
        """One open-loop step: begin, send for `duration` s at `rate`/s, wait for the
        deliveries (at most `drain` s after the acks), check every client."""
        await asyncio.gather(*(w.call("begin", step=step) for w in self.receivers))
        start_at = time.time() + 0.2
        sent = await self.sender.call(
            "send",
            step=step,
            rate=rate,
            duration=duration,
            start_at=start_at,
            ack_timeout=ack_timeout,
        )
        deadline = max(sent["acks_done"], start_at + duration) + drain
        collected = await asyncio.gather(
            *(
                w.call(
                    "collect", expected=sent["expected"], senders=sent["senders"], deadline=deadline
                )
                for w in self.receivers
            )
        )
        latencies, times = array("d"), array("d")
        for c in collected:
            latencies.frombytes(c.pop("latencies"))
            times.frombytes(c.pop("times"))
        return {
            "start_at": start_at,
            "sent": sent,
            "receivers": collected,
            "latencies": latencies,
            "times": times,
        }

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))
