"""Scale-out (§10) with real processes: two `parley serve` on one PostgreSQL and one Redis.

Each test starts its own redis-server on a free port (so a test may kill and restart it)
and two servers with the `parley serve` command, and talks to them as clients do: HTTP
and WebSocket over loopback. What is checked is §9 across processes: one order for every
connection on every process (§9.2), nothing lost when a process dies or Redis restarts
(§9.3), and no event after a member's removal reaching them on another process (§9.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis.asyncio as aioredis
import websockets
import websockets.asyncio.client

from tests.conftest import PASSWORD, PG_URL, WS, AppFactory, Backend, truncate_all

# Several processes share state only through PostgreSQL and Redis: these tests run on
# that backend alone (SQLite is the single-process embedded mode).
pytestmark = [
    pytest.mark.skipif(not PG_URL, reason="needs PARLEY_TEST_DATABASE_URL (PostgreSQL)"),
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
]

# Each wait below is bounded: a server that does not come up, or an event that does not
# come, fails the test within these rather than hanging the run.
STARTUP_TIMEOUT = 30.0  # s for `parley serve` to answer /ready 200 (imports, pools, Redis)
REDIS_STARTUP_TIMEOUT = 10.0
DELIVERY_TIMEOUT = 20.0  # s for a client to receive everything it is owed
# After a Redis outage a process reconnects within its largest backoff (2 s) and then
# catches up; /ready and delivery must be back well within this.
RECOVERY_TIMEOUT = 20.0
# Pub/sub delivers in milliseconds; the hub's database sweep needs two sweeps (>= 2 s)
# to notice a missed event. Delivery faster than this therefore proves the pub/sub path.
PUBSUB_LATENCY = 1.5
OUTAGE = 3.0  # s that Redis stays down while messages are sent
SECRET_KEY = "multiprocess-test-secret-" + "k" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 40, width: int = 400) -> str:
    """The end of a log, each line cut short (tracebacks are one long JSON line)."""
    try:
        return "\n".join(
            line[:width] for line in path.read_text(errors="replace").splitlines()[-lines:]
        )
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and reap: nothing of a test outlives it, even when it failed."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


# -- processes ------------------------------------------------------------------------


class ChildProcess:
    """A process a test starts, its output appended to one log file across restarts."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def popen(self, command: list[str], **kwargs: Any) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, **kwargs
        )

    def kill(self) -> None:
        stop_process(self.process)

    def close(self) -> None:
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisServer(ChildProcess):
    """A redis-server of this test's own, without persistence, on a fixed port."""

    def __init__(self, port: int, workdir: Path) -> None:
        super().__init__(workdir / "redis.log")
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def spawn(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; the multi-process tests need it")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.popen(command)

    async def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        self.spawn()
        assert self.process is not None
        client = aioredis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + REDIS_STARTUP_TIMEOUT
        try:
            while True:
                try:
                    if await client.ping():
                        return
                except Exception as exc:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(
                            f"redis-server on port {self.port} did not start ({exc!r}):\n"
                            + tail(self.log_path)
                        )
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()


@dataclass
class Account:
    id: str
    username: str
    token: str


class Node(ChildProcess):
    """One `parley serve` process."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        super().__init__(workdir / f"server-{name}.log")
        self.name = name
        self.port = free_port()
        self.env = env
        self.workdir = workdir

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/ws?token={token}"

    def spawn(self) -> None:
        self.popen(
            [sys.executable, "-m", "parley", "serve", "--port", str(self.port)],
            env=self.env,
            # Not the repository: a developer's .env there must not reach the servers.
            cwd=self.workdir,
        )

    async def start(self, http: httpx.AsyncClient) -> None:
        """Start the server and wait until /ready answers 200."""
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"parley serve ({self.name}) exited with {self.process.returncode}:\n"
                    + tail(self.log_path)
                )
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(self.url("/ready"), timeout=2)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"parley serve ({self.name}) not ready after {STARTUP_TIMEOUT} s:\n"
                    + tail(self.log_path)
                )
            await asyncio.sleep(0.1)


class Cluster:
    """Two servers, A and B, on one database and one Redis, and the clients of a test."""

    def __init__(self, backend: Backend, redis: RedisServer, workdir: Path) -> None:
        self.redis = redis
        self.prefix = f"parley-mp-{uuid.uuid4().hex[:10]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        env.update(
            PARLEY_DATABASE_URL=backend.url,
            PARLEY_REDIS_URL=redis.url,
            PARLEY_REDIS_PREFIX=self.prefix,
            PARLEY_SECRET_KEY=SECRET_KEY,
            PARLEY_RATE_LIMITS="off",
            PARLEY_ARGON2_TIME_COST="1",
            PARLEY_ARGON2_MEMORY_COST="64",
            PARLEY_LOG_FORMAT="json",
            # A killed process's users go offline within seconds, not half a minute.
            PARLEY_PRESENCE_TTL="3",
            PARLEY_DATA_DIR=str(workdir / "data"),
        )
        self.a = Node("a", env, workdir)
        self.b = Node("b", env, workdir)
        self.http = httpx.AsyncClient(timeout=10)
        self.sockets: list[WS] = []

    async def start(self) -> None:
        await asyncio.gather(self.a.start(self.http), self.b.start(self.http))

    async def close(self) -> None:
        async def close_socket(ws: WS) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

        await asyncio.gather(*(close_socket(ws) for ws in self.sockets))
        for node in (self.a, self.b):
            node.close()
            print(f"--- last lines of server {node.name} ({node.log_path}) ---")
            print(tail(node.log_path))
        await self.http.aclose()

    # -- HTTP ---------------------------------------------------------------------------

    async def call(
        self, node: Node, user: Account | None, method: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {user.token}"} if user is not None else {}
        return await self.http.request(
            method, node.url("/api/v1" + path), headers=headers, **kwargs
        )

    async def register(self, node: Node, username: str) -> Account:
        resp = await self.call(
            node, None, "POST", "/auth/register", json={"username": username, "password": PASSWORD}
        )
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return Account(body["user"]["id"], body["user"]["username"], body["access_token"])

    async def room(self, owner: Account, members: list[Account]) -> str:
        """A public room that `owner` creates on A and the members join on B."""
        resp = await self.call(
            self.a, owner, "POST", "/conversations", json={"kind": "room", "name": "general"}
        )
        assert resp.status_code == 201, resp.text
        room_id: str = resp.json()["id"]
        for member in members:
            joined = await self.call(self.b, member, "POST", f"/conversations/{room_id}/join")
            assert joined.status_code == 200, joined.text
        return room_id

    async def last_seq(self, user: Account, room_id: str) -> int:
        resp = await self.call(self.a, user, "GET", f"/conversations/{room_id}")
        assert resp.status_code == 200, resp.text
        seq: int = resp.json()["last_seq"]
        return seq

    async def send(self, node: Node, user: Account, room_id: str, content: str) -> dict[str, Any]:
        resp = await self.call(
            node, user, "POST", f"/conversations/{room_id}/messages", json={"content": content}
        )
        assert resp.status_code == 201, f"send through {node.name}: {resp.text}"
        message: dict[str, Any] = resp.json()
        return message

    async def history(self, user: Account, room_id: str) -> list[dict[str, Any]]:
        """Every message of the room, ascending, paged over REST on A."""
        messages: list[dict[str, Any]] = []
        after = 0
        while True:
            resp = await self.call(
                self.a,
                user,
                "GET",
                f"/conversations/{room_id}/messages",
                params={"after": after, "limit": 100},
            )
            assert resp.status_code == 200, resp.text
            page = resp.json()
            messages += page["messages"]
            if not page["has_more"]:
                return messages
            after = messages[-1]["seq"]

    async def ready(self, node: Node) -> httpx.Response:
        return await self.http.get(node.url("/ready"), timeout=5)

    async def wait_ready(self, node: Node, status: int, timeout: float) -> httpx.Response:
        """Poll /ready until it answers `status`; the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            resp = await self.ready(node)
            if resp.status_code == status or time.monotonic() > deadline:
                return resp
            await asyncio.sleep(0.1)

    async def wait_subscribed(self, room_id: str, processes: int, timeout: float) -> None:
        """Wait until `processes` processes subscribe the room's channel in Redis again,
        asking Redis itself (not the servers, whose /ready would use their connections)."""
        channel = f"{self.prefix}:c:{uuid.UUID(room_id).hex}"
        client = aioredis.from_url(self.redis.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                [(_, count)] = await client.pubsub_numsub(channel)
                if count >= processes:
                    return
                if time.monotonic() > deadline:
                    pytest.fail(f"{count} of {processes} processes subscribed after {timeout} s")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    # -- WebSocket ----------------------------------------------------------------------

    async def connect(self, node: Node, user: Account) -> WS:
        ws = WS(await websockets.asyncio.client.connect(node.ws_url(user.token), open_timeout=5))
        self.sockets.append(ws)
        ready = await ws.ready()
        assert ready["user_id"] == user.id
        return ws


@pytest.fixture
async def cluster(
    backend: Backend, app_factory: AppFactory, tmp_path: Path
) -> AsyncIterator[Cluster]:
    # The run's database, emptied as the `app` fixture does; the servers share it.
    await truncate_all(await app_factory())
    redis = RedisServer(free_port(), tmp_path)
    cluster = Cluster(backend, redis, tmp_path)
    try:
        await redis.start()
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()
        redis.close()


# -- reading events ---------------------------------------------------------------------


def is_sequenced(event: dict[str, Any], room_id: str) -> bool:
    """A sequenced event of the room, or a `gap` standing in for some (which fails the
    order checks below: nothing here may be skipped)."""
    return event.get("conversation_id") == room_id and ("seq" in event or event["type"] == "gap")


async def collect(
    ws: WS,
    room_id: str,
    upto: int,
    *,
    seen: list[dict[str, Any]] | None = None,
    timeout: float = DELIVERY_TIMEOUT,
) -> list[dict[str, Any]]:
    """The room's sequenced events, `seen` first, read until one at seq `upto` came."""
    events = list(seen or [])
    deadline = time.monotonic() + timeout
    while max((e.get("seq", 0) for e in events), default=0) < upto:
        left = deadline - time.monotonic()
        event = None
        with contextlib.suppress(TimeoutError):
            event = await ws.recv(max(left, 0.01))
        if event is None:
            pytest.fail(f"seq {upto} not received within {timeout} s; got {seqs_of(events)}")
        if is_sequenced(event, room_id):
            events.append(event)
    return events


async def read_until_closed(ws: WS, room_id: str, timeout: float) -> list[dict[str, Any]]:
    """The room's sequenced events received until the connection is lost."""
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                event = await ws.recv(timeout)
                if is_sequenced(event, room_id):
                    events.append(event)
    except websockets.exceptions.ConnectionClosed:
        return events
    except TimeoutError:
        pytest.fail(f"the connection stayed open {timeout} s after its server was killed")


def seqs_of(events: list[dict[str, Any]]) -> list[int | None]:
    return [e.get("seq") for e in events]


def as_messages(events: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(e["seq"], e["type"], e["message"]["id"]) for e in events]


def as_history(messages: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(m["seq"], "message.created", m["id"]) for m in messages]


def unexpected(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a client must not receive once it is done: anything sequenced."""
    return [e for e in events if "seq" in e or e["type"] == "gap"]


async def ws_send(ws: WS, room_id: str, content: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Send a message over the socket and wait for its ack; the room's events read in
    between are appended to `seen`. A `rate_limited` refusal is retried after the time
    the server names, with the same client_msg_id, as a client would."""
    client_msg_id = uuid.uuid4().hex
    while True:
        await ws.send(
            op="send",
            ref=content,
            conversation_id=room_id,
            content=content,
            client_msg_id=client_msg_id,
        )
        while True:
            event = await ws.recv(DELIVERY_TIMEOUT)
            if event.get("ref") == content and event["type"] in ("ack", "error"):
                break
            if is_sequenced(event, room_id):
                seen.append(event)
        if event["type"] == "ack":
            message: dict[str, Any] = event["message"]
            return message
        assert event["code"] == "rate_limited", event
        await asyncio.sleep(event["retry_after"])


# -- the stories ------------------------------------------------------------------------


async def test_a_message_sent_to_one_process_reaches_a_client_of_the_other(
    cluster: Cluster,
) -> None:
    """bob, connected to B, receives what alice sends to A over REST and over her socket,
    once each; alice receives both on A."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(b, "bob")
    room_id = await cluster.room(alice, [bob])
    bob_on_b = await cluster.connect(b, bob)
    alice_on_a = await cluster.connect(a, alice)

    over_http = await cluster.send(a, alice, room_id, "over http to A")
    event, before = await bob_on_b.until("message.created")
    assert before == []
    assert event["conversation_id"] == room_id
    assert (event["seq"], event["message"]["id"]) == (over_http["seq"], over_http["id"])
    assert event["message"]["content"] == "over http to A"

    alice_saw: list[dict[str, Any]] = []
    over_ws = await ws_send(alice_on_a, room_id, "over the socket to A", alice_saw)
    event, before = await bob_on_b.until("message.created")
    assert before == []
    assert (event["seq"], event["message"]["id"]) == (over_ws["seq"], over_ws["id"])
    assert event["message"]["content"] == "over the socket to A"

    alice_events = await collect(alice_on_a, room_id, over_ws["seq"], seen=alice_saw)
    assert seqs_of(alice_events) == [over_http["seq"], over_ws["seq"]]
    assert unexpected(await bob_on_b.quiet(0.5)) == []


async def test_concurrent_senders_on_both_processes_make_one_order_for_every_client(
    cluster: Cluster,
) -> None:
    """§9.2: 4 senders × 50 messages, half through each process, over REST and over the
    socket; every connection on either process gets all 200 in the same gap-free order,
    which is the order of the history."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(b, "bob")
    carol = await cluster.register(a, "carol")
    room_id = await cluster.room(alice, [bob, carol])
    start = await cluster.last_seq(alice, room_id)
    per_sender, senders = 50, 4
    last = start + per_sender * senders

    listeners = {
        "bob@A": await cluster.connect(a, bob),
        "carol@A": await cluster.connect(a, carol),
        "bob@B": await cluster.connect(b, bob),
        "carol@B": await cluster.connect(b, carol),
    }
    socket_senders = {"alice@A": await cluster.connect(a, alice)}
    socket_senders["bob@B"] = await cluster.connect(b, bob)
    listening = {
        name: asyncio.create_task(collect(ws, room_id, last)) for name, ws in listeners.items()
    }

    async def over_http(node: Node, user: Account, label: str) -> None:
        for i in range(per_sender):
            await cluster.send(node, user, room_id, f"{label} {i}")

    async def over_socket(name: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        for i in range(per_sender):
            await ws_send(socket_senders[name], room_id, f"{name} socket {i}", seen)
        return await collect(socket_senders[name], room_id, last, seen=seen)

    began = time.monotonic()
    _, _, alice_got, bob_got = await asyncio.gather(
        over_http(a, alice, "alice http via A"),
        over_http(b, bob, "bob http via B"),
        over_socket("alice@A"),
        over_socket("bob@B"),
    )
    received = {name: await task for name, task in listening.items()}
    received |= {"alice@A sender": alice_got, "bob@B sender": bob_got}
    print(f"200 messages sent and fanned out in {time.monotonic() - began:.2f} s")

    history = await cluster.history(alice, room_id)
    assert [m["seq"] for m in history] == list(range(start + 1, last + 1))
    for name, events in received.items():
        assert seqs_of(events) == list(range(start + 1, last + 1)), name
        assert as_messages(events) == as_history(history), name
    # Nothing after the last one either: no event came twice, late.
    lates = await asyncio.gather(
        *(ws.quiet(0.5) for ws in [*listeners.values(), *socket_senders.values()])
    )
    assert [unexpected(late) for late in lates] == [[]] * len(lates)


async def test_clients_of_a_killed_process_resume_on_the_other_and_lose_nothing(
    cluster: Cluster,
) -> None:
    """§9.3, the loss of the process a client was connected to: SIGKILL B while messages
    flow through A; B's clients resume on A from the last seq they saw, and get what was
    sent meanwhile exactly once, in order, then live traffic again."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(a, "bob")
    carol = await cluster.register(a, "carol")
    room_id = await cluster.room(alice, [bob, carol])
    start = await cluster.last_seq(alice, room_id)
    alice_on_a = await cluster.connect(a, alice)
    victims = {"bob": await cluster.connect(b, bob), "carol": await cluster.connect(b, carol)}
    users = {"bob": bob, "carol": carol}

    # Both processes take sends before the kill.
    for i in range(6):
        await cluster.send(a if i % 2 else b, alice, room_id, f"before {i}")
    before_kill = {
        name: asyncio.create_task(read_until_closed(ws, room_id, DELIVERY_TIMEOUT))
        for name, ws in victims.items()
    }

    # B dies in the middle of a burst of sends through A (two senders, no pauses).
    sent_during: list[dict[str, Any]] = []
    kill_now = asyncio.Event()

    async def burst(label: str) -> None:
        for i in range(15):
            sent_during.append(await cluster.send(a, alice, room_id, f"{label} {i}"))
            if len(sent_during) >= 8:
                kill_now.set()

    senders = asyncio.gather(burst("during x"), burst("during y"))
    await kill_now.wait()
    b.kill()
    assert b.process is not None and b.process.returncode == -signal.SIGKILL
    await senders
    seen = {name: await task for name, task in before_kill.items()}
    for name, ws in victims.items():
        assert ws.ws.close_code == 1006, (name, ws.ws.close_code)  # lost, not closed
    # A client cannot tell how far it got from anything but what it received.
    print("last seqs seen on B:", {n: seqs_of(e)[-1:] for n, e in seen.items()})

    # They come back on A and resume from where each of them stands.
    cursors: dict[str, int] = {}
    resumed_on_a: dict[str, tuple[list[dict[str, Any]], WS]] = {}
    for name, events in seen.items():
        cursors[name] = max((e["seq"] for e in events), default=start)
        assert cursors[name] >= start + 6, (name, seqs_of(events))
        ws = await cluster.connect(a, users[name])
        await ws.send(op="resume", ref=name, cursors={room_id: cursors[name]})
        resumed, before = await ws.until("resumed", timeout=DELIVERY_TIMEOUT)
        replayed = [e for e in before if is_sequenced(e, room_id)]
        stood_at = max((e["seq"] for e in replayed), default=cursors[name])
        assert resumed["ref"] == name
        assert resumed["cursors"] == {room_id: stood_at}, (name, resumed, seqs_of(replayed))
        resumed_on_a[name] = (replayed, ws)

    # And then the conversation goes on, live.
    after = [await cluster.send(a, alice, room_id, f"after {i}") for i in range(5)]
    last = after[-1]["seq"]
    history = await cluster.history(alice, room_id)
    assert [m["seq"] for m in history] == list(range(start + 1, last + 1))
    (await cluster.ready(a)).raise_for_status()
    for name, (replayed, ws) in resumed_on_a.items():
        events = seen[name] + await collect(ws, room_id, last, seen=replayed)
        assert seqs_of(events) == list(range(start + 1, last + 1)), name
        assert as_messages(events) == as_history(history), name
        assert unexpected(await ws.quiet(0.3)) == [], name
    alice_events = await collect(alice_on_a, room_id, last)
    assert as_messages(alice_events) == as_history(history)


async def test_after_a_redis_restart_every_client_catches_up_without_reconnecting(
    cluster: Cluster,
) -> None:
    """§9.3 and §10: sends succeed while Redis is down (committed is committed), /ready
    says Redis is failing, and once Redis is back each process catches its connections
    up from the database, in order, on the same sockets."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(b, "bob")
    carol = await cluster.register(a, "carol")
    room_id = await cluster.room(alice, [bob, carol])
    start = await cluster.last_seq(alice, room_id)
    clients = {
        "alice@A": await cluster.connect(a, alice),
        "carol@A": await cluster.connect(a, carol),
        "bob@B": await cluster.connect(b, bob),
        "carol@B": await cluster.connect(b, carol),
    }
    first = await cluster.send(a, alice, room_id, "before, via A")
    second = await cluster.send(b, bob, room_id, "before, via B")
    received = {name: await collect(ws, room_id, second["seq"]) for name, ws in clients.items()}

    cluster.redis.kill()
    for node in (a, b):
        down = await cluster.wait_ready(node, 503, timeout=10)
        assert down.status_code == 503, (node.name, down.text)
        assert down.json()["failing"] == ["redis"], (node.name, down.text)

    # Sends spread over an outage of some seconds: the brokers retry with growing
    # backoff, and the hubs' sweeps run meanwhile.
    durations = []
    for i in range(8):
        began = time.monotonic()
        await cluster.send(a if i % 2 else b, alice if i % 2 else bob, room_id, f"outage {i}")
        durations.append(time.monotonic() - began)
        await asyncio.sleep(OUTAGE / 8)
    # The socket too: its ack comes after the commit, whatever the publish does.
    acked = await ws_send(
        clients["alice@A"], room_id, "outage over the socket", received["alice@A"]
    )
    print(f"sends during the outage took {max(durations):.3f} s at most")
    last = acked["seq"]
    assert last == start + len(durations) + 3
    for node in (a, b):
        still_down = await cluster.ready(node)
        assert still_down.status_code == 503, (node.name, still_down.text)

    await cluster.redis.start()
    began = time.monotonic()
    caught_up = await asyncio.gather(
        *(
            collect(ws, room_id, last, seen=received[name], timeout=RECOVERY_TIMEOUT)
            for name, ws in clients.items()
        )
    )
    print(f"every client caught up {time.monotonic() - began:.2f} s after Redis returned")
    history = await cluster.history(alice, room_id)
    assert history[0]["id"] == first["id"]
    assert [m["seq"] for m in history] == list(range(start + 1, last + 1))
    for name, events in zip(clients, caught_up, strict=True):
        assert seqs_of(events) == list(range(start + 1, last + 1)), name
        assert as_messages(events) == as_history(history), name
        assert clients[name].ws.close_code is None, name  # the same socket throughout

    for node in (a, b):
        up = await cluster.wait_ready(node, 200, timeout=RECOVERY_TIMEOUT)
        assert up.status_code == 200, (node.name, up.text)
    # And pub/sub carries events again (faster than any database sweep would).
    after_a = await cluster.send(a, alice, room_id, "after, via A")
    after_b = await cluster.send(b, bob, room_id, "after, via B")
    for name, ws in clients.items():
        events = await collect(ws, room_id, after_b["seq"], timeout=PUBSUB_LATENCY)
        assert seqs_of(events) == [after_a["seq"], after_b["seq"]], name
        assert unexpected(await ws.quiet(0.2)) == [], name


async def test_after_a_quiet_redis_restart_events_flow_through_pubsub_at_once(
    cluster: Cluster,
) -> None:
    """A Redis restart while nothing is sent: once the processes have subscribed again,
    the very first events published on either side arrive at once (not only later, by
    the database sweep), and new clients can connect to either process."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(b, "bob")
    room_id = await cluster.room(alice, [bob])
    alice_on_a = await cluster.connect(a, alice)
    bob_on_b = await cluster.connect(b, bob)
    # Both processes publish once, so each holds a Redis connection for publishing.
    warm = [
        await cluster.send(a, alice, room_id, "via A"),
        await cluster.send(b, bob, room_id, "via B"),
    ]
    for ws in (alice_on_a, bob_on_b):
        assert seqs_of(await collect(ws, room_id, warm[-1]["seq"])) == [m["seq"] for m in warm]

    cluster.redis.kill()
    await asyncio.sleep(1.0)
    await cluster.redis.start()
    await cluster.wait_subscribed(room_id, processes=2, timeout=RECOVERY_TIMEOUT)

    for node, user in ((a, alice), (b, bob)):
        sent = await cluster.send(node, user, room_id, f"first after the restart, via {node.name}")
        for ws in (alice_on_a, bob_on_b):
            events = await collect(ws, room_id, sent["seq"], timeout=PUBSUB_LATENCY)
            assert seqs_of(events) == [sent["seq"]], node.name
    for node in (a, b):
        up = await cluster.wait_ready(node, 200, timeout=RECOVERY_TIMEOUT)
        assert up.status_code == 200, (node.name, up.text)


async def test_a_member_removed_on_one_process_gets_nothing_more_on_the_other(
    cluster: Cluster,
) -> None:
    """§9.5 across processes: carol, connected to both, is removed by alice through A;
    each of her connections ends with member.left, while bob's go on."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(b, "bob")
    carol = await cluster.register(b, "carol")
    room_id = await cluster.room(alice, [bob, carol])
    carol_on = {"B": await cluster.connect(b, carol), "A": await cluster.connect(a, carol)}
    bob_on_b = await cluster.connect(b, bob)

    before = await cluster.send(a, alice, room_id, "before the kick")
    for ws in carol_on.values():
        event, _ = await ws.until("message.created")
        assert event["seq"] == before["seq"]

    kicked = await cluster.call(a, alice, "DELETE", f"/conversations/{room_id}/members/{carol.id}")
    assert kicked.status_code == 204, kicked.text
    after = [
        await cluster.send(a if i % 2 else b, alice if i % 2 else bob, room_id, f"secret {i}")
        for i in range(6)
    ]
    for where, ws in carol_on.items():
        left, between = await ws.until("member.left")
        assert unexpected(between) == [], where
        assert (left["conversation_id"], left["user_id"]) == (room_id, carol.id)
        assert left["reason"] == "removed"
        assert left["seq"] == before["seq"] + 1

    # bob, on B, gets everything up to the last secret; by then carol would have too.
    witnessed = await collect(bob_on_b, room_id, after[-1]["seq"])
    assert seqs_of(witnessed) == list(range(before["seq"], after[-1]["seq"] + 1))
    lates = await asyncio.gather(*(ws.quiet(1.0) for ws in carol_on.values()))
    for where, late in zip(carol_on, lates, strict=True):
        assert unexpected(late) == [], where
        assert "secret" not in str(late), where
    # Her sockets stay open and usable: she is out of the room, not off the server.
    for ws in carol_on.values():
        await ws.send(op="ping", ref="still here")
        assert (await ws.until("pong"))[0]["ref"] == "still here"


# The three stories below each found a bug when they were written (presence reads after
# a Redis restart, tokens in uvicorn's handshake log lines, a resume after live events);
# they stay last so that a run with `-x` checks everything above first.


async def test_new_clients_can_connect_to_either_process_after_a_redis_restart(
    cluster: Cluster,
) -> None:
    """A Redis restart must not break the next WebSocket handshakes: the first one on
    each process reads presence through a Redis connection that died with the restart."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(b, "bob")
    room_id = await cluster.room(alice, [bob])
    # A connection on each process, so each holds a Redis connection for presence.
    await cluster.connect(a, alice)
    await cluster.connect(b, bob)

    cluster.redis.kill()
    await asyncio.sleep(1.0)
    await cluster.redis.start()
    await cluster.wait_subscribed(room_id, processes=2, timeout=RECOVERY_TIMEOUT)

    newcomers = {}
    for node, user in ((a, bob), (b, alice)):
        try:
            newcomers[node.name] = await cluster.connect(node, user)
        except websockets.exceptions.ConnectionClosed as exc:
            pytest.fail(f"a new connection to {node.name} after the restart was dropped: {exc}")
    sent = await cluster.send(a, alice, room_id, "to the newcomers")
    for name, ws in newcomers.items():
        assert seqs_of(await collect(ws, room_id, sent["seq"])) == [sent["seq"]], name


async def test_the_servers_never_log_a_token_a_ticket_or_a_password(cluster: Cluster) -> None:
    """§10: no tokens, tickets or passwords in the logs, whichever way a client
    authenticates its WebSocket (query token, ticket, first frame)."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    secrets = {"access token": alice.token, "password": PASSWORD}
    await cluster.connect(a, alice)
    for node in (a, b):
        resp = await cluster.call(node, alice, "POST", "/auth/ticket")
        assert resp.status_code in (200, 201), resp.text
        ticket = resp.json()["ticket"]
        secrets[f"ticket for {node.name}"] = ticket
        ws = WS(
            await websockets.asyncio.client.connect(
                f"ws://127.0.0.1:{node.port}/api/v1/ws?ticket={ticket}", open_timeout=5
            )
        )
        cluster.sockets.append(ws)
        await ws.ready()
    ws = WS(await websockets.asyncio.client.connect(f"ws://127.0.0.1:{b.port}/api/v1/ws"))
    cluster.sockets.append(ws)
    await ws.send(op="auth", token=alice.token)
    await ws.ready()
    await asyncio.sleep(0.2)  # let the servers write their lines
    for node in (a, b):
        log = node.log_path.read_text(errors="replace")
        leaked = [what for what, secret in secrets.items() if secret in log]
        assert leaked == [], f"server {node.name} logged: {leaked}"


async def test_a_client_moving_to_the_other_process_gets_all_it_missed_even_after_live_events(
    cluster: Cluster,
) -> None:
    """A client that lost B reconnects to A; a live event reaches the new socket before
    its `resume` does (traffic does not wait for it). The resume must still bring every
    event after the cursor exactly once, or a `gap` standing in for them (§8, §9.3)."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(a, "bob")
    room_id = await cluster.room(alice, [bob])
    bob_on_b = await cluster.connect(b, bob)
    seen = [await cluster.send(a, alice, room_id, f"seen {i}") for i in range(3)]
    cursor = seen[-1]["seq"]
    await collect(bob_on_b, room_id, cursor)
    await bob_on_b.close()

    missed = [await cluster.send(a, alice, room_id, f"missed {i}") for i in range(5)]
    bob_on_a = await cluster.connect(a, bob)
    live = await cluster.send(a, alice, room_id, "live, before the resume")
    first = await collect(bob_on_a, room_id, live["seq"])
    await bob_on_a.send(op="resume", ref="r", cursors={room_id: cursor})
    _, before = await bob_on_a.until("resumed")
    events = first + [e for e in before if is_sequenced(e, room_id)]

    got = [e["seq"] for e in events if "seq" in e]
    assert len(got) == len(set(got)), f"received twice: {got}"
    covered = set(got)
    for gap in (e for e in events if e["type"] == "gap"):
        covered |= set(range(gap["from_seq"], gap["to_seq"] + 1))
    wanted = set(range(cursor + 1, live["seq"] + 1))
    assert wanted <= covered, (
        f"seqs {sorted(wanted - covered)} (the missed {[m['seq'] for m in missed]}) "
        f"neither sent nor announced by a gap; received {got}"
    )


async def presence_news(ws: WS, user_id: str, timeout: float) -> str:
    """The next presence status announced for this user, skipping anything else."""
    deadline = time.monotonic() + timeout
    while True:
        event, _ = await ws.until("presence", timeout=max(deadline - time.monotonic(), 0.01))
        if event["user_id"] == user_id:
            status: str = event["status"]
            return status


async def test_the_users_of_a_killed_process_are_announced_offline_on_the_other(
    cluster: Cluster,
) -> None:
    """SIGKILL B while bob is connected to it: nothing on B says goodbye, yet alice, on A,
    hears that bob went offline once B's heartbeat expired (PARLEY_PRESENCE_TTL, 3 s
    here), and A's presence reads agree."""
    a, b = cluster.a, cluster.b
    alice = await cluster.register(a, "alice")
    bob = await cluster.register(a, "bob")
    resp = await cluster.call(
        a, alice, "POST", "/conversations", json={"kind": "group", "name": "pair",
                                                  "member_ids": [bob.id]},
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    alice_on_a = await cluster.connect(a, alice)
    await cluster.connect(b, bob)
    assert await presence_news(alice_on_a, bob.id, DELIVERY_TIMEOUT) == "online"

    b.kill()
    killed_at = time.monotonic()
    assert await presence_news(alice_on_a, bob.id, DELIVERY_TIMEOUT) == "offline"
    # The TTL, then at most one of A's refreshes (a third of it), and some slack.
    assert time.monotonic() - killed_at < 3 + 1 + 3
    resp = await cluster.call(a, alice, "GET", "/presence", params={"user_ids": bob.id})
    assert resp.json() == {"presence": {bob.id: "offline"}}
    assert await alice_on_a.quiet(1.5) == []
